"""Reading torch checkpoint pickles without running them.

``torch.save(model, path)`` pickles the whole module: the file names the classes
of the project that wrote it (``timm.models.efficientnet.EfficientNet``, a training
script's ``RecorderMeter``) and ``torch.load`` imports them and calls whatever the
pickle says, so opening a downloaded file runs its author's code, or an
attacker's. ``torch.load(weights_only=True)`` refuses such files altogether.

:func:`read_pickle` reads them as data. A pickle names objects by module and name
(GLOBAL) and builds objects by calling them (REDUCE), by allocating a class and
filling in its state (NEWOBJ, BUILD), or by filling in containers. Here:

- the tensor rebuilders torch's own pickling uses are called, in this module's
  own implementations over the file's storage bytes (``torch._utils._rebuild_tensor``,
  ``_rebuild_tensor_v2``/``_v3``, ``_rebuild_parameter``, ``_rebuild_parameter_with_state``,
  ``torch._tensor._rebuild_from_type_v2``), and so are the plain containers and values
  torch pickles beside them (``collections.OrderedDict``, ``set``, ``frozenset``,
  ``torch.Size``, ``torch.device``, latin-1 ``bytes``; dtypes, memory formats and layouts
  are looked up, never called);
- storages come from the file through ``persistent_load`` (the zip format torch writes
  since 1.6: ``<archive>/data.pkl``, one ``<archive>/data/<key>`` record per storage,
  ``<archive>/byteorder``; and the legacy format of ``_use_new_zipfile_serialization=False``:
  magic number, protocol, system info, the pickle, then the storages' bytes);
- EVERY other global becomes an inert :class:`Placeholder` class that remembers its
  module and name; nothing it names is imported. Allocating one (NEWOBJ, as pickle
  does for ordinary objects such as an ``nn.Module`` or an ``argparse.Namespace``)
  makes a placeholder object, and BUILD records the state the pickle gives it (a
  module's ``__dict__``: ``_parameters``, ``_buffers``, ``_modules``, ...), which
  :func:`module_state_dict` walks into a state dict;
- calling anything else (REDUCE or INST of ``os.system``, ``builtins.exec``, an unknown
  class's constructor, ``functools.partial``, ...) is refused with an
  :class:`UnsafePickleError` that names the global, before it could run: the callee is
  a placeholder, whose call raises.

The reader is a ``pickle.Unpickler`` whose ``find_class`` never imports and never
returns a real callable: only this module's rebuilder objects, dtypes, storage-type
markers and placeholders can reach the stack. (torch's ``_weights_only_unpickler`` is
the model; unlike it, unknown classes are kept as placeholders instead of refused.)
"""

from __future__ import annotations

import _compat_pickle
import io
import math
import os
import pickle
import struct
import sys
import tarfile
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from affectray.checkpoints import CheckpointError

__all__ = [
    "ForeignCheckpointError",
    "Placeholder",
    "UnsafePickleError",
    "describe",
    "is_module",
    "module_state_dict",
    "named_modules",
    "read_pickle",
]

# torch.serialization's legacy format opens with these two pickled integers.
LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL_VERSION = 1001


class ForeignCheckpointError(CheckpointError):
    """Another project's checkpoint file that cannot be read, or that does not fit its importer."""


class UnsafePickleError(ForeignCheckpointError):
    """A pickle that asks to call something other than a tensor rebuilder: refused, nothing ran."""


class _Refused(Exception):
    """Raised inside the unpickler where the pickle asks for a call; read_pickle names the file."""


class _Malformed(Exception):
    """Raised inside the unpickler for a structure a torch checkpoint never has."""


# ---------------------------------------------------------------------------
# Placeholders: every global that is not a rebuilder
# ---------------------------------------------------------------------------


class _PlaceholderType(type):
    """Metaclass of the placeholder classes: calling one (REDUCE, INST, OBJ) is refused."""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        raise _Refused(f"the pickle calls {cls.global_name}, which is not a tensor rebuilder")


