"""Write pickles in NVlabs/edm's persisted format (torch_utils.persistence) for tests.

A real EDM pickle stores each network module as a call to
`torch_utils.persistence._reconstruct_persistent_obj(meta)`, where meta carries the class name,
the Python source of its module and the instance state (parameters, buffers, submodules, init
kwargs); torch containers (ModuleDict) and tensors are pickled the ordinary way. This writer
produces the same stream from an emdctl module, with module_src set to code that would leave a
marker file behind if anything ever executed it.
"""

from __future__ import annotations

import collections
import pickle
import sys
import types
from pathlib import Path

import torch

from emdctl.networks.dhariwal import DhariwalUNet
from emdctl.networks.layers import Conv2d, FourierEmbedding, GroupNorm, Linear, PositionalEmbedding, UNetBlock
from emdctl.networks.precond import EDMPrecond
from emdctl.networks.songunet import SongUNet

EDM_NAMES = {
    EDMPrecond: "EDMPrecond",
    SongUNet: "SongUNet",
    DhariwalUNet: "DhariwalUNet",
    UNetBlock: "UNetBlock",
    Conv2d: "Conv2d",
    GroupNorm: "GroupNorm",
    Linear: "Linear",
    PositionalEmbedding: "PositionalEmbedding",
    FourierEmbedding: "FourierEmbedding",
}


def _install_fake_persistence():
    pkg = sys.modules.setdefault("torch_utils", types.ModuleType("torch_utils"))
    mod = types.ModuleType("torch_utils.persistence")

    def _reconstruct_persistent_obj(meta):  # never called: emdctl must not resolve it to this
        raise AssertionError("the real reconstructor must never run")

    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    mod._reconstruct_persistent_obj = _reconstruct_persistent_obj
    sys.modules["torch_utils.persistence"] = mod
    pkg.persistence = mod
    return mod


class _Persisted:
    def __init__(self, meta):
        self.meta = meta

    def __reduce__(self):
        return (sys.modules["torch_utils.persistence"]._reconstruct_persistent_obj, (self.meta,))


def _state(module, init_kwargs, evil_src):
    children = collections.OrderedDict()
    for name, child in module._modules.items():
        children[name] = None if child is None else _convert(child, {}, evil_src)
    params = collections.OrderedDict((k, v) for k, v in module._parameters.items())
    buffers = collections.OrderedDict((k, v) for k, v in module._buffers.items())
    plain = {
        k: v for k, v in module.__dict__.items() if not k.startswith("_") and isinstance(v, int | float | str | bool)
    }
    return {
        **plain,
        "training": False,
        "_parameters": params,
        "_buffers": buffers,
        "_non_persistent_buffers_set": set(),
        "_backward_hooks": collections.OrderedDict(),
        "_forward_hooks": collections.OrderedDict(),
        "_forward_pre_hooks": collections.OrderedDict(),
        "_state_dict_hooks": collections.OrderedDict(),
        "_load_state_dict_pre_hooks": collections.OrderedDict(),
        "_modules": children,
        "_init_args": (),
        "_init_kwargs": init_kwargs,
    }


def _convert(module, init_kwargs, evil_src):
    if isinstance(module, torch.nn.ModuleDict):
        # A real ModuleDict whose children are the persisted stand-ins: pickled by class reference
        # (NEWOBJ torch.nn.modules.container.ModuleDict + BUILD), exactly as in official pickles.
        md = torch.nn.ModuleDict()
        for name, child in module.items():
            md._modules[name] = _convert(child, {}, evil_src)
        return md
    name = EDM_NAMES[type(module)]
    meta = {
        "type": "class",
        "version": 6,
        "module_src": evil_src,
        "class_name": name,
        "state": _state(module, init_kwargs, evil_src),
    }
    return _Persisted(meta)


def write_edm_pickle(den: EDMPrecond, model_kwargs: dict, path: Path, marker: Path) -> Path:
    """Pickle `den` as NVlabs/edm would (dict(ema=..., loss_fn=..., augment_pipe=None, dataset_kwargs=...))."""
    _install_fake_persistence()
    evil = f"open({str(marker)!r}, 'w').write('executed')\n"
    c, res = den.img_shape[0], den.img_shape[1]
    model_type = "SongUNet" if isinstance(den.model, SongUNet) else "DhariwalUNet"
    top_kwargs = {
        "img_resolution": res,
        "img_channels": c,
        "label_dim": den.label_dim,
        "use_fp16": False,
        "model_type": model_type,
        **model_kwargs,
    }
    inner_kwargs = {
        "img_resolution": res,
        "in_channels": c,
        "out_channels": c,
        "label_dim": den.label_dim,
        **model_kwargs,
    }
    top = _convert(den, top_kwargs, evil)
    top.meta["state"]["_modules"]["model"] = _convert(den.model, inner_kwargs, evil)
    for k in ("img_resolution", "img_channels", "label_dim", "sigma_min", "sigma_max", "sigma_data"):
        top.meta["state"][k] = {"img_resolution": res, "img_channels": c}.get(k, getattr(den, k, None))
    loss = _Persisted(
        {
            "type": "class",
            "version": 6,
            "module_src": evil,
            "class_name": "EDMLoss",
            "state": {"P_mean": -1.2, "P_std": 1.2, "sigma_data": 0.5},
        }
    )
    data = {
        "ema": top,
        "loss_fn": loss,
        "augment_pipe": None,
        "dataset_kwargs": {"class_name": "training.dataset.ImageFolderDataset", "path": "x.zip"},
    }
    with open(path, "wb") as f:
        pickle.dump(data, f, protocol=4)
    return path


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def write_malicious_pickle(path: Path, marker: Path) -> Path:
    with open(path, "wb") as f:
        pickle.dump({"ema": _Evil(marker)}, f, protocol=4)
    return path
