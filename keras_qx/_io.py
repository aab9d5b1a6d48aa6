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

__all__ = ["write_atomic", "check_writable", "check_samples", "check_inputs", "model_input_specs", "check_xy",
           "check_labels", "check_count", "legacy_xy",
           "is_stream", "head_samples", "count_samples"]


def check_writable(path) -> None:
    """Raise before any work is done if ``path`` cannot be written (a directory, a missing or
    read-only directory).

    Probes by creating and removing a temporary file there, as ``write_atomic`` will:
    ``os.access`` says yes to root on a read-only mount or a pseudo-filesystem."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise IsADirectoryError(f"cannot write {path!r}: it is a directory; give a file path such as "
                                f"{os.path.join(path, 'model.tflite')!r}.")
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"cannot write {path!r}: directory {directory!r} does not exist.")
    try:
        fd, probe = tempfile.mkstemp(dir=directory, prefix=".keras_qx-", suffix=".probe")
    except OSError as err:
        raise PermissionError(f"cannot write {path!r}: directory {directory!r} is not writable "
                              f"({err.strerror}).") from None
    os.close(fd)
    os.unlink(probe)


def write_atomic(path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename: never a partial file.

    The file is fsynced before the rename and the directory after it (where the OS can), so
    a crash or power loss leaves the old file or the whole new one.
    """
    path = os.fspath(path)
    check_writable(path)
    directory = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".keras_qx-", suffix=".tmp")
    except OSError as err:
        raise PermissionError(f"cannot write {path!r}: {err.strerror}. Choose a writable path.") from None
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())  # the data is on disk before the rename makes it visible
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual mode
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_directory(directory)


