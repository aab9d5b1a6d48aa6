"""``qx.profile_tflite``: the time of each op of a TFLite file, per layer, in the LiteRT runtime.

The Python LiteRT interpreter has no op profiler, so each op of the main graph is timed on its
own: the file is cut into single-op models (the op, its tensors and constants; its non-constant
inputs become the model's inputs), fed the values the whole file gives that op on one sample
(run once with every intermediate kept), and invoked ``warmup`` then ``runs`` times with the
same kernel set and thread count as asked; the median is taken. The whole file and an empty
graph (no operator: the cost of one ``invoke`` from Python) are timed the same way, one after
the other. Each op's time is its median minus that invoke overhead (clipped at 0). All of it
runs in a child process (:func:`keras_qx._runtime.run_profile`), where a native abort becomes
``RuntimeCrash``.

Measured on ai-edge-litert 2.3 (2-core VM under load, 1 thread, 50 runs): the invoke overhead is
0.3-0.5 µs. On the built-in kernels the sum of the ops came to 0.83-1.08 of the whole file's
time less that overhead (digits CNN: 35-44 vs 39-45 µs, the lowest under the heaviest load).
With XNNPACK each op alone pays the
delegate's own call, which the whole file pays once a partition: the sum runs over on µs-sized
ops (digits CNN 7.5-8.2 vs 6.1-7.0 µs; a 4-op toy 2.7-3.6 vs 2.2 µs), and a file with a built-in
INT4 convolution came out 14% under (22.6 vs 26.2 µs).

Example:
    >>> prof = qx.profile_tflite("model.tflite", x_test)      # doctest: +SKIP
    >>> print(prof.table()); prof.plot("profile.png")          # doctest: +SKIP
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np

from keras_qx._compat import tflite_model_bytes, tflite_model_object
from keras_qx._deprecation import check_verbose
from keras_qx._plot import axes, finish
from keras_qx._runtime import run_profile
from keras_qx.lite import inspect as _inspect
from keras_qx.lite.inspect import _constant, _schema, _text, inspect_tflite, read_model
from keras_qx.lite.edit import builtin_code

__all__ = ["Profile", "profile_tflite"]

OTHER = "(other)"  # the layer of an op no layer name reaches (an edge QUANTIZE, an unnamed output)


@dataclass
class Profile:
    """What :func:`profile_tflite` measured: one row per op of the main graph, in graph order.

    ``ops``: dicts ``{"index", "op", "layer", "kernel" ("xnnpack" or "builtin": what ran the op
    when it was timed), "model_kernel" (what runs it in the whole file), "us" (median
    microseconds, the invoke overhead subtracted), "share" (of the sum of the ops)}``.
    ``whole_us``: the whole file's median (one invoke, overhead included); ``overhead_us``: the
    median invoke of an empty graph; ``delegate``: the whole file's kernel set ("xnnpack", or
    "builtin" where XNNPACK was off or declined the graph)."""

    ops: list = field(default_factory=list)
    whole_us: float = 0.0
    overhead_us: float = 0.0
    num_threads: int = 1
    warmup: int = 10
    runs: int = 50
    delegate: str = "xnnpack"
    runtime: str = ""

    @property
    def total_us(self) -> float:
        """The sum of the ops' times (µs): compare with ``whole_us - overhead_us``."""
        return float(sum(op["us"] for op in self.ops))

    def by_layer(self) -> dict:
        """``{layer: µs}``, the ops' times summed per layer, in graph order."""
        out: dict = {}
        for op in self.ops:
            out[op["layer"]] = out.get(op["layer"], 0.0) + op["us"]
        return out

    def header(self) -> str:
        """One line: runtime, kernel set, threads, warm-up and runs, whole file vs sum of ops."""
        kernels = "XNNPACK where it takes the op, else built-in" if self.delegate == "xnnpack" else "built-in"
        return (f"{self.runtime}, {kernels} kernels, {self.num_threads} thread(s); each op timed alone, median of "
                f"{self.runs} runs after {self.warmup} warm-up, less the invoke overhead of "
                f"{self.overhead_us:.2f} µs. Whole file {self.whole_us:.2f} µs "
                f"({self.whole_us - self.overhead_us:.2f} µs without the overhead); sum of the ops {self.total_us:.2f} µs.")

    def table(self) -> str:
        """A Markdown table, one row per op, under :meth:`header`."""
        lines = [self.header(), "", "| # | op | layer | kernel | µs | share |", "|---|---|---|---|---|---|"]
        lines += [f"| {op['index']} | {op['op']} | {op['layer']} | {op['kernel']} | {op['us']:.2f} | "
                  f"{op['share']:.1%} |" for op in self.ops]
        moved = [op["index"] for op in self.ops if op["kernel"] != op["model_kernel"]]
        if moved:
            lines.append(f"\nOps {moved} ran on other kernels alone than in the whole file (model_kernel).")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """Plain data (JSON-serializable): the rows and the conditions they were measured in."""
        return {"runtime": self.runtime, "delegate": self.delegate, "num_threads": self.num_threads,
                "warmup": self.warmup, "runs": self.runs, "whole_us": self.whole_us,
                "overhead_us": self.overhead_us, "total_us": self.total_us, "by_layer": self.by_layer(),
                "ops": [dict(op) for op in self.ops]}

    def plot(self, path=None, ax=None):
        """Time per layer (µs), one horizontal bar each, in graph order from the top."""
        layers = self.by_layer()
        fig, ax = axes(ax, figsize=(7, max(2.5, 0.3 * len(layers) + 1.2)))
        names = list(layers)
        ax.barh(range(len(names)), [layers[n] for n in names], color="C0")
        ax.set_yticks(range(len(names)))
        ax.set_yticklabels(names, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("µs (median, invoke overhead subtracted)")
        ax.set_title(f"Time per layer: {self.total_us:.1f} µs of ops, whole file {self.whole_us:.1f} µs "
                     f"({self.delegate}, {self.num_threads} thread(s))", fontsize=9)
        ax.grid(True, axis="x", alpha=0.3)
        finish(fig, path)
        return ax


def _count(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int >= 1, got {value!r}; e.g. {name}=10.")
    if value < 1:
        raise ValueError(f"{name} must be at least 1, got {value}; e.g. {name}=10.")
    return int(value)


def _constant_dequantize(model) -> dict:
    """``{tensor: op}`` of the main graph's tensors a DEQUANTIZE makes from a constant (float16
    or sparse weights): XNNPACK reads those weights through it, so an op is timed with its
    DEQUANTIZE in front (the built-in kernel dequantizes a constant once, when it prepares)."""
    schema = _schema()
    graph = model.subgraphs[0]
    out = {}
    for op in graph.operators:
        if builtin_code(model, op) == schema.BuiltinOperator.DEQUANTIZE and op.inputs is not None and \
                all(t >= 0 and _constant(model, graph.tensors[t]) for t in op.inputs):
            out.update({int(t): op for t in op.outputs})
    return out


def _single_op_models(model) -> tuple[list, list]:
    """``(single-op flatbuffers, their inputs as tensor indices of the file)``, one per op of the
    main graph: the op (behind the DEQUANTIZEs of its constant weights) with its own tensors,
    the constants' buffers only (the others emptied, indices kept), the other subgraphs as they
    are (control flow), no signature."""
    schema = _schema()
    graph = model.subgraphs[0]
    made = _constant_dequantize(model)
    rest = {int(t.buffer) for g in model.subgraphs[1:] for t in g.tensors}
    rest |= {int(m.buffer) for m in model.metadata or []}
    out, inputs = [], []
    for op in graph.operators:
        ops = list({id(made[int(t)]): made[int(t)] for t in op.inputs if int(t) in made}.values()) + [op]
        own = [int(t) for o in ops for t in [*o.inputs, *o.outputs,
                                              *(o.intermediates if o.intermediates is not None else [])] if t >= 0]
        order = list(dict.fromkeys(own))
        where = {t: i for i, t in enumerate(order)}
        feeds = list(dict.fromkeys(int(t) for t in op.inputs if t >= 0 and int(t) not in made and not
                                   _constant(model, graph.tensors[t]) and not graph.tensors[t].isVariable))
        singles = []
        for o in ops:
            single = copy.copy(o)
            single.inputs = np.array([where[int(t)] if t >= 0 else -1 for t in o.inputs], np.int32)
            single.outputs = np.array([where[int(t)] for t in o.outputs], np.int32)
            if o.intermediates is not None:
                single.intermediates = np.array([where[int(t)] for t in o.intermediates], np.int32)
            singles.append(single)
        sub = copy.copy(graph)
        sub.tensors = [graph.tensors[t] for t in order]
        sub.inputs = np.array([where[t] for t in feeds], np.int32)
        sub.outputs = np.array(singles[-1].outputs, np.int32)
        sub.operators = singles
        keep = rest | {int(t.buffer) for t in sub.tensors}
        copy_ = copy.copy(model)
        copy_.buffers = [b if i in keep else schema.BufferT() for i, b in enumerate(model.buffers)]
        copy_.subgraphs = [sub, *model.subgraphs[1:]]
        copy_.signatureDefs = None
        out.append(tflite_model_bytes(copy_))
        inputs.append(feeds)
    return out, inputs


def _empty_model(model) -> bytes:
    """A graph without operators (its first input is its output): invoking it costs only the
    call from Python into the interpreter."""
    schema = _schema()
    graph = model.subgraphs[0]
    tensor = copy.copy(graph.tensors[int(graph.inputs[0])] if graph.inputs is not None and len(graph.inputs)
                       else graph.tensors[0])
    tensor.buffer = 0
    tensor.isVariable = False
    sub = copy.copy(graph)
    sub.tensors, sub.operators = [tensor], []
    sub.inputs = sub.outputs = np.array([0], np.int32)
    empty = copy.copy(model)
    empty.subgraphs, empty.buffers, empty.signatureDefs = [sub], [schema.BufferT()], None
    empty.metadata = empty.metadataBuffer = None
    return tflite_model_bytes(empty)


def _layer_names(model) -> dict:
    """``{name as the file may spell it: layer name}`` of a Keras or QAT model's layers, nested
    models' included: a tfmot wrapper ``quant_conv`` stands for its layer ``conv``."""
    names: dict = {}
    todo = list(getattr(model, "layers", []))
    while todo:
        layer = todo.pop(0)
        inner = getattr(layer, "layer", None)
        name = inner.name if inner is not None and hasattr(layer, "quantize_config") else layer.name
        for spelled in (layer.name, name, "quant_" + name):
            names.setdefault(spelled, name)
        todo.extend(getattr(layer, "layers", []))
    return names


_WEIGHT_OPS = ("conv", "depthwise", "matmul", "einsum", "tensordot", "embedding_lookup", "biasadd")


def _not_weight_op(path: str) -> bool:
    """Whether an op path (``model/conv/Conv2D``) does not end in an op that reads weights."""
    return not any(w in path.rsplit("/", 1)[-1].lower() for w in _WEIGHT_OPS)


def _layer(kernels: list, outputs: list, names: dict | None) -> str:
    """The layer an op belongs to, from tensor names: each name's op paths (";"-separated) split
    on "/"; its weights' names first, the path of a weight op first (a folded activation, batch
    norm or padding joins it: ``relu/Relu6;bn/FusedBatchNormV3;conv/depthwise;;pad/Pad``), then
    the others from the last; then its outputs' names, their first path first (a fused output is named
    ``relu/Relu;conv/Conv2D``, but a RESHAPE's ``flat/Reshape;relu/FakeQuant...``). With the
    model's layer names, the first segment that is one; without, tfmot's ``quant_`` segment (the
    prefix stripped), else the segment after the model's name."""
    paths = [p.split("/") for name in kernels for p in sorted(reversed(name.split(";")), key=_not_weight_op)]
    paths += [p.split("/") for name in outputs for p in name.split(";")]
    if names is not None:
        for segments in paths:
            for segment in segments:
                if segment in names:
                    return names[segment]
        return OTHER
    for segments in paths:
        for segment in segments[1:]:
            if segment.startswith("quant_") and len(segment) > 6:
                return segment[6:]
    for segments in paths:
        if len(segments) >= 3:
            return segments[1]
    return OTHER


def _first_sample(x):
    """The first sample of ``x`` (an array, a list of arrays or a dict by input name), batched."""
    if isinstance(x, dict):
        return {k: np.asarray(v)[:1] for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [np.asarray(v)[:1] for v in x]
    return np.asarray(x)[:1]


def profile_tflite(tflite, x=None, *, model=None, num_threads: int = 1, xnnpack: bool = True, runs: int = 50,
                   warmup: int = 10, verbose: int = 0) -> Profile:
    """Time each op of a TFLite file in the runtime, per layer.

    Each op of the main graph runs alone as a single-op model fed the values the whole file
    gives it on one sample (see the module docstring for the method and its measured accuracy).

    Args:
        tflite: a path, the file's bytes, or what ``qx.export_tflite`` returned.
        x: samples as the file takes them (an array; a list or a dict by input name for several
            inputs); only the first is used. None: a generated sample (int8 inputs over their
            whole range, float inputs in [-1, 1], integer ids 0); a file with a dynamic
            dimension needs ``x``.
        model: the Keras or QAT model the file came from: ops are named by its layers (else by
            the layer names read from the file's tensor names).
        num_threads: interpreter threads.
        xnnpack: XNNPACK where it takes an op (the runtime's default); False: built-in kernels.
        runs, warmup: timed and untimed invokes of each op, of the whole file and of the empty graph.
        verbose: 1 prints the table.

    Returns:
        :class:`Profile` with ``.ops``, ``.by_layer()``, ``.table()``, ``.to_dict()`` and ``.plot(path)``.

    Raises:
        RuntimeCrash: the runtime aborted, crashed or hung on the file or one of its ops.

    Example:
        >>> prof = qx.profile_tflite("model.tflite", x_test, model=qat)    # doctest: +SKIP
        >>> prof.by_layer()                                                 # doctest: +SKIP
        {'conv1': 2.9, 'conv2': 3.0, 'pool': 0.2, ...}
    """
    verbose = check_verbose(verbose, "profile_tflite")
    num_threads, runs, warmup = _count(num_threads, "num_threads"), _count(runs, "runs"), _count(warmup, "warmup")
    if not isinstance(xnnpack, (bool, np.bool_)):
        raise TypeError(f"xnnpack must be True (XNNPACK where it takes an op) or False (built-in kernels), "
                        f"got {xnnpack!r}.")
    if model is not None and not hasattr(model, "layers"):
        raise TypeError(f"model must be the Keras or QAT model the file came from (it names the layers), got "
                        f"{type(model).__name__}.")
    data = read_model(tflite)
    info = inspect_tflite(data)
    dynamic = [(name, shape) for name, _, shape in info.inputs if None in shape]
    if x is None and dynamic:
        name, shape = dynamic[0]
        shown = "(" + ", ".join("None" if s is None else str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"
        raise ValueError(f"input {name!r} of the file has a dynamic dimension {shown}: profile_tflite cannot make "
                         "up a sample of it; pass x=samples of the length to time (the first sample is used).")
    flat = tflite_model_object(data)
    _schema()  # fills the op names
    graph = flat.subgraphs[0]
    op_models, op_inputs = _single_op_models(flat)
    names = _layer_names(model) if model is not None else None
    rows = []
    made = _constant_dequantize(flat)
    for k, op in enumerate(graph.operators):
        weights = [int(made[int(t)].inputs[0]) if int(t) in made else int(t) for t in op.inputs if t >= 0]
        kernels = [_text(graph.tensors[t].name) for t in weights if t >= 0 and
                   _constant(flat, graph.tensors[t]) and len(graph.tensors[t].shape) >= 2]
        outputs = [_text(graph.tensors[t].name) for t in op.outputs if t >= 0]
        rows.append({"index": k, "op": _inspect._OP_NAMES.get(builtin_code(flat, op), "CUSTOM"),
                     "layer": _layer(kernels, outputs, names)})
    meta = run_profile(data, op_models, op_inputs, _empty_model(flat), None if x is None else _first_sample(x),
                       num_threads=num_threads, xnnpack=xnnpack, runs=runs, warmup=warmup)
    overhead = meta["overhead_s"] * 1e6
    for row, measured in zip(rows, meta["ops"]):
        row.update(kernel=measured["kernel"], model_kernel=measured["model_kernel"],
                   us=max(0.0, measured["median_s"] * 1e6 - overhead))
    total = sum(row["us"] for row in rows)
    for row in rows:
        row["share"] = row["us"] / total if total else 0.0
    result = Profile(rows, meta["whole_s"] * 1e6, overhead, num_threads, warmup, runs, meta["delegate"],
                     meta["runtime"])
    if verbose:
        print(result.table())
    return result
