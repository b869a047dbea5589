"""Datasets emdctl reads: NVlabs/edm's dataset zip, image folders, MNIST idx files, npz arrays.

Images are read on demand (streaming): a zip or folder is opened lazily in each worker process,
MNIST idx files are decompressed once into the cache and memory-mapped, so nothing holds the
whole set in RAM. Every dataset yields (uint8 tensor [C, H, W], label or -1).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import zipfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .conditioning import jsonl_strings
from .errors import UserError
from .rng import derive_seed

IMAGE_EXT = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class ImageDataset(torch.utils.data.Dataset):
    name = "dataset"

    def __init__(self, path: Path, max_images: int | None = None):
        self.path = Path(path)
        self.max_images = max_images
        self.labels: np.ndarray | None = None
        self._n = 0

    def __len__(self):
        return self._n if self.max_images is None else min(self._n, self.max_images)

    def _limit(self, n: int) -> None:
        if n == 0:
            raise UserError(f"{self.path}: the dataset holds no images")
        self._n = n

    @property
    def num_classes(self) -> int:
        return int(self.labels.max()) + 1 if self.labels is not None and len(self.labels) else 0

    def image(self, i: int) -> np.ndarray:  # HWC uint8
        raise NotImplementedError

    def __getitem__(self, i: int):
        if not 0 <= i < len(self):
            raise IndexError(i)
        arr = self.image(i)
        if arr.ndim == 2:
            arr = arr[:, :, None]
        label = int(self.labels[i]) if self.labels is not None else -1
        return torch.from_numpy(np.array(arr.transpose(2, 0, 1))), label

    def shape(self) -> tuple[int, int, int]:
        x, _ = self[0]
        return tuple(x.shape)


def _decode(data: bytes, where: str) -> np.ndarray:
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except Exception as e:  # noqa: BLE001 - PIL raises many types for bad images
        raise UserError(f"{where}: not a readable image ({e.__class__.__name__})") from None
    if img.mode not in ("L", "RGB"):
        img = img.convert("RGB")
    return np.asarray(img)


class EDMZipDataset(ImageDataset):
    """NVlabs/edm dataset_tool layout: NNNNN/imgNNNNNNNN.png + dataset.json {"labels": [[name, cls], ...]}."""

    name = "edm-zip"

    def __init__(self, path: Path, max_images=None, use_labels=True):
        super().__init__(path, max_images)
        try:
            with zipfile.ZipFile(self.path) as z:
                names = sorted(n for n in z.namelist() if n.lower().endswith(IMAGE_EXT))
                meta = json.loads(z.read("dataset.json")) if "dataset.json" in z.namelist() else {}
        except (zipfile.BadZipFile, OSError, json.JSONDecodeError) as e:
            raise UserError(f"{self.path}: not a readable dataset zip ({e})") from None
        self.names = names
        self._zip = None
        self._zip_pid = None
        self._limit(len(names))
        labels = (meta or {}).get("labels")
        if use_labels and labels:
            table = dict(labels)
            missing = [n for n in names[:10] if n not in table]
            if missing:
                raise UserError(f"{self.path}: dataset.json has no label for {missing[0]}")
            self.labels = np.asarray([table[n] for n in names], dtype=np.int64)

    def __getstate__(self):
        return {**self.__dict__, "_zip": None}  # each DataLoader worker opens its own handle

    def image(self, i):
        # A handle inherited through fork shares its file offset with the parent: reopen per process.
        if self._zip is None or self._zip_pid != os.getpid():
            self._zip = zipfile.ZipFile(self.path)
            self._zip_pid = os.getpid()
        return _decode(self._zip.read(self.names[i]), f"{self.path}:{self.names[i]}")


class FolderDataset(ImageDataset):
    name = "folder"

    def __init__(self, path: Path, max_images=None, use_labels=True):
        super().__init__(path, max_images)
        # Hidden files and folders (.preview/ of `emdctl sample`, .shards/) hold no samples.
        files = sorted(
            p
            for p in self.path.rglob("*")
            if p.suffix.lower() in IMAGE_EXT
            and not any(part.startswith(".") for part in p.relative_to(self.path).parts)
        )
        self.files = files
        self._limit(len(files))
        self._check_one_size()
        meta = self.path / "dataset.json"
        if use_labels and meta.is_file():
            table = dict(json.loads(meta.read_text()).get("labels") or [])
            rel = [f.relative_to(self.path).as_posix() for f in files]
            if table and all(r in table for r in rel):
                self.labels = np.asarray([table[r] for r in rel], dtype=np.int64)

    def _check_one_size(self) -> None:
        """Every image the same size and channel count (read from the headers only), so that a stray
        file (an old preview grid, a thumbnail) is named up front instead of breaking a batch."""
        first = None
        for f in self.files[: len(self)]:
            try:
                with Image.open(f) as im:
                    key = (im.size, 1 if im.mode == "L" else 3)
            except Exception as e:  # noqa: BLE001 - PIL raises many types for bad images
                raise UserError(f"{f}: not a readable image ({e.__class__.__name__})") from None
            if first is None:
                first = (f, key)
            elif key != first[1]:
                (w0, h0), c0 = first[1]
                (w, h), c = key
                raise UserError(
                    f"{self.path}: images of different sizes ({first[0].name}: {c0}x{h0}x{w0}, {f}: {c}x{h}x{w}); "
                    "an image folder holds one size: move the odd files out"
                )

    def image(self, i):
        return _decode(self.files[i].read_bytes(), str(self.files[i]))


def _read_idx_header(raw: bytes, where: str) -> tuple[int, tuple]:
    if len(raw) < 8 or raw[0] != 0 or raw[1] != 0:
        raise UserError(f"{where}: not an idx file")
    dtype_code, ndim = raw[2], raw[3]
    if dtype_code != 0x08:
        raise UserError(f"{where}: only uint8 idx files are supported")
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return 4 + 4 * ndim, dims


class MNISTDataset(ImageDataset):
    """LeCun's idx files (optionally .gz), memory-mapped from a decompressed copy in the cache."""

    name = "mnist"

    def __init__(self, path: Path, max_images=None, use_labels=True, split="train"):
        path = Path(path)
        if path.is_dir():
            candidates = [
                path / f"{split if split == 'train' else 't10k'}-images-idx3-ubyte{ext}" for ext in (".gz", "")
            ]
            found = [c for c in candidates if c.exists()]
            if not found:
                raise UserError(f"{path}: no {candidates[0].name} in this directory")
            path = found[0]
        super().__init__(path, max_images)
        self.images = self._memmap(path)
        if self.images.ndim != 3:
            raise UserError(f"{path}: expected an idx3 image file, got {self.images.ndim} dimensions")
        self._limit(self.images.shape[0])
        label_file = Path(str(path).replace("images-idx3", "labels-idx1"))
        if use_labels and label_file != path and label_file.exists():
            labels = self._memmap(label_file)
            if len(labels) != len(self.images):
                raise UserError(f"{label_file}: {len(labels)} labels for {len(self.images)} images")
            self.labels = np.asarray(labels, dtype=np.int64)

    @staticmethod
    def _memmap(path: Path) -> np.ndarray:
        from .hub import cache_dir

        opener = gzip.open if path.suffix == ".gz" else open
        try:
            with opener(path, "rb") as f:
                head = f.read(16)
        except (OSError, EOFError) as e:
            raise UserError(f"{path}: unreadable idx file ({e})") from None
        offset, dims = _read_idx_header(head, str(path))
        if path.suffix != ".gz":
            raw_path = path
        else:
            key = hashlib.sha256(
                f"{path.resolve()}:{path.stat().st_size}:{path.stat().st_mtime_ns}".encode()
            ).hexdigest()[:16]
            raw_path = cache_dir() / "idx" / f"{path.stem}-{key}"
            if not raw_path.exists():
                from .storage import atomic_path

                try:
                    with gzip.open(path, "rb") as src, atomic_path(raw_path) as tmp, open(tmp, "wb") as dst:
                        while block := src.read(1 << 22):
                            dst.write(block)
                except (OSError, EOFError, gzip.BadGzipFile) as e:
                    raise UserError(f"{path}: corrupt or truncated gzip ({e})") from None
        expected = offset + int(np.prod(dims))
        if raw_path.stat().st_size < expected:
            raise UserError(f"{path}: truncated idx file ({raw_path.stat().st_size} of {expected} bytes)")
        return np.memmap(raw_path, dtype=np.uint8, mode="r", offset=offset, shape=dims)

    def image(self, i):
        return np.asarray(self.images[i])


