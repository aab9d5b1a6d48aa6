"""A measured, per-layer latency model: what each layer costs in time on this machine's runtime.

Each quantizable layer is cut out as a one-layer model (its kind, configuration and input shape),
quantized at each width, exported (int8 in and out, so the file holds only the layer's own ops)
and timed in the child runtime: the runtime's ``invoke()`` alone, 10 warm-up runs, the median of
``runs``, minus the runtime's per-invoke overhead (measured on a one-op file). The time of
everything else (pooling, adds, softmax, the quantize edges, XNNPACK's partition changes) is the
model's ``base_us``: its uniform-int8 file's measured time less its layers' int8 times. Every
measurement is cached in a small JSON file keyed by the runtime (LiteRT version, CPU, threads,
kernel set), so a layer shape is timed once per machine.

Widths are timed as the file stores them (:func:`keras_qx.quant.cost.storage_bits`): a 2-bit
convolution is an INT4 convolution, a 3-bit Dense an INT4 one.

Example:
    >>> table = latency_table(model, (2, 4, 8))                      # doctest: +SKIP
    >>> table.layers["conv1"]                                        # doctest: +SKIP
    {2: 61.0, 4: 61.0, 8: 9.5}
    >>> qx.predict_latency(model, policy).total_us                   # doctest: +SKIP
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
import warnings
from dataclasses import dataclass, field

import numpy as np

from keras_qx._compat import keras
from keras_qx._io import write_atomic
from keras_qx.engine.sensitivity import _progress

__all__ = ["LatencyTable", "LatencyPrediction", "latency_table", "predict_latency", "export_latency_files",
           "default_cache", "runtime_key", "l2_bytes"]

RUNS = 200  # timed invocations per file (after 10 warm-up ones)
_FLOAT = "float"  # the JSON key of a layer kept float


@dataclass
class LatencyTable:
    """Per-layer time on one runtime: ``layers[name][bits]`` in microseconds with the layer's
    weights in the CPU's caches (bits as the policy gives them: 2/4/8), ``cold[name][bits]`` with
    them evicted, ``kernel_bytes[name][bits]`` (the shared cost model) and ``base_us``, the time of
    the ops no quantizable layer owns (pooling, adds, softmax, quantize edges) in the int8 file.

    A file whose weights fit well within the per-core L2 cache runs its layers warm; one whose
    weights overflow it runs them from further out: :meth:`cold_fraction` ramps from 0 at half
    the L2 size to 1 at twice it (fitted on the wide MLP of bench/latency.py, checked on the rest)."""

    base_us: float
    layers: dict = field(default_factory=dict)
    num_threads: int = 1
    runtime: str = ""  # e.g. "ai-edge-litert 2.3.0, xnnpack, <cpu>"
    cold: dict = field(default_factory=dict)  # {layer: {bits: µs}}; empty: as warm
    kernel_bytes: dict = field(default_factory=dict)  # {layer: {bits: bytes}}
    l2_bytes: int = 0  # 0: no cache model (every layer warm)

    def cold_fraction(self, weight_bytes: float) -> float:
        """How far toward its cold time a layer runs when the file holds ``weight_bytes``."""
        if not self.l2_bytes:
            return 0.0
        return float(min(1.0, max(0.0, (weight_bytes - self.l2_bytes / 2) / (1.5 * self.l2_bytes))))

    def layer_us(self, name: str, bits, fraction: float = 0.0) -> float:
        warm = self.layers[name][bits]
        cold = self.cold.get(name, {}).get(bits, warm)
        return warm + fraction * (cold - warm)

    def weight_bytes(self, bits: dict) -> int:
        return sum(self.kernel_bytes.get(n, {}).get(b, 0) for n, b in bits.items())

    def layer_times(self, bits: dict) -> dict:
        """``{layer: µs}`` of each timed layer in the file whose layers have ``bits`` ({layer: bits};
        layers not named at 8), at that file's cache regime (its weight bytes)."""
        full = {n: bits.get(n, 8) for n in self.layers}
        fraction = self.cold_fraction(self.weight_bytes(full))
        return {n: self.layer_us(n, b, fraction) for n, b in full.items()}

    def total_us(self, bits: dict) -> float:
        """Predicted microseconds of the file whose layers have ``bits`` ({layer: bits}; layers
        not named at 8)."""
        return self.base_us + sum(self.layer_times(bits).values())

    def regimes(self, levels: int = 4) -> list:
        """``[(weight byte cap or None, {layer: {bits: µs}})]``: additive tables, each an upper bound
        of :meth:`total_us` for the files within its cap (the last, capped by nothing, for every
        file up to all layers at their widest). Across the cache boundary the time is not
        additive; an allocation under a latency budget solves each regime with its cap as an extra
        byte budget and keeps the best."""
        widest = sum(max(t.values()) for t in self.kernel_bytes.values()) if self.kernel_bytes else 0
        if not self.l2_bytes or not self.cold:
            return [(None, self.layers)]
        caps = [int(self.l2_bytes / 2 + 1.5 * self.l2_bytes * k / levels) for k in range(levels)]
        out = [(cap, self._at(self.cold_fraction(cap))) for cap in caps if cap < widest]
        return out + [(None, self._at(self.cold_fraction(widest)))]

    def _at(self, fraction: float) -> dict:
        return {n: {b: self.layer_us(n, b, fraction) for b in t} for n, t in self.layers.items()}

    def additive(self, max_bytes: int | None = None) -> "LatencyTable":
        """This table made additive for files of at most ``max_bytes`` weight bytes (None: any):
        each layer's time at the regime bounding them (:meth:`regimes`), for a search that adds
        times up as it adds bytes."""
        regimes = self.regimes()
        times = next((t for cap, t in regimes if cap is not None and max_bytes is not None and max_bytes <= cap),
                     regimes[-1][1])
        return self.with_layers(times)

    def with_layers(self, times: dict) -> "LatencyTable":
        """This table with the additive per-layer ``times`` of one regime (no cache model)."""
        return LatencyTable(base_us=self.base_us, layers=times, num_threads=self.num_threads, runtime=self.runtime,
                            kernel_bytes=self.kernel_bytes)

    def to_dict(self) -> dict:
        key = lambda b: _FLOAT if b is None else str(b)  # noqa: E731
        return {"base_us": self.base_us, "num_threads": self.num_threads, "runtime": self.runtime,
                "l2_bytes": self.l2_bytes,
                "layers": {n: {key(b): us for b, us in t.items()} for n, t in self.layers.items()},
                "cold": {n: {key(b): us for b, us in t.items()} for n, t in self.cold.items()},
                "kernel_bytes": {n: {key(b): v for b, v in t.items()} for n, t in self.kernel_bytes.items()}}

    def table(self) -> str:
        """A Markdown table: each layer's µs at each width, warm / cold."""
        widths = sorted({b for t in self.layers.values() for b in t if b is not None}, reverse=True)
        lines = [f"{self.runtime}; rest of the model {self.base_us:.1f} µs; L2 {self.l2_bytes // 1024} KiB", "",
                 "| layer | " + " | ".join(f"{b}-bit µs (warm / cold)" for b in widths) + " |",
                 "|---|" + "---:|" * len(widths)]
        for name, t in self.layers.items():
            cold = self.cold.get(name, {})
            lines.append(f"| {name} | " + " | ".join(
                f"{t[b]:.1f} / {cold.get(b, t[b]):.1f}" if b in t else "-" for b in widths) + " |")
        return "\n".join(lines)


