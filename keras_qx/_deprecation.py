"""Old argument and function names kept working for one release, and the ``verbose`` rule.

The API convention (docs/contributing.md) renamed some arguments in 0.1.0; each old name still
works until 0.2.0 with a DeprecationWarning naming the new one (STYLE 22), and CHANGELOG lists it.
"""
from __future__ import annotations

import functools
import warnings

__all__ = ["REMOVED_IN", "renamed_args", "deprecated_alias", "warn_renamed", "check_verbose", "say"]

REMOVED_IN = "0.2.0"


def warn_renamed(where: str, old: str, new: str, stacklevel: int = 3) -> None:
    warnings.warn(f"keras_qx: {where}: {old} is deprecated, use {new} (the old name goes in {REMOVED_IN}).",
                  DeprecationWarning, stacklevel=stacklevel)


def renamed_args(**renames: str):
    """Accept ``old=`` keyword arguments as ``new=`` with a DeprecationWarning.

    Example:
        >>> @renamed_args(model_or_path="tflite")
        ... def inspect(tflite):
        ...     return tflite
        >>> import warnings
        >>> with warnings.catch_warnings():
        ...     warnings.simplefilter("ignore")
        ...     inspect(model_or_path="m.tflite")
        'm.tflite'
    """
    def wrap(fn):
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            for old, new in renames.items():
                if old in kwargs:
                    if new in kwargs:
                        raise TypeError(f"{fn.__qualname__}() got both {new}= and its deprecated name {old}=; "
                                        f"give {new}= only.")
                    warn_renamed(f"{fn.__qualname__}()", f"{old}=", f"{new}=")
                    kwargs[new] = kwargs.pop(old)
            return fn(*args, **kwargs)
        return inner
    return wrap


def deprecated_alias(fn, old_name: str):
    """``old_name`` calling ``fn`` with a DeprecationWarning (a renamed public function)."""
    @functools.wraps(fn)
    def alias(*args, **kwargs):
        warn_renamed(old_name, f"qx.{old_name}", f"qx.{fn.__name__}")
        return fn(*args, **kwargs)
    alias.__name__ = alias.__qualname__ = old_name
    alias.__doc__ = f"Deprecated alias of :func:`{fn.__name__}` (removed in {REMOVED_IN})."
    return alias


def check_verbose(verbose, where: str) -> int:
    """``verbose`` as Keras has it: 0 silent, 1 progress, 2 one line per step; True is 1."""
    if isinstance(verbose, bool):
        return int(verbose)
    if verbose in (0, 1, 2) and isinstance(verbose, int):
        return verbose
    raise ValueError(f"{where}: verbose must be 0 (silent), 1 (progress) or 2 (one line per step), got {verbose!r}.")


def say(verbose: int, print_fn=None):
    """The line printer ``verbose`` asks for: ``print`` (or a deprecated ``print_fn``), else silent."""
    if print_fn is not None:
        return print_fn
    return print if verbose else (lambda *_a, **_k: None)