class Placeholder(metaclass=_PlaceholderType):
    """An object of a class the file names, kept as data: its class's module and name, and its state.

    ``args``/``kwargs``: what the pickle allocated it with (NEWOBJ); ``state``: what
    BUILD gave it (for an ``nn.Module``, its ``__dict__``); ``listitems``/``dictitems``:
    items appended or set on it (list and dict subclasses). ``attributes`` is the
    state as an attribute dict.
    """

    __slots__ = ("args", "kwargs", "state", "listitems", "dictitems")
    global_name = "builtins.object"  # "module.qualname", set on each placeholder class
    module = "builtins"
    name = "object"

    def __new__(cls, *args: Any, **kwargs: Any) -> Placeholder:  # NEWOBJ / NEWOBJ_EX: allocation only
        self = object.__new__(cls)
        self.args, self.kwargs = args, kwargs
        self.state = None
        self.listitems: list[Any] = []
        self.dictitems: dict[Any, Any] = {}
        return self

    def __setstate__(self, state: Any) -> None:  # BUILD
        if not isinstance(self, Placeholder):  # BUILD on the placeholder class itself
            raise _Refused("the pickle sets the state of a class")
        self.state = state

    @property
    def attributes(self) -> dict[str, Any]:
        """The state as attributes: a dict state, or the two dicts of a (state, slotstate) pair."""
        state = self.state
        if isinstance(state, dict):
            return state
        if isinstance(state, tuple) and len(state) == 2 and all(s is None or isinstance(s, dict) for s in state):
            return {**(state[0] or {}), **(state[1] or {})}
        return {}

    def get(self, key: str, default: Any = None) -> Any:
        return self.attributes.get(key, default)

    # Containers: APPEND(S), SETITEM(S) and ADDITEMS on objects of list, dict and set subclasses.
    def append(self, item: Any) -> None:
        self.listitems.append(item)

    def extend(self, items: Any) -> None:
        self.listitems.extend(items)

    def add(self, item: Any) -> None:
        self.listitems.append(item)

    def __setitem__(self, key: Any, value: Any) -> None:
        self.dictitems[key] = value

    def __repr__(self) -> str:
        return f"<placeholder {self.global_name}>"


def _placeholder_class(module: str, name: str) -> type[Placeholder]:
    namespace = {
        "__slots__": (),
        "__module__": module,  # a string only: the module is never imported
        "__qualname__": name,
        "global_name": f"{module}.{name}",
        "module": module,
        "name": name,
    }
    return _PlaceholderType(name.rsplit(".", 1)[-1] or "unnamed", (Placeholder,), namespace)


def describe(obj: Any) -> str:
    """What an object read from a pickle is, for messages: a placeholder's class, else its type."""
    if isinstance(obj, Placeholder):
        return f"a {obj.global_name} object"
    if isinstance(obj, type) and issubclass(obj, Placeholder):
        return f"the class {obj.global_name}"
    return f"a {type(obj).__module__}.{type(obj).__qualname__}"


# ---------------------------------------------------------------------------
# What may be called: tensor rebuilders and plain values
# ---------------------------------------------------------------------------


class _Rebuilder:
    """A callable the reader allows, under the global name the pickle uses for it."""

    __slots__ = ("global_name", "_fn")

    def __init__(self, global_name: str, fn: Callable[..., Any]) -> None:
        self.global_name = global_name
        self._fn = fn

    def __call__(self, *args: Any) -> Any:
        return self._fn(*args)

    def __setstate__(self, state: Any) -> None:  # BUILD on a function would rewrite it
        raise _Refused(f"the pickle sets attributes of {self.global_name}")

    def __repr__(self) -> str:
        return f"<rebuilder {self.global_name}>"


class _StorageType:
    """``torch.FloatStorage`` & co. in a persistent id: only their dtype matters (None: untyped bytes)."""

    __slots__ = ("global_name", "dtype")

    def __init__(self, global_name: str, dtype: torch.dtype | None) -> None:
        self.global_name = global_name
        self.dtype = dtype

    def __setstate__(self, state: Any) -> None:
        raise _Refused(f"the pickle sets attributes of {self.global_name}")

    def __repr__(self) -> str:
        return f"<storage type {self.global_name}>"