@dataclass
class LatencyPrediction:
    """``qx.predict_latency``'s answer: the file's predicted time and each layer's share."""

    total_us: float
    base_us: float
    layers: dict  # {layer: (bits, µs)}
    runtime: str = ""

    @property
    def total_ms(self) -> float:
        return self.total_us / 1000

    def to_dict(self) -> dict:
        return {"total_us": self.total_us, "base_us": self.base_us, "runtime": self.runtime,
                "layers": {n: {"bits": b, "us": us} for n, (b, us) in self.layers.items()}}

    def table(self) -> str:
        lines = [f"predicted {self.total_us:.1f} µs a sample ({self.runtime})", "",
                 "| layer | bits | µs |", "|---|---:|---:|"]
        lines += [f"| {n} | {'float' if b is None else b} | {us:.1f} |" for n, (b, us) in self.layers.items()]
        lines.append(f"| (rest of the model) | | {self.base_us:.1f} |")
        return "\n".join(lines)


def default_cache() -> str:
    """Where measurements are kept: ``$KERAS_QX_CACHE`` if set, else
    ``$XDG_CACHE_HOME/keras_qx/latency.json`` (``~/.cache/keras_qx/latency.json``)."""
    if os.environ.get("KERAS_QX_CACHE"):
        return os.environ["KERAS_QX_CACHE"]
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "keras_qx", "latency.json")


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def l2_bytes() -> int:
    """The per-core L2 cache size (Linux sysfs), or 0 where it cannot be read."""
    for index in range(8):
        base = f"/sys/devices/system/cpu/cpu0/cache/index{index}"
        try:
            with open(f"{base}/level") as fh:
                if fh.read().strip() != "2":
                    continue
            with open(f"{base}/size") as fh:
                text = fh.read().strip().upper()
            factor = {"K": 1024, "M": 1024**2}.get(text[-1], 1)
            return int(text.rstrip("KM")) * factor
        except (OSError, ValueError):
            continue
    return 0


