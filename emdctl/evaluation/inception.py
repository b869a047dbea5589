"""Inception-v3 (the FID network) through torch-fidelity, with weights loaded safely.

Where the weights come from, in order: --inception-weights PATH; $EMDCTL_INCEPTION_WEIGHTS;
torch-fidelity's own cache file; torch-fidelity's download URL (into emdctl's cache, sha256-prefix
checked). Offline without them, one line says what to fetch. Both published files are accepted:
torch-fidelity's weights-inception-2015-12-05-6726825d.pth and pytorch-fid's
pt_inception-2015-12-05-6726825d.pth (torchvision key layout; converted on load). Files are read
with torch.load(weights_only=True) and handed to torch-fidelity in memory: torch-fidelity's own
loader (weights_only=False) never sees a user's file.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch
import torch_fidelity.feature_extractor_inceptionv3 as tf_inception
from torch_fidelity import register_feature_extractor
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from ..errors import UserError
from ..hub import fetch, offline
from ..storage import sha256_file

NAME = "emdctl-inception-v3"
ENV = "EMDCTL_INCEPTION_WEIGHTS"
PYTORCH_FID_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"
)


def torch_fidelity_cache_file() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(URL_INCEPTION_V3).name


def resolve_weights(explicit: Path | None = None) -> Path:
    if explicit is not None:
        if not Path(explicit).is_file():
            raise UserError(f"{explicit}: no such Inception weights file")
        return Path(explicit)
    env = os.environ.get(ENV)
    if env:
        if not Path(env).is_file():
            raise UserError(f"{env}: no such Inception weights file (${ENV})")
        return Path(env)
    cached = torch_fidelity_cache_file()
    if cached.is_file():
        return cached
    hint = (
        f"FID/KID/IS in the Inception feature space need the Inception-v3 weights: download {URL_INCEPTION_V3} "
        f"(or pytorch-fid's {PYTORCH_FID_URL}) and pass --inception-weights PATH or set ${ENV}; "
        "offline, --features classifier:PATH gives an emdctl-trained feature space instead"
    )
    if offline():
        raise UserError(hint)
    try:
        path = fetch(URL_INCEPTION_V3, None, "Inception-v3 weights")
    except UserError:
        raise UserError(hint) from None
    if not sha256_file(path).startswith("6726825d"):
        raise UserError(f"{path}: sha256 does not start with 6726825d as the published file's does; delete it")
    return path


def convert_state_dict(state: dict) -> dict:
    """torch-fidelity or pytorch-fid (torchvision layout) keys -> torch-fidelity's module keys."""
    out = {}
    for k, v in state.items():
        k = k.removeprefix("module.")
        if k.endswith("num_batches_tracked") or k.startswith("AuxLogits."):
            continue
        out[k] = v
    return out


def load_weights(path: Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure means the same to the user
        raise UserError(f"{path}: not a readable Inception weights file ({str(e).splitlines()[0][:160]})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path}: expected a state_dict of tensors")
    return convert_state_dict(state)


class _TorchWithLoader:
    """Stands in for the `torch` module inside torch-fidelity's constructor: torch.load returns
    the state we already read safely; every other attribute is torch's."""

    def __init__(self, state):
        self._state = state

    def load(self, *args, **kwargs):
        return self._state

    def __getattr__(self, name):
        return getattr(torch, name)


class SafeInceptionV3(FeatureExtractorInceptionV3):
    """torch-fidelity's Inception-v3 with safe weight loading and grayscale inputs repeated to RGB."""

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        path = resolve_weights(Path(feature_extractor_weights_path) if feature_extractor_weights_path else None)
        state = load_weights(path)
        with contextlib.ExitStack() as stack:
            original = tf_inception.torch
            tf_inception.torch = _TorchWithLoader(state)
            stack.callback(setattr, tf_inception, "torch", original)
            try:
                super().__init__(name, features_list, feature_extractor_weights_path=str(path), **kwargs)
            except RuntimeError as e:
                raise UserError(f"{path}: does not fit Inception-v3 ({str(e).splitlines()[0][:200]})") from None

    def forward(self, x):
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return super().forward(x)


def register() -> None:
    if NAME not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(NAME, SafeInceptionV3)
