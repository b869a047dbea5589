"""Import official NVlabs/edm network pickles WITHOUT executing code from them.

EDM's pickles store each network class together with its Python source
(`torch_utils.persistence`); an ordinary `pickle.load` executes that source. Here a restricted
unpickler resolves only a fixed allow-list of globals: tensor/storage rebuilders (storages are
read with `torch.load(weights_only=True)`), plain containers, and stand-ins for the persisted
classes and for torch's container modules that merely record their state. Any other global
(`os.system`, `builtins.eval`, `subprocess.*`, ...) is refused before it can be called. The
recorded parameters and buffers are then mapped onto emdctl's own modules with strict name and
shape checks.
"""

from __future__ import annotations

import collections
import io
import pickle
from pathlib import Path

import torch

from ..errors import UserError
from ..networks import build_denoiser
from ..networks.precond import Denoiser
from ..storage import load_state_strict


class Refused(pickle.UnpicklingError):
    """The pickle asks for something that is not network data."""


class PersistedObject:
    """Stand-in for an object whose class lives in the pickle (or in torch): holds its state only."""

    class_name = "?"

    def __init__(self, class_name: str, state: dict | None = None, module_src_size: int = 0):
        self.class_name = class_name
        self.state = dict(state or {})
        self.module_src_size = module_src_size

    def __setstate__(self, state):  # called by pickle's BUILD opcode
        if isinstance(state, tuple) and len(state) == 2:  # (dict state, slot state)
            state = {**(state[0] or {}), **(state[1] or {})}
        if not isinstance(state, dict):
            raise pickle.UnpicklingError(f"malformed state for {self.class_name}")
        self.__dict__.setdefault("state", {}).update(state)

    def __repr__(self):
        return f"<persisted {self.class_name}>"


class _EasyDict(dict):
    """dnnlib.util.EasyDict as plain data."""


def _reconstruct_persistent_obj(meta):
    if not isinstance(meta, dict) or meta.get("type") != "class" or "class_name" not in meta:
        raise pickle.UnpicklingError("malformed persistent-object record")
    state = meta.get("state") or {}
    if not isinstance(state, dict):
        raise pickle.UnpicklingError("malformed persistent-object state")
    # meta['module_src'] is Python source; it is deliberately never executed or even parsed.
    return PersistedObject(str(meta["class_name"]), state, len(meta.get("module_src") or ""))


# torch's container modules are pickled by class reference (NEWOBJ + BUILD); each is replaced by a
# stand-in type that only records its state.
_TORCH_CONTAINERS = {
    name: type(name, (PersistedObject,), {"class_name": name, "__init__": object.__init__})
    for name in ("ModuleDict", "ModuleList", "Sequential", "ParameterDict", "ParameterList")
}


def _container(cls):
    if cls not in _TORCH_CONTAINERS.values():
        raise Refused(f"refusing to construct {cls!r}")
    obj = cls.__new__(cls)
    obj.state = {}
    return obj


def _newobj(cls, *args):
    return _container(cls)


def _reconstructor(cls, base, state):
    if base is not object:
        raise Refused(f"refusing to construct {cls!r}")
    return _container(cls)


def _load_storage_bytes(b: bytes):
    # Storages are nested legacy torch.save payloads: read them with torch's own safe loader.
    return torch.load(io.BytesIO(b), weights_only=True, map_location="cpu")


def _rebuild_parameter(data, requires_grad, backward_hooks, *state):
    return data.detach()


def _numpy_global(name):
    import numpy as np

    if name == "dtype":
        return np.dtype
    if name == "scalar":
        from numpy.core.multiarray import scalar  # noqa: PLC0415

        return scalar
    if name == "_reconstruct":
        from numpy.core.multiarray import _reconstruct  # noqa: PLC0415

        return _reconstruct
    if name == "ndarray":
        return np.ndarray
    return None


class RestrictedUnpickler(pickle.Unpickler):
    """Resolves only an allow-list of globals; everything else raises before anything is called."""

    SAFE = {
        ("torch_utils.persistence", "_reconstruct_persistent_obj"): _reconstruct_persistent_obj,
        ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
        ("torch.storage", "_load_from_bytes"): _load_storage_bytes,
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("builtins", "set"): set,
        ("builtins", "frozenset"): frozenset,
        ("builtins", "object"): object,
        ("copyreg", "_reconstructor"): _reconstructor,
        ("copyreg", "__newobj__"): _newobj,
        ("dnnlib.util", "EasyDict"): _EasyDict,
        ("torch", "device"): torch.device,
    }

    def find_class(self, module, name):
        key = (module, name)
        if key in self.SAFE:
            return self.SAFE[key]
        if module.startswith("torch.nn.modules.") and name in _TORCH_CONTAINERS:
            return _TORCH_CONTAINERS[name]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module in ("numpy", "numpy.core.multiarray", "numpy._core.multiarray"):
            obj = _numpy_global(name)
            if obj is not None:
                return obj
        raise Refused(
            f"refusing to load {module}.{name} from the pickle: it is not network data and could execute code"
        )

    def persistent_load(self, pid):
        raise Refused("refusing a pickle with persistent ids (not an EDM network pickle)")