def runtime_key(num_threads: int = 1) -> str:
    """What a measurement holds for: the LiteRT version, the CPU, its core count, the threads and
    the kernel set (XNNPACK where it takes the op, else the built-in kernels)."""
    from importlib.metadata import version

    return (f"ai-edge-litert {version('ai-edge-litert')}, {_cpu()} x{os.cpu_count()}, "
            f"{num_threads} thread{'s' if num_threads != 1 else ''}, xnnpack+builtin")


class _Cache:
    """``{runtime key: {signature: µs}}`` in one JSON file, written atomically."""

    def __init__(self, path, key: str):
        self.path, self.key = (None if path is False else os.fspath(path or default_cache())), key
        self.data = {}
        if self.path and os.path.exists(self.path):
            try:
                with open(self.path) as fh:
                    self.data = json.load(fh)
            except (OSError, ValueError) as err:
                warnings.warn(f"keras_qx: the latency cache {self.path!r} is unreadable ({err}); measuring anew "
                              "(it is rewritten).", stacklevel=3)
                self.data = {}
        self.entries = self.data.setdefault(key, {})
        self.measured = 0

    def get(self, signature: str):
        return self.entries.get(signature)

    def put(self, signature: str, us) -> None:
        self.entries[signature] = [round(float(v), 3) for v in us] if isinstance(us, list) else round(float(us), 3)
        self.measured += 1

    def save(self) -> None:
        if self.path and self.measured:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            write_atomic(self.path, json.dumps(self.data, indent=1, sort_keys=True).encode())


def _node_shapes(flat, layer) -> list:
    """The input shapes of ``layer``'s call in ``flat`` (one per input tensor)."""
    nodes = getattr(flat, "_network_nodes", set())
    index = next((i for i in range(len(layer._inbound_nodes) - 1, -1, -1) if f"{layer.name}_ib-{i}" in nodes), 0)
    shapes = layer._inbound_nodes[index].input_shapes
    shapes = shapes if isinstance(shapes, list) else [shapes]
    return [tuple(s.as_list() if hasattr(s, "as_list") else s) for s in shapes]


def _fixed(shape, lengths) -> tuple:
    """``shape`` with batch 1 and its other ``None`` dimensions from ``lengths`` (the model input's)."""
    out, k = [1], 0
    for dim in shape[1:]:
        if dim is None:
            if lengths is None or k >= len(lengths):
                return None
            dim = lengths[k]
            k += 1
        out.append(int(dim))
    return tuple(out)