class _Storage:
    """Bytes of one storage: a uint8 tensor (the file's record, or the legacy root storage) and a byte range."""

    __slots__ = ("data", "byte_offset", "nbytes", "dtype")

    def __init__(self, data: torch.Tensor, byte_offset: int, nbytes: int, dtype: torch.dtype | None) -> None:
        self.data, self.byte_offset, self.nbytes, self.dtype = data, byte_offset, nbytes, dtype

    def __setstate__(self, state: Any) -> None:
        raise _Refused("the pickle sets attributes of a storage")


_OBJECT = _placeholder_class("builtins", "object")  # copyreg._reconstructor's base for plain objects

_STORAGE_DTYPES: dict[str, torch.dtype] = {
    "DoubleStorage": torch.float64,
    "FloatStorage": torch.float32,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
    "ComplexDoubleStorage": torch.complex128,
    "ComplexFloatStorage": torch.complex64,
}

# Values of the torch module a pickle may name (looked up in its namespace, never through torch.__getattr__).
_TORCH_VALUES: dict[str, Any] = {
    name: value
    for name, value in vars(torch).items()
    if isinstance(value, (torch.dtype, torch.memory_format, torch.layout))
}

_PARAMETER_NAMES = {"torch.nn.parameter.Parameter", "torch.nn.Parameter"}
_TENSOR_NAMES = {"torch.Tensor", "torch._tensor.Tensor", "torch.tensor.Tensor"}


def _ints(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or not all(type(v) is int for v in value):
        raise _Malformed(f"tensor {what} must be a tuple of integers, got {value!r}")
    return tuple(value)


def _view(storage: Any, storage_offset: Any, size: Any, stride: Any, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The tensor over ``storage`` that torch's ``_rebuild_tensor`` builds, bounds checked."""
    if not isinstance(storage, _Storage):
        raise _Malformed(f"a tensor's storage is {describe(storage)}, not a storage from the file")
    dtype = dtype or storage.dtype
    if not isinstance(dtype, torch.dtype):
        raise _Malformed("an untyped storage rebuilt without a dtype")
    size, stride = _ints(size, "size"), _ints(stride, "stride")
    if type(storage_offset) is not int or storage_offset < 0 or len(size) != len(stride):
        raise _Malformed(f"tensor layout offset {storage_offset!r}, size {size}, stride {stride} is not valid")
    if any(s < 0 for s in size) or any(s < 0 for s in stride):
        raise _Malformed(f"tensor size {size} or stride {stride} is negative")
    itemsize = dtype.itemsize
    if storage.byte_offset % itemsize:
        raise _Malformed(f"a {dtype} tensor starts inside an element of its storage")
    first = storage.byte_offset // itemsize + storage_offset
    end = (storage.byte_offset + storage.nbytes) // itemsize  # elements of the root storage this view may use
    if math.prod(size) and first + sum((n - 1) * s for n, s in zip(size, stride)) + 1 > end:
        raise _Malformed(f"a {dtype} tensor of size {size} reaches past the end of its storage")
    tensor = torch.empty((0,), dtype=dtype)
    return tensor.set_(storage.data.untyped_storage(), first, size, stride)


def _with_metadata(tensor: torch.Tensor, metadata: Any) -> torch.Tensor:
    if metadata:
        if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and type(v) is bool for k, v in metadata.items()
        ):
            raise _Malformed(f"tensor metadata must map names to booleans, got {metadata!r}")
        torch._utils.set_tensor_metadata(tensor, metadata)  # the conj / neg bits
    return tensor


def _rebuild_tensor(storage, storage_offset, size, stride):
    return _view(storage, storage_offset, size, stride)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks, metadata=None):
    return _with_metadata(_view(storage, storage_offset, size, stride), metadata)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype, metadata=None):
    if not isinstance(dtype, torch.dtype):
        raise _Malformed(f"_rebuild_tensor_v3 needs a dtype, got {dtype!r}")
    return _with_metadata(_view(storage, storage_offset, size, stride, dtype), metadata)


def _parameter(data: Any, requires_grad: Any) -> torch.nn.Parameter:
    if not isinstance(data, torch.Tensor):
        raise _Malformed(f"a Parameter's data is {describe(data)}, not a tensor")
    # Hooks and Python attributes a Parameter was pickled with are not weights: dropped.
    return torch.nn.Parameter(data, requires_grad=bool(requires_grad) and data.is_floating_point())


