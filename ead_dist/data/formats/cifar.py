"""Reader for the pickled batches CIFAR-10 and CIFAR-100 ship in ("python version")."""

from __future__ import annotations

import os
import pickle

import numpy as np

from . import FormatError, LabelledImages

_SIDE = 32


def read_cifar10(root: str, split: str) -> LabelledImages:
    folder = os.path.join(root or "", "cifar-10-batches-py")
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    classes = _label_names(os.path.join(folder, "batches.meta"), "label_names", 10)
    parts = [_batch(os.path.join(folder, name), "labels", len(classes)) for name in names]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    return LabelledImages(images, labels, classes)


def read_cifar100(root: str, split: str) -> LabelledImages:
    folder = os.path.join(root or "", "cifar-100-python")
    classes = _label_names(os.path.join(folder, "meta"), "fine_label_names", 100)
    images, labels = _batch(os.path.join(folder, split), "fine_labels", len(classes))
    return LabelledImages(images, labels, classes)


def _label_names(path: str, key: str, count: int) -> list[str]:
    names = _field(path, _load(path), key)
    if not isinstance(names, list) or len(names) != count:
        raise FormatError(f"{path}: {key!r} must be a list of {count} names")
    return [_text(path, key, n) for n in names]


def _batch(path: str, labels_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    batch = _load(path)
    data = _field(path, batch, "data")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
            or data.shape[1] != 3 * _SIDE * _SIDE:
        shape = getattr(data, "shape", None)
        raise FormatError(f"{path}: 'data' must be a uint8 array [N, {3 * _SIDE * _SIDE}], got "
                          f"{type(data).__name__} {getattr(data, 'dtype', '')} {shape}")
    try:
        labels = np.asarray(_field(path, batch, labels_key), dtype=np.int64)
    except (TypeError, ValueError) as e:
        raise FormatError(f"{path}: {labels_key!r} is not a list of integers: {e}") from e
    if labels.shape != (len(data),):
        raise FormatError(f"{path}: {len(data)} rows in 'data' but {labels_key!r} has shape "
                          f"{labels.shape}")
    out_of_range = (labels < 0) | (labels >= num_classes)
    if out_of_range.any():
        bad = int(np.flatnonzero(out_of_range)[0])
        raise FormatError(f"{path}: {labels_key!r}[{bad}] = {int(labels[bad])} is outside "
                          f"0..{num_classes - 1}")
    # Each row is the R plane, then G, then B, each 32x32 row-major.
    images = data.reshape(-1, 3, _SIDE, _SIDE).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels


def _field(path: str, obj: object, key: str) -> object:
    """``obj[key]`` for a dict unpickled from a Python 2 file, whose keys arrive as bytes."""
    if not isinstance(obj, dict):
        raise FormatError(f"{path}: expected a pickled dict, got {type(obj).__name__}")
    for k in (key.encode(), key):
        if k in obj:
            return obj[k]
    raise FormatError(f"{path}: missing key {key!r}")


def _text(path: str, key: str, value: object) -> str:
    if isinstance(value, bytes):
        return value.decode("latin1")
    if isinstance(value, str):
        return value
    raise FormatError(f"{path}: {key!r} holds a {type(value).__name__}, expected a string")


# Everything a CIFAR batch needs: containers and numpy arrays. The files are Python 2
# pickles, so module names may come in their Python 2 spelling (__builtin__).
_BUILTINS = ("dict", "list", "tuple", "set", "frozenset", "int", "float", "complex", "bool",
             "str", "bytes", "bytearray")


def _allowed_globals() -> dict[tuple[str, str], object]:
    import builtins
    import codecs

    # numpy.core in numpy 1.x, numpy._core in 2.x: take it from an array's own reduction.
    _reconstruct = np.empty(0).__reduce__()[0]
    allowed: dict[tuple[str, str], object] = {
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct,  # written by numpy 1.x
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct,  # written by numpy 2.x
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        # Python 3's protocol 2 stores bytes as _codecs.encode(text, "latin1").
        ("_codecs", "encode"): codecs.encode,
    }
    for name in _BUILTINS:
        allowed[("builtins", name)] = allowed[("__builtin__", name)] = getattr(builtins, name)
    return allowed


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, path: str):
        # encoding="bytes" keeps Python 2 str as bytes, as the real files' keys (b'data') are.
        super().__init__(file, encoding="bytes")
        self._path = path
        self._allowed = _allowed_globals()

    def find_class(self, module: str, name: str) -> object:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise FormatError(f"{self._path}: refusing to unpickle global {module}.{name}; only "
                              "builtins and numpy arrays are allowed") from None


def _load(path: str) -> object:
    try:
        with open(path, "rb") as f:
            return _RestrictedUnpickler(f, path).load()
    except FormatError:
        raise
    except FileNotFoundError as e:
        raise FormatError(f"{path}: file is missing") from e
    except Exception as e:  # unpickling can fail in many ways; all mean a malformed file
        raise FormatError(f"{path}: cannot unpickle: {type(e).__name__}: {e}") from e