def _signature(layer, shapes, storage) -> str:
    config = {k: v for k, v in layer.get_config().items()
              if k not in ("name", "trainable", "dtype") and not k.endswith(("_initializer", "_regularizer", "_constraint"))}
    text = json.dumps([type(layer).__name__, config, [list(s) for s in shapes], storage], sort_keys=True, default=str)
    return "layer:" + hashlib.sha1(text.encode()).hexdigest()[:16] + f":{type(layer).__name__}:{storage}"


def _random_inputs(shapes, ids=None) -> list:
    """Eight random samples (seeds 0-7) for each of ``shapes`` (batch axis 1): N(0, 1) floats, or
    int32 token ids below ``ids[i]`` where that is not None."""
    ids = ids or [None] * len(shapes)
    out = []
    for shape, count in zip(shapes, ids):
        rngs = [np.random.default_rng(i) for i in range(8)]
        out.append(np.concatenate([r.integers(0, count, size=shape).astype(np.int32) if count is not None
                                   else r.normal(size=shape).astype(np.float32) for r in rngs]))
    return out


def _model_inputs(model, lengths=None) -> list:
    """:func:`_random_inputs` for ``model``'s inputs, dynamic dimensions at ``lengths``: what its
    int8 file is timed on (an integer input takes ids 0 and 1, valid for any Embedding)."""
    return _random_inputs([_fixed(tuple(t.shape), lengths) for t in model.inputs],
                          [2 if t.dtype.is_integer else None for t in model.inputs])


def _time_file(data: bytes, x, num_threads: int, runs: int, flush_bytes: int = 0) -> float:
    """Median µs of the runtime's ``invoke()`` on ``data`` (10 warm-up runs first); with
    ``flush_bytes``, a buffer that size is written between the timed runs (weights cold)."""
    from keras_qx._runtime import run

    result = run(data, x, num_threads=num_threads, latency_runs=runs, invoke_only=True, flush_bytes=flush_bytes)
    return statistics.median(result.times) * 1e6


def _export(model, bits, x) -> bytes:
    """``model`` quantized at ``bits`` ({layer: bits}), calibrated on ``x``, as an int8-I/O file."""
    from keras_qx.lite.convert import convert_qat
    from keras_qx.qat.calibrate import calibrate
    from keras_qx.qat.quantize import quantize
    from keras_qx.quant.policy import Policy

    qat = quantize(model, Policy.from_bits(bits))
    calibrate(qat, x)
    data, _ = convert_qat(qat, x, int8_io=True)
    return data


def _exported(model, bits, samples) -> tuple:
    """``(file, first sample)``: :func:`_export` of ``model`` calibrated on ``samples`` (one array
    per input), and their first sample, as :func:`_time_file` takes it."""
    data = _export(model, bits, samples if len(samples) > 1 else samples[0])
    first = [s[:1] for s in samples]
    return data, first if len(first) > 1 else first[0]


def _overhead_us(num_threads: int, runs: int) -> float:
    """The runtime's per-invoke time on a file of one trivial op (a float ReLU on 4 values)."""
    from keras_qx._compat import tf

    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.ReLU()(inputs))
    data = tf.lite.TFLiteConverter.from_keras_model(model).convert()
    return _time_file(data, np.ones((1, 4), np.float32), num_threads, runs)


def _one_layer(layer, shapes) -> keras.Model:
    """``layer``'s kind and configuration alone, on inputs of ``shapes``, with its weights."""
    clone = type(layer).from_config(layer.get_config())
    dtype = "int32" if isinstance(layer, keras.layers.Embedding) else "float32"
    inputs = [keras.Input(batch_shape=s, dtype=dtype) for s in shapes]
    out = clone(inputs[0] if len(inputs) == 1 else inputs)
    if layer.get_weights():
        clone.set_weights(layer.get_weights())
    return keras.Model(inputs, out)