def _rebuild_parameter(data, requires_grad, backward_hooks):
    return _parameter(data, requires_grad)


def _rebuild_parameter_with_state(data, requires_grad, backward_hooks, state):
    return _parameter(data, requires_grad)


def _rebuild_from_type_v2(func, new_type, args, state):
    # torch pickles a tensor of a subclass, or one with Python attributes, as this call.
    if not isinstance(func, _Rebuilder) or not isinstance(args, tuple):
        raise _Refused(f"_rebuild_from_type_v2 asks to call {describe(func)}")
    result = func(*args)
    if not isinstance(result, torch.Tensor):
        raise _Malformed(f"_rebuild_from_type_v2 rebuilt {describe(result)}, not a tensor")
    if getattr(new_type, "global_name", None) in _PARAMETER_NAMES and not isinstance(result, torch.nn.Parameter):
        return torch.nn.Parameter(result, requires_grad=result.is_floating_point())
    return result  # a Tensor subclass's weights, as a plain tensor; its attributes are dropped


def _ordered_dict(*args):
    if args and not (len(args) == 1 and isinstance(args[0], (list, tuple))):
        raise _Malformed(f"OrderedDict from {args!r}")
    return OrderedDict(*args)


def _defaultdict(*args):
    return {}  # the default factory is never called: a plain dict that SETITEMS fills


def _set(*args):
    if args and not (len(args) == 1 and isinstance(args[0], (list, tuple, set, frozenset))):
        raise _Malformed(f"set from {args!r}")
    return set(*args)


def _frozenset(*args):
    return frozenset(_set(*args))


def _latin1(text: Any, encoding: Any) -> bytes:
    # Protocol 2 pickles bytes as _codecs.encode(text, "latin1"): no other codec is looked up.
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise _Refused(f"the pickle encodes text with codec {encoding!r}; only latin1 is decoded")
    return text.encode("latin-1")


def _bytearray(*args):
    if not args:
        return bytearray()
    if len(args) == 1 and isinstance(args[0], (bytes, list)):
        return bytearray(args[0])
    if len(args) == 2:
        return bytearray(_latin1(*args))
    raise _Malformed(f"bytearray from {args!r}")


def _complex(real=0.0, imag=0.0):
    if not all(isinstance(v, (int, float)) for v in (real, imag)):
        raise _Malformed(f"complex from {real!r}, {imag!r}")
    return complex(real, imag)


def _size(dims=()):
    return torch.Size(_ints(dims, "size"))


def _device(kind, index=None):
    if not isinstance(kind, str) or not (index is None or type(index) is int):
        raise _Malformed(f"torch.device from {kind!r}, {index!r}")
    return torch.device(kind) if index is None else torch.device(kind, index)


def _reconstructor(cls, base, state):
    # copyreg._reconstructor(cls, object, None): how protocols 0 and 1 allocate a plain object.
    if not (isinstance(cls, type) and issubclass(cls, Placeholder)) or base is not _OBJECT or state is not None:
        raise _Refused(f"copyreg._reconstructor asks to build {describe(cls)} on {describe(base)}")
    return cls.__new__(cls)


# numpy arrays, dtypes and scalars (a training script's recorder of per-epoch losses): rebuilt
# from their bytes. Only plain numeric, boolean and text dtypes: an object array's items would
# be arbitrary pickled objects, and a structured dtype a nest of them.
_NUMPY_KINDS = frozenset("biufcSUV?")


def _numpy_dtype(spec: Any, align: Any = False, copy: Any = True) -> np.dtype:
    # numpy pickles a dtype as dtype(spec, align, copy), then BUILD with its byte order and flags.
    if not isinstance(spec, str):
        raise _Refused(f"the pickle builds a numpy dtype from {describe(spec)}")
    try:
        dtype = np.dtype(spec)
    except TypeError as error:
        raise _Malformed(f"numpy dtype {spec!r}: {error}") from None
    if dtype.kind not in _NUMPY_KINDS or dtype.fields is not None or dtype.subdtype is not None:
        raise _Refused(f"the pickle holds a numpy array of dtype {spec!r}; only numeric, bool and text arrays are read")
    return dtype


