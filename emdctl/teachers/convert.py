"""`emdctl teacher convert`: an official EDM pickle -> an emdctl model directory, once."""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from ..hub import OFFICIAL_EDM, fetch
from . import save_pretrained_denoiser
from .edm_pickle import load_edm_pickle


def resolve_source(source: str, sha256: str | None = None) -> Path:
    """A local path, a URL (downloaded into the cache), or an official name like edm-imagenet-64x64-cond-adm."""
    if source in OFFICIAL_EDM:
        return fetch(OFFICIAL_EDM[source], sha256, "EDM teacher pickle", local="SOURCE (a local .pkl path)")
    if source.startswith(("http://", "https://")):
        return fetch(source, sha256, "EDM teacher pickle", local="SOURCE (a local .pkl path)")
    path = Path(source)
    if not path.exists():
        known = ", ".join(OFFICIAL_EDM)
        raise UserError(f"{source}: no such file (give a path, a URL, or an official name: {known})")
    return path


def convert_edm_pickle(source: str, out_dir: Path, sha256: str | None = None) -> Path:
    path = resolve_source(source, sha256)
    den = load_edm_pickle(path)
    return save_pretrained_denoiser(den, Path(out_dir), {"converted_from": str(source)})