def _lengths(model, x) -> list | None:
    """The model input's non-batch ``None`` dimensions, filled from the first sample of ``x``."""
    if x is None:
        return None
    xs = list(x.values()) if isinstance(x, dict) else list(x) if isinstance(x, (list, tuple)) else [x]
    lengths = []
    for spec, xi in zip(model.inputs, xs):
        lengths += [int(v) for s, v in zip(spec.shape[1:], np.shape(xi)[1:]) if s is None]
    return lengths


def _check_runs(num_threads, runs) -> None:
    if isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 1:
        raise ValueError(f"num_threads must be an int >= 1, got {num_threads!r}.")
    if isinstance(runs, bool) or not isinstance(runs, int) or runs < 5:
        raise ValueError(f"runs must be an int >= 5 (timed invocations per file), got {runs!r}.")


def _plan(model, candidates, x):
    """``(model, [(layer, shapes, {bits: storage})], model signature, lengths)``: what a latency
    table times (each layer at each width as the file stores it, and the int8 model)."""
    from keras_qx.engine.sensitivity import quantizable_layers
    from keras_qx.quant.cost import storage_bits
    from keras_qx.rewrite.flatten import flatten_nested
    from keras_qx.rewrite.keras3 import as_tf_keras

    bits_all = sorted({int(b) for b in candidates} | {8})
    model = as_tf_keras(model)
    flat = flatten_nested(model, copies=False)
    lengths = _lengths(model, x)
    plan = []
    for layer in quantizable_layers(model):
        shapes = [_fixed(s, lengths) for s in _node_shapes(flat, layer)]
        if any(s is None for s in shapes):
            raise ValueError(f"layer {layer.name!r} takes inputs of a dynamic length {_node_shapes(flat, layer)}: pass "
                             "x (samples of the length the file will run at) to time it.")
        plan.append((layer, shapes, {b: storage_bits(layer, b) for b in bits_all}))
    signature = "model:" + hashlib.sha1(json.dumps(
        [_signature(l, s, 8) for l, s, _ in plan] + [model.name, len(flat.layers)]).encode()).hexdigest()[:16]
    return model, plan, signature, lengths


def _stored_widths(storages: dict) -> list:
    """``[(storage bits, the narrowest width stored so)]`` of ``{bits: storage bits}``, widest
    storage first: one file each (a 2-bit convolution is the INT4 one)."""
    return [(s, min(b for b, t in storages.items() if t == s)) for s in sorted(set(storages.values()), reverse=True)]


def _layer_file(layer, shapes, bits):
    """``(file, first sample)``: ``layer`` alone at ``bits``, int8 in and out."""
    single = _one_layer(layer, shapes)
    ids = [layer.input_dim if isinstance(layer, keras.layers.Embedding) else None] * len(shapes)
    return _exported(single, {single.layers[-1].name: bits}, _random_inputs(shapes, ids))


def _model_file(model, lengths):
    """``(file, first sample)``: the whole model at uniform int8."""
    return _exported(model, {}, _model_inputs(model, lengths))


def _file_name(signature: str) -> str:
    return signature.replace(":", "-") + ".tflite"


def export_latency_files(model, directory, candidates=(2, 4, 8), *, x=None, verbose: int = 0) -> list:
    """Write the files a :func:`latency_table` times (each quantizable layer alone at each width,
    and the whole int8 model) to ``directory``, to time them on the device the model will run
    on; read the times back with ``latency_table(model, candidates, timings=...)``.

    Each file is named after what it holds (``layer-<hash>-Conv2D-4.tflite``, ``model-<hash>.tflite``);
    the timings are ``{file name: microseconds}`` (e.g. the average LiteRT's ``benchmark_model
    --graph=FILE --num_threads=1`` prints, in µs). Returns the paths written.

    Example:
        >>> paths = qx.export_latency_files(model, "latency_files")    # doctest: +SKIP
    """
    from keras_qx._deprecation import check_verbose

    verbose = check_verbose(verbose, "export_latency_files()")
    model, plan, model_signature, lengths = _plan(model, candidates, x)
    os.makedirs(directory, exist_ok=True)
    jobs = [(_signature(layer, shapes, storage), layer, shapes, bits)
            for layer, shapes, storages in plan for storage, bits in _stored_widths(storages)]
    say, paths = _progress(len(jobs) + 1, verbose, "latency"), []
    for i, (signature, layer, shapes, bits) in enumerate(jobs, 1):
        path = os.path.join(directory, _file_name(signature))
        write_atomic(path, bytes(_layer_file(layer, shapes, bits)[0]))
        paths.append(path)
        say(i, layer.name)
    path = os.path.join(directory, _file_name(model_signature))
    write_atomic(path, bytes(_model_file(model, lengths)[0]))
    say(len(jobs) + 1, "whole model")
    return paths + [path]