def restricted_load(path: Path):
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such EDM network pickle")
    try:
        with open(path, "rb") as f:
            return RestrictedUnpickler(f).load()
    except Refused as e:
        raise UserError(f"{path}: {e}") from None
    except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        KeyError,
        IndexError,
        AttributeError,
        RuntimeError,
        OSError,
    ) as e:
        raise UserError(f"{path}: not a readable EDM network pickle (corrupt or truncated: {e})") from None


# --------------------------------------------------------------------------------------------
# Mapping onto emdctl modules

_PRECOND_NAMES = {"EDMPrecond": "edm", "VPPrecond": "vp", "VEPrecond": "ve", "iDDPMPrecond": "iddpm"}
_ARCH_NAMES = {"SongUNet": "songunet", "DhariwalUNet": "dhariwalunet"}
_PRECOND_KWARGS = {
    "edm": ("sigma_data", "sigma_min", "sigma_max"),
    "vp": ("beta_d", "beta_min", "M", "epsilon_t"),
    "ve": ("sigma_min", "sigma_max"),
    "iddpm": ("C_1", "C_2", "M"),
}


def persisted_state_dict(obj: PersistedObject, prefix: str = "") -> dict[str, torch.Tensor]:
    st = obj.state
    skip = set(st.get("_non_persistent_buffers_set") or ())
    out: dict[str, torch.Tensor] = {}
    for name, p in (st.get("_parameters") or {}).items():
        if p is not None:
            out[prefix + name] = torch.as_tensor(p).detach().clone()
    for name, b in (st.get("_buffers") or {}).items():
        if b is not None and name not in skip:
            out[prefix + name] = torch.as_tensor(b).detach().clone()
    for name, m in (st.get("_modules") or {}).items():
        if isinstance(m, PersistedObject):
            out.update(persisted_state_dict(m, f"{prefix}{name}."))
    return out


def _plain(v):
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_plain(x) for x in v]
    if hasattr(v, "item") and not isinstance(v, torch.Tensor):  # numpy scalars
        return v.item()
    return v


def denoiser_config_from_persisted(net: PersistedObject, source: str) -> dict:
    precond = _PRECOND_NAMES.get(net.class_name)
    if precond is None:
        raise UserError(f"{source}: unsupported network class {net.class_name!r} (known: {', '.join(_PRECOND_NAMES)})")
    st = net.state
    kwargs = _plain(dict(st.get("_init_kwargs") or {}))
    model = (st.get("_modules") or {}).get("model")
    if not isinstance(model, PersistedObject):
        raise UserError(f"{source}: the network has no inner 'model' module")
    arch = _ARCH_NAMES.get(model.class_name)
    if arch is None:
        raise UserError(f"{source}: unsupported architecture {model.class_name!r} (known: {', '.join(_ARCH_NAMES)})")
    model_kwargs = _plain(dict(model.state.get("_init_kwargs") or {}))
    for k in ("img_resolution", "in_channels", "out_channels", "label_dim"):
        model_kwargs.pop(k, None)
    res = int(st.get("img_resolution", kwargs.get("img_resolution", 0)))
    ch = int(st.get("img_channels", kwargs.get("img_channels", 0)))
    if not res or not ch:
        raise UserError(f"{source}: the network does not record img_resolution/img_channels")
    pk = {}
    for k in _PRECOND_KWARGS[precond]:
        if k in st:
            v = _plain(st[k])
            pk[k] = None if (k == "sigma_max" and isinstance(v, float) and v == float("inf")) else v
        elif k in kwargs:
            pk[k] = kwargs[k]
    return {
        "precond": precond,
        "precond_kwargs": pk,
        "img_shape": [ch, res, res],
        "label_dim": int(st.get("label_dim", kwargs.get("label_dim", 0)) or 0),
        "arch": arch,
        "arch_kwargs": model_kwargs,
    }


def load_edm_pickle(path: Path, key: str = "ema") -> Denoiser:
    """Read an EDM network pickle safely and return the equivalent emdctl denoiser (verified)."""
    path = Path(path)
    data = restricted_load(path)
    net = data.get(key) if isinstance(data, dict) else data
    if not isinstance(net, PersistedObject):
        raise UserError(
            f"{path}: no persisted network under {key!r} (keys: {list(data) if isinstance(data, dict) else '-'})"
        )
    config = denoiser_config_from_persisted(net, str(path))
    try:
        den = build_denoiser(config)
    except (TypeError, ValueError) as e:
        raise UserError(f"{path}: cannot rebuild the architecture it describes ({e})") from None
    load_state_strict(den, persisted_state_dict(net), str(path))
    return den.eval().requires_grad_(False)
