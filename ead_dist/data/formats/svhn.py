"""Reader for the MATLAB files SVHN's cropped-digits format ships in (train/test_32x32.mat)."""

from __future__ import annotations

import os

import numpy as np

from . import FormatError, LabelledImages

SVHN_CLASSES = [str(d) for d in range(10)]
_SIDE = 32


def read_svhn(root: str, split: str) -> LabelledImages:
    import scipy.io

    path = os.path.join(root or "", f"{split}_32x32.mat")
    if not os.path.isfile(path):
        raise FormatError(f"{path}: file is missing")
    try:
        mat = scipy.io.loadmat(path)
    except Exception as e:  # scipy raises several types for a file that is not MATLAB v4/v5
        raise FormatError(f"{path}: cannot read as a MATLAB file: {type(e).__name__}: {e}") from e
    for key in ("X", "y"):
        if key not in mat:
            raise FormatError(f"{path}: missing variable {key!r}")
    x, y = mat["X"], mat["y"]
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[:3] != (_SIDE, _SIDE, 3):
        raise FormatError(f"{path}: 'X' must be uint8 ({_SIDE}, {_SIDE}, 3, N), got {x.dtype} "
                          f"{x.shape}")
    n = x.shape[3]
    if y.shape not in ((n, 1), (n,)) or not (np.issubdtype(y.dtype, np.integer)
                                              or np.issubdtype(y.dtype, np.floating)):
        raise FormatError(f"{path}: 'y' must be numeric ({n}, 1) for {n} images, got {y.dtype} "
                          f"{y.shape}")
    labels = y.reshape(n).astype(np.int64)
    # SVHN labels digits 1..9 as themselves and the digit 0 as 10.
    bad = (labels != y.reshape(n)) | (labels < 1) | (labels > 10)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise FormatError(f"{path}: 'y'[{i}] = {y.reshape(n)[i]} is not one of 1..10")
    labels[labels == 10] = 0
    images = np.ascontiguousarray(x.transpose(3, 0, 1, 2))  # (H, W, C, N) -> (N, H, W, C)
    return LabelledImages(images, labels, list(SVHN_CLASSES))