def _read_timings(timings) -> dict:
    """``{signature: µs}`` from ``{file name: µs}`` (a dict, or a JSON file of one)."""
    where = "timings"
    if isinstance(timings, (str, os.PathLike)):
        where = repr(os.fspath(timings))
        try:
            with open(timings) as fh:
                timings = json.load(fh)
        except (OSError, ValueError) as err:
            raise ValueError(f"cannot read the timings {where}: {err}. Give a JSON object {{file name: microseconds}}.") \
                from None
    if not isinstance(timings, dict) or not all(isinstance(v, (int, float)) and v >= 0 for v in timings.values()):
        raise ValueError(f"{where} must map the file names export_latency_files wrote to microseconds (numbers >= 0).")
    return {os.path.basename(k)[:-len(".tflite")].replace("-", ":") if k.endswith(".tflite") else k: float(v)
            for k, v in timings.items()}


def latency_table(model, candidates=(2, 4, 8), *, x=None, num_threads: int = 1, cache=None, runs: int = RUNS,
                  timings=None, verbose: int = 0) -> LatencyTable:
    """The :class:`LatencyTable` of ``model``'s quantizable layers at ``candidates`` (and 8 bits),
    measured on this machine's runtime or read from the cache.

    Args:
        model: the float model.
        candidates: weight widths to time (2/4/8; each timed as the file stores it).
        x: samples of the model's input; needed only where the model has a dynamic (``None``)
            dimension, which takes the first sample's length.
        num_threads: the runtime's threads (part of the cache key).
        cache: the cache file (default :func:`default_cache`); ``False``: none.
        runs: timed invocations per file.
        timings: times measured on another device, ``{file name: µs}`` (a dict or a JSON file)
            for the files :func:`export_latency_files` wrote: nothing is timed here (each layer's
            time is taken as warm; the cache is not used).
        verbose: 0 silent, 1 a progress bar on stderr.

    Example:
        >>> latency_table(model, (4, 8)).table()                     # doctest: +SKIP
    """
    from keras_qx._deprecation import check_verbose
    from keras_qx.quant.cost import kernel_bytes

    verbose = check_verbose(verbose, "latency_table()")
    _check_runs(num_threads, runs)
    model, plan, model_signature, lengths = _plan(model, candidates, x)
    if timings is not None:
        imported = _read_timings(timings)
        key, store, l2 = f"timings {timings if isinstance(timings, (str, os.PathLike)) else '(given)'}", None, 0

        needed = [_signature(l, sh, st) for l, sh, sts in plan for st, _ in _stored_widths(sts)] + [model_signature]
        missing = [_file_name(n) for n in needed if n not in imported]
        if missing:
            raise ValueError(f"the timings lack {missing[:3]}{' ...' if len(missing) > 3 else ''} "
                             f"({len(missing)} of {len(needed)} files): time every file "
                             "export_latency_files(model, directory, candidates) wrote for this model.")

        def measured(signature, measure):
            if signature == "overhead":
                return 0.0
            us = imported[signature]
            return [us, us] if signature.startswith("layer:") else us
    else:
        key = runtime_key(num_threads)
        store, l2 = _Cache(cache, key), l2_bytes()

        def measured(signature, measure):
            us = store.get(signature)
            if us is None:
                store.put(signature, measure())
                us = store.get(signature)  # as rounded in the file: a cached table equals a fresh one
            return us

    overhead = measured("overhead", lambda: _overhead_us(num_threads, runs))
    todo = sum(len(_stored_widths(st)) for _, _, st in plan) + 1
    flush = 2 * l2 if l2 else 0
    say = _progress(todo, verbose, "latency")
    done, warm, cold, sizes = 0, {}, {}, {}
    for layer, shapes, storages in plan:
        times = {}
        for storage, bits in _stored_widths(storages):

            def measure(layer=layer, shapes=shapes, bits=bits):
                data, first = _layer_file(layer, shapes, bits)
                return [max(_time_file(data, first, num_threads, runs, f) - overhead, 0.0) for f in (0, flush)]

            try:
                times[storage] = measured(_signature(layer, shapes, storage), measure)
            except Exception as err:  # noqa: BLE001 - one layer that cannot stand alone is timed with the rest
                warnings.warn(f"keras_qx: layer {layer.name!r} ({type(layer).__name__}) could not be timed alone "
                              f"({type(err).__name__}: {str(err)[:200]}); its time counts in the rest of the model "
                              "at every width.", stacklevel=2)
                times = None
                break
            done += 1
            say(done, layer.name)
        if times is not None:
            warm[layer.name] = {b: times[s][0] for b, s in storages.items()}
            cold[layer.name] = {b: times[s][1] for b, s in storages.items()}
            sizes[layer.name] = {b: kernel_bytes(layer, b) for b in storages}

    def whole():
        data, first = _model_file(model, lengths)
        return _time_file(data, first, num_threads, runs)

    int8_us = measured(model_signature, whole)
    say(todo, "whole model")
    if store is not None:
        store.save()
    table = LatencyTable(base_us=0.0, layers=warm, num_threads=num_threads, runtime=key, cold=cold,
                         kernel_bytes=sizes, l2_bytes=l2)
    table.base_us = int8_us - table.total_us({})  # the rest: what the int8 file takes beyond its layers
    return table


