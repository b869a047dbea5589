"""An offline feature space: a small CNN classifier trained by emdctl on a labelled dataset.

Inception-v3 weights cannot always be downloaded; this network can be trained anywhere in minutes
(`emdctl evaluate train-features --data ...`) and is registered with torch-fidelity as the feature
extractor 'emdctl-classifier'. Distances in it (FD, KID, precision/recall) are meaningful for
comparing models evaluated with the *same* feature file; they are not comparable to published FID,
and every output says so.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch_fidelity import FeatureExtractorBase, register_feature_extractor
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from ..data import open_dataset, to_model_range
from ..errors import UserError
from ..progress import track
from ..storage import (
    atomic_save_safetensors,
    load_state_strict,
    read_safetensors,
    read_safetensors_metadata,
    sha256_file,
)

KIND = "emdctl-classifier-features"
NAME = "emdctl-classifier"
# Below this held-out accuracy the features hardly tell the classes apart (MNIST's classifier reaches
# 0.99): distances in them say little, and `train-features` warns.
WEAK_ACCURACY = 0.9


class FeatureNet(nn.Module):
    def __init__(self, channels: int, num_classes: int, width: int = 32, feature_dim: int = 256):
        super().__init__()

        def block(cin, cout):
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1),
                nn.GroupNorm(8, cout),
                nn.SiLU(),
                nn.Conv2d(cout, cout, 3, padding=1),
                nn.GroupNorm(8, cout),
                nn.SiLU(),
            )

        self.blocks = nn.ModuleList([block(channels, width), block(width, 2 * width), block(2 * width, 4 * width)])
        self.fc = nn.Linear(4 * width, feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)

    def forward(self, x):
        for i, b in enumerate(self.blocks):
            x = b(x)
            if i < len(self.blocks) - 1:
                x = F.avg_pool2d(x, 2)
        feats = F.silu(self.fc(x.mean((2, 3))))
        return feats, self.head(feats)


def _prepare(x_uint8: torch.Tensor, channels: int, resolution: int) -> torch.Tensor:
    x = to_model_range(x_uint8)
    if x.shape[1] != channels:
        x = x.mean(1, keepdim=True) if channels == 1 else x.expand(-1, channels, -1, -1)
    if x.shape[-1] != resolution or x.shape[-2] != resolution:
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", antialias=True, align_corners=False)
    return x


def load_feature_net(path: Path) -> tuple[FeatureNet, dict]:
    path = Path(path)
    meta_raw = read_safetensors_metadata(path, "feature-network file").get("emdctl")
    meta = json.loads(meta_raw) if meta_raw else {}
    if meta.get("kind") != KIND:
        raise UserError(
            f"{path}: not an emdctl classifier feature file (make one with `emdctl evaluate train-features`)"
        )
    net = FeatureNet(meta["channels"], meta["num_classes"], meta["width"], meta["feature_dim"])
    load_state_strict(net, read_safetensors(path, "feature-network file"), str(path))
    return net.eval().requires_grad_(False), meta


class ClassifierFeatureExtractor(FeatureExtractorBase):
    """torch-fidelity feature extractor: uint8 [B, C, H, W] -> ('features', 'logits')."""

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        if feature_extractor_weights_path is None:
            raise UserError("the emdctl-classifier feature space needs a feature file (classifier:PATH)")
        self.net, self.meta = load_feature_net(Path(feature_extractor_weights_path))

    @staticmethod
    def get_provided_features_list():
        return ("features", "logits")

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return {"isc": "logits", "fid": "features", "kid": "features", "prc": "features"}[metric]

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 3, 32, 32, dtype=torch.uint8)

    def forward(self, x):
        dev = next(self.net.parameters()).device
        feats, logits = self.net(_prepare(x.to(dev), self.meta["channels"], self.meta["resolution"]))
        out = {"features": feats, "logits": logits}
        return tuple(out[f].float() for f in self.features_list)


def register() -> None:
    if NAME not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(NAME, ClassifierFeatureExtractor)


def train_feature_net(
    data: Path,
    out: Path,
    epochs: int = 3,
    batch: int = 256,
    lr: float = 2e-3,
    seed: int = 0,
    device: str = "cpu",
    max_images: int | None = None,
    width: int = 32,
    feature_dim: int = 256,
    log=print,
) -> dict:
    """Train the classifier; hold out 5% of the data for the reported accuracy."""
    ds = open_dataset(data, use_labels=True, max_images=max_images)
    if ds.labels is None:
        raise UserError(f"{data}: train-features needs a labelled dataset (labels for every image)")
    c, res, _ = ds.shape()
    n = len(ds)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g)
    n_val = max(1, n // 20)
    val_idx, train_idx = perm[:n_val], perm[n_val:]
    torch.manual_seed(seed)
    net = FeatureNet(c, ds.num_classes, width, feature_dim).to(device)
    steps_per_epoch = max(1, len(train_idx) // batch)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=epochs * steps_per_epoch)
    loader_kw = dict(batch_size=batch, num_workers=2, drop_last=True, persistent_workers=False)
    t0 = time.time()
    for epoch in range(epochs):
        net.train()
        order = train_idx[torch.randperm(len(train_idx), generator=g)]
        loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, order.tolist()), **loader_kw)
        for x, y in track(
            loader,
            steps_per_epoch * batch,
            f"train-features epoch {epoch + 1}/{epochs}",
            "img",
            step=lambda b: len(b[0]),
        ):
            x = _prepare(x, c, res).to(device)
            if torch.rand((), generator=g) < 0.5 and c == 3:  # flips for natural images only
                x = x.flip(3)
            loss = F.cross_entropy(net(x)[1], y.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        acc = evaluate_accuracy(net, ds, val_idx, c, res, device)
        log(
            f"epoch {epoch + 1}/{epochs}: loss {loss.item():.4f}, held-out accuracy {acc:.4f} ({time.time() - t0:.0f}s)"
        )
    meta = {
        "kind": KIND,
        "channels": c,
        "resolution": res,
        "num_classes": ds.num_classes,
        "width": width,
        "feature_dim": feature_dim,
        "dataset": str(data),
        "images": n,
        "held_out_accuracy": acc,
        "epochs": epochs,
    }
    atomic_save_safetensors(
        out, {k: v.detach().cpu() for k, v in net.state_dict().items()}, {"emdctl": json.dumps(meta)}
    )
    return {**meta, "path": str(out), "sha256": sha256_file(out)}


@torch.no_grad()
def evaluate_accuracy(net, ds, idx, c, res, device, batch=512) -> float:
    net.eval()
    correct = 0
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, idx.tolist()), batch_size=batch)
    for x, y in loader:
        correct += int((net(_prepare(x, c, res).to(device))[1].argmax(1).cpu() == y).sum())
    return correct / len(idx)
