"""Seeding for a block: :func:`seeded` seeds every random generator keras_qx's work draws from
and puts the caller's random state back afterwards.

Example:
    >>> import numpy as np
    >>> with seeded(0):
    ...     a = np.random.rand()
    >>> with seeded(0):
    ...     b = np.random.rand()
    >>> a == b
    True
"""
from __future__ import annotations

import contextlib
import random

import numpy as np

from keras_qx._compat import keras, keras_backend, tf, tf_context

__all__ = ["seeded"]


@contextlib.contextmanager
def seeded(seed: int | None):
    """Seed Python's ``random``, NumPy, TF and Keras's initializers for the block (as
    ``keras.utils.set_random_seed``), then put the caller's random state back.

    Python's and NumPy's global generators resume exactly where they were; TF's global seed
    and its eager op-seed sequence are restored, and so is Keras's seed generator. ``None``
    seeds nothing.

    Example:
        >>> state = np.random.get_state()
        >>> with seeded(0):
        ...     _ = np.random.rand()
        >>> bool((np.random.get_state()[1] == state[1]).all())
        True
    """
    if seed is None:
        yield
        return
    py_state, np_state = random.getstate(), np.random.get_state()
    eager = tf.executing_eagerly()
    ctx = tf_context.context()
    graph = tf.compat.v1.get_default_graph()
    tf_seed, tf_rng = (ctx._seed, getattr(ctx, "_rng", None)) if eager else (graph.seed, None)
    holder = keras_backend._SEED_GENERATOR  # thread-local; set_random_seed gives it a new Random
    had_generator, generator = hasattr(holder, "generator"), getattr(holder, "generator", None)
    keras.utils.set_random_seed(int(seed))
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        if eager:
            tf_context.set_global_seed(tf_seed)
            if tf_rng is not None:  # set_global_seed made a new op-seed sequence: resume the old one
                ctx._rng = tf_rng
        else:
            graph.seed = tf_seed
        if had_generator:
            holder.generator = generator
        elif hasattr(holder, "generator"):
            del holder.generator