def _numpy_array(subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
    # numpy pickles an array as _reconstruct(ndarray, (0,), b"b"), then BUILD with
    # (version, shape, dtype, is_fortran, raw bytes): ndarray's own __setstate__, over data only.
    if getattr(subtype, "global_name", None) not in _NUMPY_NDARRAY_NAMES:
        raise _Refused(f"the pickle reconstructs {describe(subtype)} as a numpy array")
    return _CheckedArray(np.ndarray.__new__(np.ndarray, (0,), np.uint8))


class _CheckedArray:
    """An array being rebuilt: BUILD's state is checked (a dtype this reader built, bytes) before numpy reads it."""

    __slots__ = ("array",)

    def __init__(self, array: np.ndarray) -> None:
        self.array = array

    def __setstate__(self, state: Any) -> None:
        if not (isinstance(state, tuple) and len(state) == 5 and isinstance(state[2], np.dtype)):
            raise _Malformed(f"numpy array state {describe(state)}")
        if state[2].kind not in _NUMPY_KINDS or not isinstance(state[4], (bytes, bytearray)):
            raise _Refused("the pickle fills a numpy array with objects, not bytes")
        self.array.__setstate__(state)


def _numpy_scalar(dtype: Any, data: Any = None) -> Any:
    if not isinstance(dtype, np.dtype) or dtype.kind not in _NUMPY_KINDS or not isinstance(data, bytes):
        raise _Refused(f"the pickle builds a numpy scalar from {describe(dtype)} and {describe(data)}")
    return np.frombuffer(data, dtype=dtype, count=1)[0]


_NUMPY_NDARRAY_NAMES = {"numpy.ndarray"}
_NUMPY_MODULES = ("numpy.core.multiarray", "numpy._core.multiarray")

_REBUILDERS: dict[str, Callable[..., Any]] = {
    **{f"{module}._reconstruct": _numpy_array for module in _NUMPY_MODULES},
    **{f"{module}.scalar": _numpy_scalar for module in _NUMPY_MODULES},
    "numpy.dtype": _numpy_dtype,
    "torch._utils._rebuild_tensor": _rebuild_tensor,
    "torch._utils._rebuild_tensor_v2": _rebuild_tensor_v2,
    "torch._utils._rebuild_tensor_v3": _rebuild_tensor_v3,
    "torch._utils._rebuild_parameter": _rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": _rebuild_parameter_with_state,
    "torch._tensor._rebuild_from_type_v2": _rebuild_from_type_v2,
    "collections.OrderedDict": _ordered_dict,
    "collections.defaultdict": _defaultdict,
    "builtins.set": _set,
    "builtins.frozenset": _frozenset,
    "builtins.bytearray": _bytearray,
    "builtins.complex": _complex,
    "_codecs.encode": _latin1,
    "torch.Size": _size,
    "torch.device": _device,
    "copyreg._reconstructor": _reconstructor,
}

# Old module paths torch's own loader maps (torch.serialization's load_module_mapping).
_MODULE_RENAMES = {"torch.tensor": "torch._tensor"}


class _Reader(pickle.Unpickler):
    """A ``pickle.Unpickler`` whose globals are rebuilders, looked-up values or placeholders (see the module doc)."""

    def __init__(self, file: IO[bytes], persistent_load: Callable[[Any], Any] | None) -> None:
        super().__init__(file, encoding="utf-8")
        self._load_persistent = persistent_load
        self._placeholders: dict[str, type[Placeholder]] = {}

    def find_class(self, module: str, name: str) -> Any:
        # Python 2 names (protocol 2 writes "__builtin__ set"), mapped as pickle's own find_class does.
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        module = _MODULE_RENAMES.get(module, module)
        full = f"{module}.{name}"
        if full in _REBUILDERS:
            return _Rebuilder(full, _REBUILDERS[full])
        if module == "torch" and name in _TORCH_VALUES:
            return _TORCH_VALUES[name]
        if module in ("torch", "torch.cuda") and name in _STORAGE_DTYPES:
            return _StorageType(full, _STORAGE_DTYPES[name])
        if full in ("torch.UntypedStorage", "torch.storage.UntypedStorage", "torch.storage._UntypedStorage"):
            return _StorageType(full, None)
        if full == "builtins.object":
            return _OBJECT
        if full not in self._placeholders:
            self._placeholders[full] = _placeholder_class(module, name)
        return self._placeholders[full]

    def persistent_load(self, pid: Any) -> Any:
        if self._load_persistent is None:
            raise _Malformed(f"unexpected persistent id {pid!r}")
        return self._load_persistent(pid)


def _storage_type_of(pid: tuple, storage_type: Any) -> torch.dtype:
    if not isinstance(storage_type, _StorageType):
        raise _Malformed(f"persistent id {pid[:2]!r}: {describe(storage_type)} is not a supported storage type")
    return storage_type.dtype or torch.uint8


def _pid_kind(pid: Any) -> str:
    if not isinstance(pid, tuple) or not pid:
        raise _Malformed(f"persistent id {pid!r} is not a tuple")
    kind = pid[0].decode("ascii") if isinstance(pid[0], bytes) else pid[0]
    return str(kind)


# ---------------------------------------------------------------------------
# File formats
# ---------------------------------------------------------------------------


def _bytes_tensor(raw: bytes | bytearray) -> torch.Tensor:
    if not raw:
        return torch.empty(0, dtype=torch.uint8)
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8)


