"""Downloads of official weights into a cache, verified by checksum.

Files land in $EMDCTL_CACHE (default ~/.cache/emdctl) under their URL's file name. A file is
downloaded once: streamed to a temporary file, hashed on the way, checked against the expected
sha256 when one is known, then renamed into place; the hash is recorded beside it and checked
again on every later use. With EMDCTL_OFFLINE=1, or when the network fails, the error says which
URL to fetch and exactly where to put the file.
"""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

from .errors import UserError
from .storage import atomic_path, atomic_write, sha256_file

# Official NVlabs/edm checkpoints (https://github.com/NVlabs/edm#pre-trained-models).
EDM_BASE = "https://nvlabs-fi-cdn.nvidia.com/edm/pretrained"
OFFICIAL_EDM = {
    "edm-cifar10-32x32-cond-vp": f"{EDM_BASE}/edm-cifar10-32x32-cond-vp.pkl",
    "edm-cifar10-32x32-uncond-vp": f"{EDM_BASE}/edm-cifar10-32x32-uncond-vp.pkl",
    "edm-cifar10-32x32-cond-ve": f"{EDM_BASE}/edm-cifar10-32x32-cond-ve.pkl",
    "edm-cifar10-32x32-uncond-ve": f"{EDM_BASE}/edm-cifar10-32x32-uncond-ve.pkl",
    "edm-imagenet-64x64-cond-adm": f"{EDM_BASE}/edm-imagenet-64x64-cond-adm.pkl",
    "edm-ffhq-64x64-uncond-vp": f"{EDM_BASE}/edm-ffhq-64x64-uncond-vp.pkl",
    "edm-afhqv2-64x64-uncond-vp": f"{EDM_BASE}/edm-afhqv2-64x64-uncond-vp.pkl",
}


def cache_dir() -> Path:
    return Path(os.environ.get("EMDCTL_CACHE") or Path.home() / ".cache" / "emdctl")


def offline() -> bool:
    return os.environ.get("EMDCTL_OFFLINE", "") not in ("", "0", "false", "no")


def cached_path_for(url: str) -> Path:
    name = Path(urlparse(url).path).name
    if not name:
        raise UserError(f"{url}: the URL names no file")
    return cache_dir() / name


def _matches(actual: str, expected: str | None) -> bool:
    """A full sha256, or a prefix of one (torchvision's and timm's file names carry the first 8 hex
    digits, e.g. efficientnet_b0_rwightman-7f5810bc.pth)."""
    return not expected or actual.startswith(expected.lower())


def _verify(path: Path, expected: str | None) -> None:
    actual = sha256_file(path)
    record = path.with_name(path.name + ".sha256")
    if not _matches(actual, expected):
        raise UserError(
            f"{path}: sha256 {actual} does not match the expected {expected}; delete the file to download it again"
        )
    if record.is_file():
        recorded = record.read_text().split()[0] if record.read_text().strip() else ""
        if recorded and recorded != actual:
            raise UserError(
                f"{path}: changed since it was downloaded (sha256 {actual} != recorded {recorded}); delete it"
            )
    else:
        atomic_write(record, f"{actual}  {path.name}\n")


def fetch(url: str, sha256: str | None = None, what: str = "file", local: str | None = None) -> Path:
    """Return the local path of `url`, downloading it into the cache on first use. `sha256` is the
    expected digest or a prefix of it; `local` names the recipe field or option that takes a local
    copy instead (said in the error when the file cannot be had)."""
    path = cached_path_for(url)
    if path.is_file():
        _verify(path, sha256)
        return path
    instead = f", or set {local} to a local copy" if local else ""
    hint = f"download {url} on a machine with internet access and put it at {path}{instead}"
    if offline():
        raise UserError(f"the {what} is not in the cache and EMDCTL_OFFLINE is set: {hint}")
    path.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=60) as resp, atomic_path(path) as tmp, open(tmp, "wb") as out:
            while block := resp.read(1 << 20):
                digest.update(block)
                out.write(block)
            if not _matches(digest.hexdigest(), sha256):
                raise UserError(f"{url}: downloaded file has sha256 {digest.hexdigest()}, expected {sha256}")
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        raise UserError(f"cannot download the {what} ({e.__class__.__name__}: {e}): {hint}") from None
    atomic_write(path.with_name(path.name + ".sha256"), f"{digest.hexdigest()}  {path.name}\n")
    return path
