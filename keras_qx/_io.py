"""Helpers at the bottom of the package: atomic file writes and input checks.

Every module that writes a file or takes user arrays uses these, so a half-written file or
an unclear shape error cannot come from anywhere.

Example:
    >>> import numpy as np
    >>> check_samples(np.zeros((8, 8)), (8,)).shape
    (8, 8)
"""
from __future__ import annotations

import os
import tempfile

import numpy as np

__all__ = ["write_atomic", "check_writable", "check_samples", "check_xy"]


def check_writable(path) -> None:
    """Raise before any work is done if ``path`` cannot be written (missing or read-only dir)."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"cannot write {path!r}: directory {directory!r} does not exist.")
    if not os.access(directory, os.W_OK):
        raise PermissionError(f"cannot write {path!r}: directory {directory!r} is not writable.")


def write_atomic(path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename: never a partial file.

    The file is fsynced before the rename and the directory after it (where the OS can), so
    a crash or power loss leaves the old file or the whole new one.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"cannot write {path!r}: directory {directory!r} does not exist.")
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".keras_qx-", suffix=".tmp")
    except OSError as err:
        raise PermissionError(f"cannot write {path!r}: {err.strerror}. Choose a writable path.") from None
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())  # the data is on disk before the rename makes it visible
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual mode
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_directory(directory)


def _fsync_directory(directory: str) -> None:
    """Make a rename in ``directory`` durable. Windows cannot open a directory, and some
    filesystems refuse to fsync one: the rename has happened anyway, so skip quietly."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _from_dataset(x):
    """Samples of a ``tf.data.Dataset`` (of x or (x, y) batches) as one array; anything else as is."""
    if type(x).__name__.endswith("Dataset") and hasattr(x, "as_numpy_iterator"):
        return np.concatenate([np.asarray(b[0] if isinstance(b, tuple) else b) for b in x.as_numpy_iterator()])
    return x


def check_samples(x, input_shape, what: str = "representative_data", dtype="float32") -> np.ndarray:
    """``x`` as ``dtype`` (the model input's: float32, or int32 token ids) shaped
    (n, *input_shape), with clear errors for the usual mistakes."""
    x = _from_dataset(x)
    dtype = np.dtype(getattr(dtype, "as_numpy_dtype", dtype))
    try:
        raw = np.asarray(x)
        x = raw.astype(dtype)
    except (TypeError, ValueError) as err:
        raise TypeError(f"{what} must be a numeric array shaped (n, {', '.join(map(str, input_shape))}): {err}") from None
    if dtype.kind in "iu" and raw.dtype.kind == "f" and not np.array_equal(raw, x):
        raise ValueError(f"{what} holds fractional values, but the model takes integer ({dtype}) inputs "
                         "such as token ids; pass the ids.")
    expected = tuple(int(s) if s is not None else None for s in input_shape)
    if x.ndim == len(expected):
        x = x[None]
    if x.ndim != len(expected) + 1 or any(e is not None and e != s for e, s in zip(expected, x.shape[1:])):
        raise ValueError(f"{what} has shape {x.shape}, but the model takes (n, {', '.join(map(str, expected))}).")
    if len(x) == 0:
        raise ValueError(f"{what} is empty; pass at least one sample (100-500 typical training samples).")
    if not np.isfinite(x).all():
        bad = int((~np.isfinite(x)).sum())
        raise ValueError(f"{what} contains {bad} NaN/inf values; clean the data before exporting.")
    return x


def check_xy(data, what: str) -> tuple[np.ndarray, np.ndarray]:
    """``data`` as a pair ``(x, y)`` of equal, non-zero length."""
    if not (isinstance(data, (tuple, list)) and len(data) == 2):
        raise ValueError(f"{what} must be a tuple (x, y) of samples and labels, got {type(data).__name__}.")
    x, y = np.asarray(data[0]), np.asarray(data[1])
    if len(x) != len(y) or len(x) == 0:
        raise ValueError(f"{what} has {len(x)} samples and {len(y)} labels; they must match and be > 0.")
    return x, y