def _read_zip(path: Path) -> Any:
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
            raise ForeignCheckpointError(
                f"{path}: a TorchScript archive (torch.jit.save), not a pickled checkpoint; its code is not read"
            )
        pickles = sorted(n for n in names if n.count("/") == 1 and n.endswith("/data.pkl"))
        if len(pickles) != 1:
            raise ForeignCheckpointError(f"{path}: a zip file without one <archive>/data.pkl: not a torch.save file")
        prefix = pickles[0][: -len("/data.pkl")]
        order = b"little"
        if f"{prefix}/byteorder" in names:
            order = archive.read(f"{prefix}/byteorder").strip()
            if order not in (b"little", b"big"):
                raise ForeignCheckpointError(f"{path}: unknown byte order {order!r}")
        swap = order.decode() != sys.byteorder
        loaded: dict[str, _Storage] = {}

        def persistent_load(pid: Any) -> _Storage:
            if _pid_kind(pid) != "storage" or len(pid) != 5:
                raise _Malformed(f"persistent id {pid!r} is not a storage")
            _, storage_type, key, _location, numel = pid  # the location (cuda:0, ...) is ignored: all on the CPU
            dtype = _storage_type_of(pid, storage_type)
            key = str(key)
            if type(numel) is not int or numel < 0:
                raise _Malformed(f"storage {key}: size {numel!r}")
            if key in loaded:
                root = loaded[key]
                return _Storage(root.data, 0, root.nbytes, dtype)
            record = f"{prefix}/data/{key}"
            try:
                info = archive.getinfo(record)
            except KeyError:
                raise _Malformed(f"storage {key} has no record {record}") from None
            nbytes = numel * dtype.itemsize
            if info.file_size != nbytes:
                raise _Malformed(
                    f"storage {key} holds {info.file_size} bytes, its {numel} {dtype} elements need {nbytes}"
                )
            data = _bytes_tensor(archive.read(record))
            if swap and dtype.itemsize > 1:
                data.untyped_storage().byteswap(dtype)
            loaded[key] = _Storage(data, 0, nbytes, dtype)
            return loaded[key]

        return _Reader(io.BytesIO(archive.read(pickles[0])), persistent_load).load()