class NpzDataset(ImageDataset):
    """arr_0 = uint8 [N, H, W, C] (ADM/EDM evaluation layout), optional arr_1 = labels."""

    name = "npz"

    def __init__(self, path: Path, max_images=None, use_labels=True):
        super().__init__(path, max_images)
        if not zipfile.is_zipfile(self.path):
            raise UserError(
                f"{self.path}: not an npz file (a zip of .npy arrays, e.g. from `emdctl sample --format npz`)"
            )
        try:
            z = np.load(self.path, mmap_mode="r", allow_pickle=False)
            arr = z["arr_0"] if "arr_0" in z else z[z.files[0]]
        except (OSError, ValueError, KeyError, IndexError, zipfile.BadZipFile) as e:
            raise UserError(f"{self.path}: not a readable npz of images ({e})") from None
        if arr.ndim != 4 or arr.shape[-1] not in (1, 3) or arr.dtype != np.uint8:
            raise UserError(f"{self.path}: arr_0 must be uint8 [N, H, W, C] with C 1 or 3, got {arr.dtype} {arr.shape}")
        self.arr = arr
        self._limit(arr.shape[0])
        if use_labels and "arr_1" in z:
            self.labels = np.asarray(z["arr_1"], dtype=np.int64)

    def image(self, i):
        return np.asarray(self.arr[i])


