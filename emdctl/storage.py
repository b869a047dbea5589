"""Files that must never be half-written, and model directories.

* `atomic_write`: write to a temporary file in the same directory, fsync, rename over the target,
  fsync the directory. A crash or a full disk leaves either the old file or the new one, never a
  torn one, and no temporary file behind.
* Model directories (diffusers-style `from_pretrained`): `model.safetensors` + `config.json`.
  Loading reads tensors with safetensors and JSON with json: no code from the files ever runs.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import UserError

MODEL_FORMAT = "emdctl-model"
MODEL_FORMAT_VERSION = 1
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def as_umask_allows(path: Path | str, directory: bool = False) -> None:
    """mkstemp/mkdtemp create owner-only files (0600/0700); what emdctl writes gets the permissions
    any other program's output gets under the user's umask (typically 0644/0755)."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


@contextlib.contextmanager
def atomic_path(target: Path | str) -> Iterator[Path]:
    """Yield a temporary path beside `target`; on success it is fsynced and renamed onto `target`.
    On any failure (including a full disk) the temporary file is removed and the error re-raised."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        as_umask_allows(tmp_path)  # after the writer: some (safetensors) replace the file they are given
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, target)
        _fsync_dir(target.parent)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp_path.unlink()
        if isinstance(e, OSError) and not e.filename:  # name the file the error is about
            raise OSError(e.errno, e.strerror or str(e), str(target)) from None
        raise


def atomic_write(target: Path | str, data: bytes | str) -> None:
    payload = data.encode("utf-8") if isinstance(data, str) else data
    with atomic_path(target) as tmp, open(tmp, "wb") as f:
        f.write(payload)


def atomic_write_json(target: Path | str, obj) -> None:
    atomic_write(target, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_save_safetensors(target: Path | str, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    with atomic_path(target) as tmp:
        try:
            save_file(cpu, str(tmp), metadata=metadata)
        except SafetensorError as e:  # safetensors reports I/O failures (a full disk) as its own error
            no_space = "No space" in str(e) or "os error 28" in str(e)
            raise OSError(errno.ENOSPC if no_space else errno.EIO, str(e)[:200], str(target)) from None


def sha256_file(path: Path | str, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def host_memory_available() -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def read_safetensors(path: Path | str, what: str = "file") -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file, refused with one line when it is damaged or when what it
    declares would not fit in memory (a sparse file can claim gigabytes it never wrote)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such {what}")
    size = path.stat().st_size
    free = host_memory_available()
    if free is not None and size > free:
        raise UserError(
            f"{path}: {size / 2**30:.1f} GiB, more than the {free / 2**30:.1f} GiB of memory available; "
            f"not an emdctl {what} this machine can read"
        )
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise UserError(f"{path}: corrupt or truncated {what} ({str(e)[:200]}); restore or re-create it") from None
    except MemoryError:
        raise UserError(f"{path}: does not fit in memory; not an emdctl {what} this machine can read") from None


def read_safetensors_metadata(path: Path | str, what: str = "file") -> dict[str, str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise UserError(f"{path}: corrupt or truncated {what} ({e}); restore or re-create it") from None


def read_json(path: Path | str, what: str = "file") -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such {what}")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: unreadable {what} ({e})") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path}: expected a JSON object in the {what}")
    return obj


class DirectoryLock:
    """An exclusive lock on a directory that one emdctl process fills (a run, a sample folder). The
    lock file sits beside the directory (`.NAME.lock`, holding the pid), so the directory itself can
    be moved aside (`--force`) while the lock is held; a second process is refused at once with one
    line naming the holder's pid."""

    def __init__(self, directory: Path | str, what: str = "directory"):
        self.directory = Path(directory)
        self.what = what
        self.path = self.directory.parent / f".{self.directory.name}.lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        self.directory.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise UserError(
                f"{self.directory}: another emdctl process (pid {holder}) is using this {self.what}; wait for it "
                "or stop it (Ctrl-C, or kill -TERM PID)"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> DirectoryLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> bool:
        self.release()
        return False


def move_aside(directory: Path) -> Path:
    """Rename `directory` to NAME.replaced-TIME beside it (never delete what a user made)."""
    aside = directory.with_name(f"{directory.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
    n = 1
    while aside.exists():
        aside = directory.with_name(f"{directory.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}-{n}")
        n += 1
    os.replace(directory, aside)
    return aside


# --------------------------------------------------------------------------------------------
# Model directories


def save_model_dir(directory: Path | str, state: dict[str, torch.Tensor], config: dict) -> Path:
    """Write weights + config into `directory` atomically (built beside it, then renamed in)."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise UserError(f"{directory}: exists and is not a directory; give a folder for the model")
    directory.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(directory)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.staging-{os.getpid()}-", dir=directory.parent))
    as_umask_allows(staging, directory=True)
    try:
        cfg = {"format": MODEL_FORMAT, "format_version": MODEL_FORMAT_VERSION, **config}
        atomic_save_safetensors(staging / WEIGHTS_NAME, state, {"format": MODEL_FORMAT})
        cfg["weights_sha256"] = sha256_file(staging / WEIGHTS_NAME)
        atomic_write_json(staging / CONFIG_NAME, cfg)
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(directory, old)
            os.replace(staging, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, directory)
        _fsync_dir(directory.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory


def _remove_stale_staging(directory: Path) -> None:
    """Staging folders left by a save that was killed (their process is gone)."""
    for old in directory.parent.glob(f".{directory.name}.staging-*"):
        try:
            pid = int(old.name.split(".staging-", 1)[1].split("-", 1)[0])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(old, ignore_errors=True)
        except (ValueError, PermissionError, IndexError):
            pass


def load_model_dir(directory: Path | str, expect_kind: str | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    directory = Path(directory)
    if not directory.exists():
        raise UserError(f"{directory}: no such model directory")
    if not directory.is_dir():
        raise UserError(f"{directory}: expected an emdctl model directory (model.safetensors + config.json)")
    config = read_json(directory / CONFIG_NAME, "model config")
    if config.get("format") != MODEL_FORMAT:
        raise UserError(f"{directory / CONFIG_NAME}: not an emdctl model config (format {config.get('format')!r})")
    if expect_kind and config.get("kind") != expect_kind:
        raise UserError(f"{directory}: holds a {config.get('kind')!r}, expected a {expect_kind!r}")
    weights = directory / WEIGHTS_NAME
    want = config.get("weights_sha256")
    if want and weights.is_file() and sha256_file(weights) != want:
        raise UserError(f"{weights}: checksum mismatch with config.json (corrupt file); re-export or re-convert it")
    return config, read_safetensors(weights, "model weights")


def load_state_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """load_state_dict(strict=True) with a one-line error naming the first mismatch."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (first: {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (first: {unexpected[0]})")
        raise UserError(f"{source}: weights do not fit this architecture: {'; '.join(parts)}")
    for k, v in own.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise UserError(
                f"{source}: weights do not fit this architecture: {k} has shape {tuple(state[k].shape)}, "
                f"expected {tuple(v.shape)}"
            )
    module.load_state_dict({k: state[k].to(v.dtype) for k, v in own.items()}, strict=True)


def first_nonfinite(module: torch.nn.Module) -> str | None:
    """The name of the first floating-point tensor of `module` holding NaN/inf, or None."""
    for key, t in module.state_dict().items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return key
    return None


def module_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in module.state_dict().items()}