def _read_legacy(path: Path) -> Any:
    """The format of torch.save(..., _use_new_zipfile_serialization=False) (torch < 1.6's default)."""
    with open(path, "rb") as f:
        try:
            magic = _Reader(f, None).load()
        except _Refused:
            raise
        except Exception:  # not a pickle at all
            magic = None
        if magic != LEGACY_MAGIC_NUMBER:
            raise ForeignCheckpointError(f"{path}: not a torch checkpoint (neither a torch.save zip nor a legacy file)")
        if _Reader(f, None).load() != LEGACY_PROTOCOL_VERSION:
            raise ForeignCheckpointError(f"{path}: unknown legacy torch.save protocol version")
        _Reader(f, None).load()  # system info: the data below is little-endian whatever the writer was
        roots: dict[str, _Storage] = {}
        views: dict[str, _Storage] = {}

        def persistent_load(pid: Any) -> Any:
            kind = _pid_kind(pid)
            if kind == "module" and len(pid) == 4:
                return pid[1]  # an nn.Module class and its source code: the class (a placeholder); the code is not read
            if kind != "storage" or len(pid) != 6:
                raise _Malformed(f"persistent id {pid!r} is not a storage")
            _, storage_type, key, _location, numel, view = pid
            dtype = _storage_type_of(pid, storage_type)
            key = str(key)
            if type(numel) is not int or numel < 0:
                raise _Malformed(f"storage {key}: size {numel!r}")
            if key not in roots:
                roots[key] = _Storage(
                    torch.zeros(numel * dtype.itemsize, dtype=torch.uint8), 0, numel * dtype.itemsize, dtype
                )
            root = roots[key]
            if view is None:
                return root
            view_key, offset, view_numel = view
            if str(view_key) not in views:
                start, length = offset * dtype.itemsize, view_numel * dtype.itemsize
                if start < 0 or length < 0 or start + length > root.nbytes:
                    raise _Malformed(f"storage view {view_key} lies outside storage {key}")
                views[str(view_key)] = _Storage(root.data, start, length, dtype)
            return views[str(view_key)]

        result = _Reader(f, persistent_load).load()
        keys = _Reader(f, None).load()
        if not isinstance(keys, list):
            raise ForeignCheckpointError(f"{path}: the legacy storage list is missing")
        for key in keys:
            root = roots.get(str(key))
            if root is None:
                raise ForeignCheckpointError(f"{path}: storage {key} is listed but no tensor uses it")
            header = f.read(8)
            if len(header) != 8 or struct.unpack("<q", header)[0] * root.dtype.itemsize != root.nbytes:
                raise ForeignCheckpointError(f"{path}: storage {key}'s size does not match its tensors (truncated?)")
            raw = f.read(root.nbytes)
            if len(raw) != root.nbytes:
                raise ForeignCheckpointError(f"{path}: storage {key} is truncated")
            root.data.copy_(_bytes_tensor(raw))  # written little-endian by torch on any machine
            if sys.byteorder == "big" and root.dtype.itemsize > 1:
                root.data.untyped_storage().byteswap(root.dtype)
        return result


def _unwrap_arrays(obj: Any, done: dict[int, Any]) -> Any:
    """``obj`` with every rebuilt numpy array in place of its :class:`_CheckedArray` (containers updated in place)."""
    if isinstance(obj, _CheckedArray):
        return obj.array
    key = id(obj)
    if key in done:
        return done[key]
    if isinstance(obj, list):
        done[key] = obj
        obj[:] = [_unwrap_arrays(v, done) for v in obj]
    elif isinstance(obj, dict):
        done[key] = obj
        for k in list(obj):
            obj[k] = _unwrap_arrays(obj[k], done)
    elif isinstance(obj, tuple):
        done[key] = obj  # a tuple that holds itself would recurse: keep it as it is
        done[key] = type(obj)(_unwrap_arrays(v, done) for v in obj) if type(obj) is tuple else obj
    elif isinstance(obj, Placeholder):
        done[key] = obj
        obj.state = _unwrap_arrays(obj.state, done)
        obj.args = _unwrap_arrays(obj.args, done)
        obj.listitems = _unwrap_arrays(obj.listitems, done)
        obj.dictitems = _unwrap_arrays(obj.dictitems, done)
    return done.get(key, obj)