def detect_format(path: Path) -> str:
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such dataset")
    if path.is_dir():
        if any(path.glob("*-images-idx3-ubyte*")):
            return "mnist"
        return "folder"
    name = path.name.lower()
    if name.endswith(".zip"):
        return "edm-zip"
    if name.endswith(".npz"):
        return "npz"
    if "idx3-ubyte" in name:
        return "mnist"
    raise UserError(f"{path}: unknown dataset format (expected an EDM .zip, an image folder, MNIST idx files or .npz)")


FORMATS = {"edm-zip": EDMZipDataset, "folder": FolderDataset, "mnist": MNISTDataset, "npz": NpzDataset}


def member_names(ds: ImageDataset) -> list[str] | None:
    """Each image's name inside the dataset (a zip member, or a path relative to the folder), in
    dataset order; None for formats without names (MNIST idx, npz)."""
    if isinstance(ds, EDMZipDataset):
        return list(ds.names[: len(ds)])
    if isinstance(ds, FolderDataset):
        return [f.relative_to(ds.path).as_posix() for f in ds.files[: len(ds)]]
    return None


def caption_indices(ds: ImageDataset, captions: Path, what: str = "method.data.captions") -> np.ndarray:
    """For each image of `ds`, the line (0-based, blank lines skipped) of the captions JSONL naming it."""
    names = member_names(ds)
    if names is None:
        raise UserError(f"{what}: {ds.path} has no file names to match captions to; use an image folder or zip")
    table = {name: i for i, name in enumerate(jsonl_strings(Path(captions), "file", what))}
    missing = [n for n in names if n not in table]
    if missing:
        raise UserError(f"{what}: {captions} has no caption for {len(missing)} of {len(names)} images "
                        f"(first: {missing[0]})")  # fmt: skip
    return np.asarray([table[n] for n in names], dtype=np.int64)


