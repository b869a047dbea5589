"""`emdctl evaluate fid|kid|isc|prc|all`: sample-quality metrics through torch-fidelity.

Feature spaces are torch-fidelity feature extractors: 'inception' (Inception-v3, the published-FID
network; emdctl.evaluation.inception) or 'classifier:PATH' (an emdctl-trained classifier that works
offline; emdctl.evaluation.classifier). Metrics are torch-fidelity's own functions applied to the
extracted features, so the numbers are torch-fidelity's.

Inputs: a folder of images, an npz, an EDM dataset zip, MNIST idx files, or a generator (a run or
model directory), whose images are made per seed in memory and never written. References: any
dataset, or reference statistics cached by `emdctl evaluate ref`. EDM's protocol: several seed
ranges (e.g. --seeds 0-49999 --seeds 50000-99999 --seeds 100000-149999), reported as min and mean.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, isc_features_to_metric
from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric
from torch_fidelity.metric_prc import KEY_METRIC_PRECISION, KEY_METRIC_RECALL, prc_features_to_metric
from torch_fidelity.utils import create_feature_extractor

from ..data import ImagesOnly, open_dataset
from ..errors import UserError
from ..hub import cache_dir
from ..progress import Progress, track
from ..storage import atomic_save_safetensors, read_safetensors, read_safetensors_metadata, sha256_file
from . import classifier, inception

METRICS = ("fid", "kid", "isc", "prc")


@dataclass
class FeatureSpace:
    extractor: torch.nn.Module
    name: str  # torch-fidelity registry name
    distance_layer: str
    logits_layer: str
    ident: str  # identifies the exact weights (for reference caches)
    label: str  # what every output calls the FD in this space
    comparable: bool  # comparable to published FID numbers?
    device: torch.device = torch.device("cpu")
    input_shape: tuple[int, int, int] | None = None  # images it was trained on (None: any, resized)
    dim: int = 2048  # of the distance layer

    def extract_batched(self, x_uint8: torch.Tensor, batch: int = 256) -> dict[str, torch.Tensor]:
        parts: dict[str, list] = {}
        for i in range(0, len(x_uint8), batch):
            for k, v in self.extract(x_uint8[i : i + batch]).items():
                parts.setdefault(k, []).append(v)
        return {k: torch.cat(v) for k, v in parts.items()}

    def extract(self, x_uint8: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            feats = self.extractor(x_uint8.to(self.device))
        return {k: v.detach().cpu() for k, v in self.extractor.convert_features_tuple_to_dict(feats).items()}


def open_feature_space(spec: str, inception_weights: Path | None = None, device="cpu") -> FeatureSpace:
    device = torch.device(device)
    cuda = device.type == "cuda"
    if spec == "inception":
        inception.register()
        path = inception.resolve_weights(inception_weights)
        fx = create_feature_extractor(
            inception.NAME,
            ["2048", "logits_unbiased"],
            cuda=cuda,
            feature_extractor_weights_path=str(path),
            verbose=False,
        )
        return FeatureSpace(
            fx,
            inception.NAME,
            "2048",
            "logits_unbiased",
            f"inception-{sha256_file(path)[:12]}",
            "FID (Inception-v3)",
            True,
            device,
        )
    if spec.startswith("classifier:"):
        path = Path(spec.split(":", 1)[1])
        if not path.is_file():
            raise UserError(f"{path}: no such feature file (make one with `emdctl evaluate train-features`)")
        classifier.register()
        fx = create_feature_extractor(
            classifier.NAME, ["features", "logits"], cuda=cuda, feature_extractor_weights_path=str(path), verbose=False
        )
        data = Path(fx.meta.get("dataset", "?")).name
        label = f"FD_classifier (emdctl classifier features trained on {data}; not comparable to published FID)"
        m = fx.meta
        return FeatureSpace(
            fx, classifier.NAME, "features", "logits", f"classifier-{sha256_file(path)[:12]}", label, False, device,
            input_shape=(m["channels"], m["resolution"], m["resolution"]), dim=m["feature_dim"],
        )  # fmt: skip
    raise UserError(f"feature space {spec!r}: expected 'inception' or 'classifier:PATH'")


# --------------------------------------------------------------------------------------------
# Inputs


def features_of_dataset(fs: FeatureSpace, ds, batch: int, n: int | None = None, desc="features") -> dict:
    total = len(ds) if n is None else min(n, len(ds))
    # Worker processes pay off for decoding images (zip, folder); arrays are read faster in-process.
    workers = 2 if ds.name in ("edm-zip", "folder") and total > 4 * batch else 0
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(ImagesOnly(ds), range(total)), batch_size=batch, num_workers=workers
    )
    parts: dict[str, list] = {}
    for x in track(loader, total, f"{desc} ({fs.name})", "img", step=len):
        for k, v in fs.extract(x).items():
            parts.setdefault(k, []).append(v)
    return {k: torch.cat(v) for k, v in parts.items()}


def features_of_generator(
    fs: FeatureSpace, gen, seeds: list[int], batch: int, device, steps: int | None = None
) -> dict:
    """Images made in memory exactly as `emdctl sample` makes them (same per-seed random numbers,
    same chunks, same pixels)."""
    from ..plots import to_uint8
    from ..sampling import generator_sampler, in_chunks

    make = generator_sampler(gen, steps, None, device)
    parts: dict[str, list] = {}
    with torch.no_grad(), Progress(len(seeds), f"generating + features ({fs.name})", "img") as progress:
        for b in range(0, len(seeds), batch):
            x, _ = in_chunks(make, seeds[b : b + batch])
            for k, v in fs.extract(to_uint8(x)).items():
                parts.setdefault(k, []).append(v)
            progress.advance(len(x))
    return {k: torch.cat(v) for k, v in parts.items()}


# --------------------------------------------------------------------------------------------
# References


@dataclass
class Reference:
    mu: np.ndarray
    sigma: np.ndarray
    features: torch.Tensor | None  # distance-layer features, for KID and precision/recall
    meta: dict = field(default_factory=dict)


def reference_from_features(feats: dict, fs: FeatureSpace, meta: dict) -> Reference:
    stats = fid_features_to_statistics(feats[fs.distance_layer].double())
    return Reference(stats["mu"], stats["sigma"], feats[fs.distance_layer], {**meta, "features_ident": fs.ident})


def save_reference(ref: Reference, path: Path) -> Path:
    tensors = {"mu": torch.from_numpy(ref.mu), "sigma": torch.from_numpy(ref.sigma)}
    if ref.features is not None:
        tensors["features"] = ref.features.float()
    atomic_save_safetensors(path, tensors, {"emdctl": json.dumps({"kind": "emdctl-reference", **ref.meta})})
    return Path(path)


def load_reference(path: Path, fs: FeatureSpace) -> Reference:
    meta = json.loads(read_safetensors_metadata(path, "reference statistics").get("emdctl") or "{}")
    if meta.get("kind") != "emdctl-reference":
        raise UserError(f"{path}: not an emdctl reference-statistics file (make one with `emdctl evaluate ref`)")
    if meta.get("features_ident") != fs.ident:
        raise UserError(f"{path}: computed in feature space {meta.get('features_ident')}, not {fs.ident}; recompute it")
    t = read_safetensors(path, "reference statistics")
    return Reference(t["mu"].numpy(), t["sigma"].numpy(), t.get("features"), meta)


def reference_cache_path(dataset: Path, fs: FeatureSpace, n: int | None) -> Path:
    key = (
        sha256_file(dataset)[:12]
        if Path(dataset).is_file()
        else Path(dataset).resolve().as_posix().replace("/", "_")[-60:]
    )
    return cache_dir() / "refs" / f"{Path(dataset).stem}-{key}-{fs.ident}-{n or 'all'}.safetensors"


def get_reference(ref: Path, fs: FeatureSpace, batch: int, n: int | None, log=print) -> Reference:
    """Statistics of a reference: a file from `emdctl evaluate ref`, or a dataset's first n images
    (all with n None), computed once and cached."""
    ref = Path(ref)
    if not ref.exists():
        raise UserError(f"{ref}: no such reference dataset or statistics file")
    if ref.suffix == ".safetensors":
        r = load_reference(ref, fs)
        log(f"reference: {ref} (statistics of {r.meta.get('images', '?'):,} images of {r.meta.get('dataset', '?')})")
        return r
    ds = open_dataset(ref, use_labels=False)
    used = min(len(ds), n or len(ds))
    log(f"reference: {used:,} of the {len(ds):,} images of {ref}")
    cached = reference_cache_path(ref, fs, n if n is not None and n < len(ds) else None)
    if cached.exists():
        return load_reference(cached, fs)
    r = reference_of_dataset(fs, ds, ref, batch, used)
    save_reference(r, cached)
    return r


def reference_of_dataset(fs: FeatureSpace, ds, path: Path, batch: int, n: int) -> Reference:
    check_input_shape(fs, tuple(ds.shape()), str(path))
    feats = features_of_dataset(fs, ds, batch, n, "reference")
    return reference_from_features(feats, fs, {"dataset": str(path), "images": n, "img_shape": list(ds.shape())})


def check_input_shape(fs: FeatureSpace, shape: tuple, what: str) -> None:
    if fs.input_shape is not None and tuple(shape) != tuple(fs.input_shape):
        raise UserError(
            f"{what}: images are {_shape(shape)} but the feature space was trained on {_shape(fs.input_shape)} "
            "images; use features trained on this kind of data (or --features inception)"
        )


def _shape(shape) -> str:
    c, h, w = shape
    return f"{c}x{h}x{w} (channels x height x width)"


# --------------------------------------------------------------------------------------------
# Metrics


def compute_metrics(
    metrics: list[str],
    feats: dict,
    ref: Reference | None,
    fs: FeatureSpace,
    kid_subset_size: int = 1000,
    seed: int = 2020,
) -> dict:
    out: dict[str, float] = {}
    f1 = feats[fs.distance_layer]
    if "fid" in metrics:
        stats = fid_features_to_statistics(f1.double())
        out["fd"] = fid_statistics_to_metric(stats, {"mu": ref.mu, "sigma": ref.sigma}, False)[KEY_METRIC_FID]
    if ("kid" in metrics or "prc" in metrics) and ref.features is None:
        raise UserError("KID and precision/recall need reference features; the statistics file holds only mu/sigma")
    if "kid" in metrics:
        size = min(kid_subset_size, len(f1), len(ref.features))
        r = kid_features_to_metric(
            f1.double(), ref.features.double(), kid_subsets=100, kid_subset_size=size, rng_seed=seed, verbose=False
        )
        out["kid"], out["kid_std"] = r[KEY_METRIC_KID_MEAN], r[KEY_METRIC_KID_STD]
    if "prc" in metrics:
        r = prc_features_to_metric(
            f1, ref.features.float(), prc_neighborhood=3, prc_batch_size=10000, save_cpu_ram=False, verbose=False
        )
        out["precision"], out["recall"] = r[KEY_METRIC_PRECISION], r[KEY_METRIC_RECALL]
    if "isc" in metrics:
        out["is"] = isc_features_to_metric(feats[fs.logits_layer], splits=IS_SPLITS, shuffle=True, rng_seed=seed)[
            KEY_METRIC_ISC_MEAN
        ]
    return out


IS_SPLITS = 10
PRC_NEIGHBOURS = 3
KID_SUBSET = 1000


def sample_size_problems(metrics: list[str], n: int, n_ref: int | None, fs: FeatureSpace) -> list[str]:
    """Warnings for set sizes that make a metric misleading; UserError where it is undefined."""
    if "isc" in metrics and n < IS_SPLITS:
        raise UserError(f"IS splits the samples into {IS_SPLITS} parts: give at least {IS_SPLITS} images (got {n})")
    sizes = [("samples", n)] + ([("reference images", n_ref)] if n_ref is not None else [])
    for what, count in sizes:
        if any(m != "isc" for m in metrics) and count < PRC_NEIGHBOURS + 1:
            raise UserError(f"{count} {what}: distances between sets need at least {PRC_NEIGHBOURS + 1}")
    warnings = []
    if "fid" in metrics:
        small = [f"{count:,} {what}" for what, count in sizes if count < fs.dim]
        if small:
            warnings.append(
                f"FD from {' and '.join(small)} in a {fs.dim}-dimensional feature space: the covariance is "
                "rank-deficient and FD is biased upward; compare only numbers of equal set sizes "
                "(published FID: 50,000)"
            )
    if "kid" in metrics and min(c for _, c in sizes) < KID_SUBSET:
        warnings.append(
            f"KID from subsets of {min(c for _, c in sizes):,} images (fewer than {KID_SUBSET:,}): noisier "
            "and not comparable to KID from larger sets"
        )
    if "isc" in metrics and n < 5000:
        warnings.append(f"IS from {n:,} images (published IS: 50,000): biased low, compare only equal set sizes")
    return warnings


def source_kind(source: Path) -> str:
    if (source / "config.json").is_file() or (source / "checkpoints").is_dir() or (source / "generator").is_dir():
        return "generator"
    return "dataset"


def reference_images(reference: Reference | None) -> int | None:
    if reference is None:
        return None
    if reference.features is not None:
        return len(reference.features)
    return reference.meta.get("images")


def check_sides(fs: FeatureSpace, shape: tuple, what: str, reference: Reference | None, ref: Path | None) -> None:
    """The two sides must hold the same kind of images, and the feature space must fit them."""
    check_input_shape(fs, shape, what)
    ref_shape = reference.meta.get("img_shape") if reference is not None else None
    if ref_shape is not None and tuple(ref_shape) != tuple(shape):
        raise UserError(
            f"{what}: images are {_shape(shape)} but the reference {ref} holds {_shape(ref_shape)} images; "
            "compare like with like"
        )