def read_pickle(path: str | os.PathLike) -> Any:
    """The object a ``torch.save`` file holds, read without importing or running anything it names.

    Tensors, Parameters and plain containers come back as themselves (on the CPU);
    objects of any other class come back as :class:`Placeholder` objects. Raises
    :class:`UnsafePickleError` naming the global when the pickle asks to call
    anything but a tensor rebuilder, and :class:`ForeignCheckpointError` for a file
    that is not a torch checkpoint or is damaged.
    """
    path = Path(path)
    if not path.is_file():
        raise ForeignCheckpointError(f"checkpoint file not found: {path}")
    try:
        if zipfile.is_zipfile(path):
            return _unwrap_arrays(_read_zip(path), {})
        if tarfile.is_tarfile(path):
            raise ForeignCheckpointError(f"{path}: the tar format of torch < 0.4 is not read")
        return _unwrap_arrays(_read_legacy(path), {})
    except _Refused as refusal:
        raise UnsafePickleError(f"{path}: refused: {refusal}; nothing in the file was run") from None
    except ForeignCheckpointError:
        raise
    except (_Malformed, pickle.UnpicklingError, zipfile.BadZipFile, EOFError, ValueError, TypeError,
            AttributeError, KeyError, IndexError, RuntimeError, struct.error, UnicodeDecodeError) as error:  # fmt: skip
        raise ForeignCheckpointError(f"{path}: not a readable torch checkpoint: {error}") from None


# ---------------------------------------------------------------------------
# Pickled nn.Modules
# ---------------------------------------------------------------------------


def is_module(obj: Any) -> bool:
    """Whether ``obj`` is a placeholder of a pickled ``nn.Module`` (it has ``_parameters`` and ``_modules``)."""
    return (
        isinstance(obj, Placeholder)
        and isinstance(obj.get("_parameters"), Mapping)
        and isinstance(obj.get("_modules"), Mapping)
    )


def named_modules(obj: Any, prefix: str = "") -> Iterator[tuple[str, Placeholder]]:
    """(dotted name, placeholder) of a pickled module and all its submodules, as ``nn.Module.named_modules``."""
    if not is_module(obj):
        raise ForeignCheckpointError(f"expected a pickled torch.nn.Module, found {describe(obj)}")
    seen: set[int] = set()
    stack = [(prefix, obj)]
    while stack:
        name, module = stack.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        yield name, module
        children = [(f"{name}.{k}" if name else str(k), v) for k, v in module.get("_modules").items() if v is not None]
        for child_name, child in reversed(children):
            if not is_module(child):
                raise ForeignCheckpointError(f"submodule {child_name} is {describe(child)}, not a pickled nn.Module")
            stack.append((child_name, child))


def module_state_dict(obj: Any) -> dict[str, torch.Tensor]:
    """The state dict a pickled ``nn.Module`` (a placeholder) would give: ``model.state_dict()``'s keys and tensors.

    Parameters, then persistent buffers (those in ``_non_persistent_buffers_set``
    are left out), then each submodule's under its dotted name; ``None`` entries
    are skipped, as ``nn.Module.state_dict`` does. A module's extra state
    (``get_extra_state``) is not a tensor and is not included.
    """
    if not is_module(obj):
        raise ForeignCheckpointError(f"expected a pickled torch.nn.Module, found {describe(obj)}")
    out: dict[str, torch.Tensor] = {}

    def walk(module: Placeholder, prefix: str, inside: frozenset[int]) -> None:
        if id(module) in inside:
            raise ForeignCheckpointError(f"module {prefix.rstrip('.') or '<root>'} contains itself")
        inside = inside | {id(module)}
        transient = module.get("_non_persistent_buffers_set") or ()
        if not isinstance(transient, (set, frozenset, list, tuple)):
            raise ForeignCheckpointError(f"{prefix}_non_persistent_buffers_set is {describe(transient)}")
        for kind in ("_parameters", "_buffers"):
            entries = module.get(kind) or {}
            if not isinstance(entries, Mapping):
                raise ForeignCheckpointError(f"{prefix}{kind} is {describe(entries)}, not a dict")
            for name, value in entries.items():
                if value is None or (kind == "_buffers" and name in transient):
                    continue
                if not isinstance(value, torch.Tensor):
                    raise ForeignCheckpointError(f"{prefix}{name} is {describe(value)}, not a tensor")
                out[f"{prefix}{name}"] = value.detach()
        for name, child in module.get("_modules").items():
            if child is None:
                continue
            if not is_module(child):
                raise ForeignCheckpointError(f"submodule {prefix}{name} is {describe(child)}, not a pickled nn.Module")
            walk(child, f"{prefix}{name}.", inside)

    walk(obj, "", frozenset())
    return out