def _umask() -> int:
    """The process umask, read without changing it where the OS can tell (Linux 4.7+:
    ``/proc/self/status``). Elsewhere ``os.umask`` must set a value to read one: it is set back at
    once, but another thread creating a file in between would get mode ``0o077``, so the probe
    sets that restrictive value rather than 0."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    umask = os.umask(0o077)
    os.umask(umask)
    return umask


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


def _from_dataset(x, rank: int, what: str):
    """Samples of a ``tf.data.Dataset`` (of x or (x, y) elements, batched or single samples of
    rank ``rank``) as one array; anything else as is."""
    if not (type(x).__name__.endswith("Dataset") and hasattr(x, "as_numpy_iterator")):
        return x
    parts = []
    for element in x.as_numpy_iterator():
        element = element[0] if isinstance(element, tuple) else element
        if isinstance(element, dict):
            raise TypeError(f"{what} is a tf.data.Dataset of dicts (keys {sorted(element)}); map it to the "
                            "model input, e.g. ds.map(lambda d: d['image']).")
        parts.append(np.asarray(element))
    if not parts:
        raise ValueError(f"{what} is an empty tf.data.Dataset; pass at least one sample.")
    single = parts[0].ndim == rank  # an unbatched dataset yields single samples
    return np.stack(parts) if single else np.concatenate(parts)


def check_samples(x, input_shape, what: str = "representative_data", dtype="float32") -> np.ndarray:
    """``x`` as ``dtype`` (the model input's: float32, or int32 token ids) shaped
    (n, *input_shape), with clear errors for the usual mistakes."""
    if x is None:
        raise ValueError(f"{what} is None; pass samples shaped (n, {', '.join(map(str, input_shape))}) "
                         "(100-500 typical training samples).")
    x = _from_dataset(x, len(input_shape), what)
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
        raise ValueError(f"{what} contains {bad} NaN/inf values; clean the data first (e.g. np.nan_to_num, "
                         "or drop those samples).")
    return x


def model_input_specs(model) -> list:
    """``[(name, shape without the batch axis, dtype)]`` of a Keras model's inputs."""
    return [(t.name.split(":")[0], tuple(t.shape[1:]), t.dtype) for t in model.inputs]


def check_inputs(x, specs, what: str = "representative_data") -> list:
    """``x`` as one checked array per model input (see :func:`check_samples`).

    ``specs`` lists the inputs as ``(name, shape without the batch axis, dtype)``. ``x`` is an
    array (a single-input model), a list or tuple in the model's input order, or a dict keyed
    by input name; every input must have the same number of samples."""
    names = [name for name, _, _ in specs]
    if isinstance(x, dict):
        missing, extra = [n for n in names if n not in x], [k for k in x if k not in names]
        if missing or extra:
            raise ValueError(f"{what} is keyed by {sorted(x)}, but the model's inputs are {names}"
                             + (f"; missing {missing}" if missing else "") + (f"; unknown {extra}" if extra else "") + ".")
        xs = [x[n] for n in names]
    elif isinstance(x, (list, tuple)) and len(specs) > 1:
        if len(x) != len(specs):
            raise ValueError(f"{what} holds {len(x)} arrays, but the model has {len(specs)} inputs {names}; "
                             "pass one array per input, in that order (or a dict keyed by input name).")
        xs = list(x)
    elif len(specs) > 1:
        raise ValueError(f"the model has {len(specs)} inputs {names}: pass {what} as a list with one array "
                         "per input, in that order, or a dict keyed by input name.")
    else:
        xs = [x]
    out = [check_samples(xi, shape, what if len(specs) == 1 else f"{what}[{name!r}]", dtype)
           for xi, (name, shape, dtype) in zip(xs, specs)]
    if len({len(xi) for xi in out}) > 1:
        raise ValueError(f"{what}: the inputs hold different numbers of samples "
                         f"({dict(zip(names, (len(xi) for xi in out)))}); they must match.")
    return out


def check_xy(data, what: str) -> tuple[np.ndarray, np.ndarray]:
    """``data`` as a pair ``(x, y)`` of equal, non-zero length."""
    if not (isinstance(data, (tuple, list)) and len(data) == 2):
        raise ValueError(f"{what} must be a tuple (x, y) of samples and labels, got {type(data).__name__}.")
    x, y = np.asarray(data[0]), np.asarray(data[1])
    if len(x) != len(y) or len(x) == 0:
        raise ValueError(f"{what} has {len(x)} samples and {len(y)} labels; they must match and be > 0.")
    return x, y


def check_labels(y, n: int, what: str = "y", classes: int | None = None) -> np.ndarray:
    """Class labels ``y`` for ``n`` samples as integer ids ``(n,)``: one-hot rows ``(n, classes)``
    become their argmax, a column ``(n, 1)`` is flattened. With ``classes``, ids must lie in
    ``0..classes-1``."""
    try:
        y = np.asarray(y)
    except ValueError as err:
        raise TypeError(f"{what} must be an array of class ids, got something ragged: {err}") from None
    if y.dtype.kind not in "biuf":
        raise TypeError(f"{what} must hold integer class ids (0, 1, ...), got {y.dtype} values such as "
                        f"{y.ravel()[:3].tolist()}; map them to ids first, e.g. np.unique(y, return_inverse=True)[1].")
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim == 0:
        raise ValueError(f"{what} is a single value ({y.item()!r}); pass one label per sample, shaped (n,).")
    if len(y) != n:
        raise ValueError(f"x has {n} samples but {what} has {len(y)} labels; pass one label per sample.")
    if y.dtype.kind == "f" and not np.isfinite(y).all():
        raise ValueError(f"{what} contains {int((~np.isfinite(y)).sum())} NaN/inf values; clean the labels.")
    if y.ndim == 2:
        if classes is not None and y.shape[1] != classes:
            raise ValueError(f"{what} has one-hot rows of width {y.shape[1]}, but the model has {classes} "
                             "outputs; pass integer class ids or one-hot rows of the model's width.")
        return y.argmax(1)
    if y.ndim != 1:
        raise ValueError(f"{what} has shape {y.shape}; pass class ids (n,) or one-hot rows (n, classes).")
    if y.dtype.kind == "f":
        if not np.array_equal(y, np.round(y)):
            raise ValueError(f"{what} holds fractional values such as {y[y != np.round(y)][:3].tolist()}; "
                             "pass integer class ids (0, 1, ...) or one-hot rows.")
        y = y.astype(np.int64)
    if classes is not None and len(y) and (y.min() < 0 or y.max() >= classes):
        raise ValueError(f"{what} holds class ids {int(y.min())}..{int(y.max())}, but the model has {classes} "
                         f"outputs (ids 0..{classes - 1}); check the labels belong to this model.")
    return y


def check_count(value, name: str, minimum: int = 1) -> int:
    """``value`` as an int if it is an integer >= ``minimum``, else a clear error naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")
    return int(value)


def legacy_xy(where: str, x, y, n_inputs: int = 1, data=None):
    """``(x, y)`` as Keras' ``fit`` takes them, from them or from the deprecated ``data=(x, y)``
    (a keyword, or the pair given where ``x`` goes), with a DeprecationWarning."""
    from keras_qx._deprecation import warn_renamed

    if data is not None:
        if x is not None or y is not None:
            raise TypeError(f"{where}: give x, y or the deprecated data=(x, y), not both.")
        warn_renamed(where, "data=(x, y)", "x, y", stacklevel=4)
        if not (isinstance(data, (tuple, list)) and len(data) == 2):
            raise ValueError(f"{where}: data must be a tuple (x, y), got {type(data).__name__}; pass x, y instead.")
        return data[0], data[1]
    if y is None and isinstance(x, tuple) and len(x) == 2 and (
            n_inputs == 1 or isinstance(x[0], (list, tuple, dict))):
        warn_renamed(where, "a tuple (x, y) in x's place", "x, y as two arguments (as Model.fit)", stacklevel=4)
        return x[0], x[1]
    return x, y


def is_stream(x) -> bool:
    """A tf.data.Dataset, a generator or a keras Sequence: not an array of samples."""
    return hasattr(x, "as_numpy_iterator") or hasattr(x, "__next__") or type(x).__name__.endswith(("Sequence", "Dataset"))


def head_samples(x, k: int):
    """The first ``k`` samples of ``x`` (an array, a list per input, or a dict by input name)."""
    if isinstance(x, dict):
        return {name: v[:k] for name, v in x.items()}
    if isinstance(x, (list, tuple)) and x and hasattr(x[0], "shape"):
        return [v[:k] for v in x]
    return x[:k]


def count_samples(x) -> int:
    """How many samples ``x`` holds (the first input's, for several)."""
    if isinstance(x, dict):
        return len(next(iter(x.values())))
    if isinstance(x, (list, tuple)) and x and hasattr(x[0], "shape"):
        return len(x[0])
    return len(x)