def predict_latency(model, policy=None, *, x=None, num_threads: int = 1, cache=None, table: LatencyTable | None = None,
                    verbose: int = 0) -> LatencyPrediction:
    """The predicted time a sample of ``model``'s file takes under ``policy`` on this machine's
    runtime, from the measured per-layer :class:`LatencyTable` (timed once, then cached).

    Args:
        model: the float model; policy: anything ``qx.quantize`` takes (None: uniform int8).
        x, num_threads, cache, verbose: as :func:`latency_table` takes them.
        table: a table already measured (skips the cache).

    Example:
        >>> qx.predict_latency(model, {"rules": [{"type": "Conv2D", "weight_bits": 4}]}).table()  # doctest: +SKIP
    """
    from keras_qx.engine.sensitivity import quantizable_layers
    from keras_qx.qat.quantize import resolve
    from keras_qx.rewrite.keras3 import as_tf_keras

    model = as_tf_keras(model)
    specs = resolve(model, policy)
    bits = {}
    for layer in quantizable_layers(model):
        spec = specs.get(layer.name)
        # "pack": false stores a sub-byte kernel on an int8 carrier: it runs as an int8 layer
        bits[layer.name] = None if spec is None or not spec.quantize else spec.weight_bits if spec.pack else 8
    needed = sorted({b for b in bits.values() if b is not None} | {8})
    if table is None:
        table = latency_table(model, needed, x=x, num_threads=num_threads, cache=cache, verbose=verbose)
    floats = [n for n, b in bits.items() if b is None and n in table.layers]
    if floats:
        raise ValueError(f"layer {floats[0]!r} is kept float by the policy: the latency model times integer "
                         "layers only; predict with it quantized, or measure the file (qx.profile_tflite).")
    times = table.layer_times(bits)
    rows = {name: (b, times[name]) for name, b in bits.items() if name in table.layers}
    total = table.base_us + sum(us for _, us in rows.values())
    return LatencyPrediction(total_us=total, base_us=table.base_us, layers=rows, runtime=table.runtime)