def open_dataset(
    path: Path, fmt: str = "auto", use_labels: bool = True, max_images: int | None = None, resolution: int | None = None
) -> ImageDataset:
    fmt = detect_format(path) if fmt == "auto" else fmt
    ds = FORMATS[fmt](Path(path), max_images=max_images, use_labels=use_labels)
    c, h, w = ds.shape()
    if h != w:
        raise UserError(f"{path}: images must be square, the first is {h}x{w}")
    if resolution is not None and h != resolution:
        raise UserError(f"{path}: images are {h}x{w}, the recipe expects {resolution}x{resolution}")
    return ds


class EpochPermutations:
    """Sample number -> dataset index, a fresh permutation per epoch (cached, a few at a time)."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed
        self._cache: dict[int, torch.Tensor] = {}

    def __call__(self, g: int) -> int:
        epoch = g // self.n
        if epoch not in self._cache:
            gen = torch.Generator().manual_seed(derive_seed(self.seed, epoch, "data-order"))
            self._cache = {epoch: torch.randperm(self.n, generator=gen)}
        return int(self._cache[epoch][g % self.n])


class IterationBatches(torch.utils.data.Sampler):
    """Yields, for iterations start, start+1, ..., the dataset indices of each of this rank's micro-batches."""

    def __init__(self, n: int, seed: int, global_batch: int, rows_per_micro: list[slice], start: int):
        self.order = EpochPermutations(n, seed)
        self.global_batch, self.rows, self.start = global_batch, rows_per_micro, start

    def __iter__(self):
        it = self.start
        while True:
            for rows in self.rows:
                base = it * self.global_batch
                yield [self.order(base + r) for r in range(rows.start, rows.stop)]
            it += 1


class IterationLoader:
    """The real images of each iteration's micro-batches (this rank's), streamed by a DataLoader
    with worker processes. Which images is a function of (seed, global sample number) only; with
    `xflip`, whether each is mirrored is a function of its row's draw from `flip_stream`."""

    def __init__(self, dataset: ImageDataset, seed: int, batching, device: torch.device, xflip: bool, flip_stream: str):
        self.dataset, self.seed, self.batching, self.device = dataset, seed, batching, device
        self.xflip, self.flip_stream = xflip, flip_stream
        self._iter = None
        self._next = None

    def batches(self, iteration: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """[(uint8 images [n, C, H, W], labels [n] or -1)] for each of this rank's micro-batches."""
        if self._iter is None or self._next != iteration:
            sampler = IterationBatches(
                len(self.dataset), self.seed, self.batching.global_size, self.batching.micro_rows(), iteration
            )
            workers = 2 if self.device.type == "cpu" else 6
            loader = torch.utils.data.DataLoader(
                self.dataset,
                batch_sampler=sampler,
                num_workers=workers,
                pin_memory=self.device.type == "cuda",
                prefetch_factor=4,
                persistent_workers=False,
            )
            self._iter = iter(loader)
        self._next = iteration + 1
        return [next(self._iter) for _ in self.batching.micro_rows()]

    def images(self, iteration: int, draws) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """[(images in the model's range [-1, 1], flipped as drawn; labels on the device)] per
        micro-batch of this rank (`draws`: the iteration's rng.IterationDraws)."""
        out = []
        for rows, (x_u8, y) in zip(self.batching.micro_rows(), self.batches(iteration), strict=True):
            x = to_model_range(x_u8.to(self.device, non_blocking=True))
            if self.xflip:
                flip = draws.uniform(self.flip_stream, (self.batching.global_size,), rows) < 0.5
                x = torch.where(flip[:, None, None, None], x.flip(3), x)
            out.append((x, y.to(self.device)))
        return out


class ImagesOnly(torch.utils.data.Dataset):
    """torch-fidelity wants datasets of uint8 tensors only."""

    def __init__(self, ds: ImageDataset):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        return self.ds[i][0]


def to_model_range(x_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1] (EDM's convention)."""
    return x_uint8.to(torch.float32) / 127.5 - 1
