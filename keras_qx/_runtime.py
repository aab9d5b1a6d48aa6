"""The TFLite runtime (LiteRT), in this process or in a child process.

A file can abort the runtime natively (a failed check inside a kernel ends the process with
SIGABRT: no exception reaches Python). keras_qx therefore runs files it has not seen run before
(verification, evaluation) through :func:`run`, which executes them in a child Python that
imports only numpy and LiteRT (0.2 s to start), and turns a crash into :class:`RuntimeCrash`
with the runtime's last words. This module is run as that child by path, so it imports nothing
of keras_qx.

Example:
    >>> result = run(model_bytes, x_test)            # doctest: +SKIP
    >>> result.outputs.shape, result.delegate         # doctest: +SKIP
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np

__all__ = ["Runner", "RunResult", "RuntimeCrash", "run", "interpreter", "quantize_input", "io_details",
           "debug_interpreter", "ops_details", "dynamic_inputs", "resize_inputs", "run_tensors", "TensorsResult",
           "run_profile"]

TIMEOUT_S = 600


class RuntimeCrash(RuntimeError):
    """The TFLite runtime ended its process (abort, segfault) or hung on a model."""


@dataclass
class RunResult:
    outputs: list  # dequantized outputs, one (n, ...) array per model output, in the model's order
    output_steps: list  # one quantization step of each output (0 for float)
    delegate: str  # "xnnpack", or "builtin" where XNNPACK declined the graph
    times: list  # seconds of each timed single-sample invocation

    @property
    def output(self) -> np.ndarray:
        """The first output (a single-output model's only one)."""
        return self.outputs[0]


def interpreter(model: bytes, num_threads: int = 1, xnnpack: bool = True, preserve_all_tensors: bool = False,
                allocate: bool = True):
    """A LiteRT interpreter, allocated unless ``allocate=False`` (a file with dynamic input
    dimensions is allocated after :func:`resize_inputs`); ``xnnpack=False``: the built-in
    kernels only."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    resolver = OpResolverType.AUTO if xnnpack else OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    result = Interpreter(model_content=bytes(model), num_threads=num_threads,
                         experimental_preserve_all_tensors=preserve_all_tensors,
                         experimental_op_resolver_type=resolver)
    if allocate:
        result.allocate_tensors()
    return result


def dynamic_inputs(interp) -> bool:
    """Whether an input of the file has a dynamic dimension (-1 in its shape signature)."""
    return any((np.asarray(d.get("shape_signature", d["shape"])) < 0).any() for d in interp.get_input_details())


def resize_inputs(interp, shapes) -> None:
    """Resize the inputs to ``shapes`` (one full shape, batch axis included, per input in the
    file's order) and allocate: XNNPACK (and every kernel) plans its buffers per shape, so a
    dynamic dimension must be fixed before each new length is run."""
    for detail, shape in zip(interp.get_input_details(), shapes):
        interp.resize_tensor_input(detail["index"], [int(s) for s in shape], strict=True)
    interp.allocate_tensors()


def quantize_input(x, detail) -> np.ndarray:
    """Float samples as the input tensor ``detail`` takes them (quantized to its int8 scale)."""
    dtype = detail["dtype"]
    scale, zero = detail["quantization"]
    if dtype == np.float32 or not scale:  # float, or integer ids (not quantized values)
        return x.astype(dtype)
    info = np.iinfo(dtype)
    return np.clip(np.round(x / scale + zero), info.min, info.max).astype(dtype)


def io_details(interp) -> tuple[list, list]:
    """``(inputs, outputs)``: the tensor details in the model's own order, each with its
    signature name under ``"signature_name"`` where the file has a signature.

    The subgraph keeps the inputs in the order of the converted function's arguments, but may
    list the outputs in any order (measured: reversed for two outputs); the signature's
    ``output_0, output_1, ...`` follow the function's return order."""
    inputs, outputs = interp.get_input_details(), interp.get_output_details()
    signatures = interp.get_signature_list()
    if len(signatures) == 1:
        runner = interp.get_signature_runner(next(iter(signatures)))
        by_index = {d["index"]: name for name, d in runner.get_input_details().items()}
        inputs = [{**d, "signature_name": by_index.get(d["index"], d["name"])} for d in inputs]
        named = runner.get_output_details()
        index = {d["index"]: d for d in outputs}
        if set(index) == {d["index"] for d in named.values()}:
            keys = sorted(named, key=lambda k: (len(k), k))  # output_0, ..., output_9, output_10
            outputs = [{**index[named[k]["index"]], "signature_name": k} for k in keys]
    return inputs, outputs


class Runner:
    """Run a TFLite model (bytes) on float data, (de)quantizing int8 I/O as needed.

    ``predict`` takes one array per input (a single array for a single-input model) and, like
    Keras, returns one array for a single-output model and a list otherwise."""

    def __init__(self, model: bytes, num_threads: int = 1):
        self.model = bytes(model)
        self.num_threads = num_threads
        self.delegate = "xnnpack"
        self.interpreter = interpreter(self.model, num_threads, allocate=False)
        self.dynamic = dynamic_inputs(self.interpreter)
        self._shapes = None  # the input shapes the interpreter is allocated for
        if not self.dynamic:
            self._allocate(None)
        self.inputs, self.outputs = io_details(self.interpreter)
        self.input, self.output = self.inputs[0], self.outputs[0]

    def _allocate(self, shapes) -> None:
        """Allocate for ``shapes`` (full input shapes; None: the file's own), resizing a file with
        dynamic dimensions first, only when the shapes change."""
        if shapes is None or not self.dynamic:
            if self._shapes is None:
                self.interpreter.allocate_tensors()
                self._shapes = "static"
            return
        if shapes != self._shapes:
            resize_inputs(self.interpreter, shapes)
            self._shapes = shapes

    @property
    def input_shape(self):
        return self.input_shapes[0]

    @property
    def input_shapes(self) -> list:
        """Each input's shape without the batch axis; None where the file's is dynamic."""
        return [tuple(int(s) if s >= 0 else None for s in d.get("shape_signature", d["shape"])[1:])
                for d in self.inputs]

    @property
    def output_step(self) -> float:
        """One quantization step of the (first) output (0 for a float output)."""
        return self.output_steps[0]

    @property
    def output_steps(self) -> list:
        return [float(d["quantization"][0]) if d["dtype"] != np.float32 else 0.0 for d in self.outputs]

    @staticmethod
    def _dequantize(y, detail):
        if detail["dtype"] == np.float32:
            return y.astype(np.float32)
        scale, zero = detail["quantization"]
        return ((y.astype(np.float32) - zero) * scale).astype(np.float32)

    def _invoke(self, samples) -> None:
        # A fused recurrent op (UNIDIRECTIONAL_SEQUENCE_LSTM) keeps its state in variable tensors
        # across invocations; a Keras model starts each sample from zeros (measured: without the
        # reset, an LSTM file's outputs drift up to 0.93 from Keras's, with it 5e-7).
        self._allocate([(1, *np.shape(sample)) for sample in samples])  # batch 1, the sample's lengths
        self.interpreter.reset_all_variables()
        for detail, sample in zip(self.inputs, samples):
            self.interpreter.set_tensor(detail["index"], quantize_input(sample[None], detail))
        self.interpreter.invoke()

    def invoke_all(self, samples) -> list:
        """All outputs for one sample of each input (no batch axis)."""
        try:
            self._invoke(samples)
        except RuntimeError as err:
            # XNNPACK declines some quantized graphs ("failed to create XNNPACK runtime");
            # the built-in kernels run them. Latency then reflects the built-in kernels.
            if self.delegate != "xnnpack" or "XNNPACK" not in str(err):
                raise
            self.delegate = "builtin"
            self.interpreter = interpreter(self.model, self.num_threads, xnnpack=False, allocate=False)
            self._shapes = None
            self._invoke(samples)
        return [self._dequantize(self.interpreter.get_tensor(d["index"]), d)[0] for d in self.outputs]

    def invoke_one(self, sample) -> np.ndarray:
        """The first output for one sample of a single-input model."""
        return self.invoke_all([sample])[0]

    def as_inputs(self, x) -> list:
        """``x`` as one float (or integer-id) array per input, in the file's input order, shapes
        checked. Several inputs: a dict keyed by input name (the file does not keep the model's
        input order: the converter may list them in any order), or a list in the file's order."""
        if isinstance(x, dict):
            names = [d.get("signature_name", d["name"]) for d in self.inputs]
            if sorted(x) != sorted(names):
                raise ValueError(f"the inputs are keyed {sorted(x)}, but the file's inputs are {names}.")
            xs = [x[name] for name in names]
        else:
            xs = list(x) if isinstance(x, (list, tuple)) else [x]
        if len(xs) != len(self.inputs):
            raise ValueError(f"the model takes {len(self.inputs)} inputs; got {len(xs)} arrays.")
        out = []
        for detail, shape, xi in zip(self.inputs, self.input_shapes, xs):
            xi = np.asarray(xi, dtype=np.float32 if detail["quantization"][0] else detail["dtype"])
            if len(xi.shape) != len(shape) + 1 or any(s is not None and s != v for s, v in zip(shape, xi.shape[1:])):
                shown = "(" + ", ".join("any" if s is None else str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"
                raise ValueError(f"input {detail.get('signature_name', detail['name'])!r}: samples shaped {xi.shape[1:]} "
                                 f"do not fit the file's input {shown} (per sample"
                                 + ("; 'any' is a dynamic dimension" if None in shape else
                                    "; a model's None dimension is fixed in a file exported at one length") +
                                 "); pass samples of that shape (crop or pad them), or export the model again "
                                 "with representative data of this shape.")
            out.append(xi)
        return out

    def predict(self, x):
        xs = self.as_inputs(x)
        rows = [self.invoke_all([xi[i] for xi in xs]) for i in range(len(xs[0]))]
        outputs = [np.stack([row[j] for row in rows]) for j in range(len(self.outputs))]
        return outputs[0] if len(outputs) == 1 else outputs


def debug_interpreter(model: bytes):
    """An in-process interpreter that keeps every intermediate tensor (built-in kernels)."""
    return interpreter(model, xnnpack=False, preserve_all_tensors=True)


def ops_details(interpreter) -> list:
    """Each op of the main graph: ``{"op_name", "inputs", "outputs", ...}``."""
    return interpreter._get_ops_details()


@dataclass
class TensorsResult:
    """Every intermediate tensor of a file run sample by sample (built-in kernels), by
    :func:`run_tensors`: the graph's description and the raw (quantized) values."""

    tensors: dict  # index -> {"name", "dtype" (numpy name), "shape", "quantization": (scale, zero)}
    ops: list  # each op of the main graph: {"index", "op_name", "inputs", "outputs"}
    inputs: list  # the input tensor indices, in the file's order
    outputs: list  # the output tensor indices, in the file's (subgraph) order
    values: dict  # tensor index -> (n, ...) raw values, one row per sample


def _child_tensors(workdir: str, job: dict) -> None:
    """The child's side of :func:`run_tensors`."""
    with open(os.path.join(workdir, "model.tflite"), "rb") as fh:
        model = fh.read()
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    interp = Interpreter(model_content=model, experimental_preserve_all_tensors=True,
                         experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    inputs = interp.get_input_details()
    dynamic = any((np.asarray(d.get("shape_signature", d["shape"])) < 0).any() for d in inputs)
    if not dynamic:
        interp.allocate_tensors()
    arrays = [np.load(os.path.join(workdir, f"x{i}.npy"), allow_pickle=False) for i in range(len(job["inputs"]))]
    details = {int(d["index"]): d for d in interp.get_tensor_details()}
    ops = [{"index": int(op["index"]), "op_name": str(op["op_name"]), "inputs": [int(t) for t in op["inputs"]],
            "outputs": [int(t) for t in op["outputs"]]} for op in ops_details(interp)]
    wanted = sorted({t for op in ops for t in op["outputs"] if t in details} | {int(d["index"]) for d in inputs})
    rows = {t: [] for t in wanted}
    for i in range(len(arrays[0]) if arrays else 0):
        if dynamic:  # a dynamic dimension is fixed to this sample's lengths before it runs
            for detail, xi in zip(inputs, arrays):
                interp.resize_tensor_input(detail["index"], [1, *np.shape(xi[i])], strict=True)
            interp.allocate_tensors()
        interp.reset_all_variables()  # a recurrent op's state starts from zeros per sample, as in Keras
        for detail, xi in zip(inputs, arrays):
            interp.set_tensor(detail["index"], quantize_input(np.asarray(xi[i])[None], detail))
        interp.invoke()
        for t in list(rows):
            try:
                rows[t].append(np.array(interp.get_tensor(t))[0])
            except (ValueError, IndexError):  # a tensor without data, or a scalar: nothing per sample
                del rows[t]
    np.savez(os.path.join(workdir, "tensors.npz"), **{f"t{t}": np.stack(v) for t, v in rows.items() if v})
    meta = {"tensors": {str(t): {"name": d["name"], "dtype": np.dtype(d["dtype"]).name,
                                 "shape": [int(s) for s in d["shape"]],
                                 "quantization": [float(d["quantization"][0]), int(d["quantization"][1])]}
                        for t, d in details.items()},
            "ops": ops, "inputs": [int(d["index"]) for d in inputs],
            "outputs": [int(d["index"]) for d in interp.get_output_details()]}
    with open(os.path.join(workdir, "meta.json.tmp"), "w") as fh:
        json.dump(meta, fh)
    os.replace(os.path.join(workdir, "meta.json.tmp"), os.path.join(workdir, "meta.json"))


def _delegated_ops(details: list, n_ops: int) -> set:
    """The indices of the file's ops (0..n_ops-1) a delegate took: each DELEGATE node replaces
    the ops between its input and output tensors (walked back from its outputs)."""
    producer = {int(t): int(op["index"]) for op in details if int(op["index"]) < n_ops for t in op["outputs"]}
    inputs_of = {int(op["index"]): [int(t) for t in op["inputs"]] for op in details if int(op["index"]) < n_ops}
    taken = set()
    for node in details:
        if node["op_name"] != "DELEGATE":
            continue
        stop = {int(t) for t in node["inputs"]}
        todo = [int(t) for t in node["outputs"]]
        while todo:
            t = todo.pop()
            k = producer.get(t)
            if t in stop or k is None or k in taken:
                continue
            taken.add(k)
            todo.extend(i for i in inputs_of[k] if i >= 0)
    return taken


def _profile_interpreter(model: bytes, num_threads: int, xnnpack: bool, shapes: dict, values: dict):
    """``(interpreter, kernel)`` allocated for ``shapes`` (tensor index -> shape, resized where
    they differ from the file's), inputs set from ``values``, run once; XNNPACK refusing the
    graph falls back to the built-in kernels, as :class:`Runner` does."""
    try:
        interp = interpreter(model, num_threads, xnnpack=xnnpack, allocate=False)
        for detail in interp.get_input_details():
            shape = shapes[int(detail["index"])]
            if list(detail["shape"]) != list(shape):
                interp.resize_tensor_input(detail["index"], list(shape))
        interp.allocate_tensors()
        for detail in interp.get_input_details():
            interp.set_tensor(detail["index"], values[int(detail["index"])])
        interp.reset_all_variables()
        interp.invoke()
    except RuntimeError as err:
        if not xnnpack or "XNNPACK" not in str(err).upper():
            raise
        return _profile_interpreter(model, num_threads, False, shapes, values)
    details = interp._get_ops_details()
    return interp, "xnnpack" if any(op["op_name"] == "DELEGATE" for op in details) else "builtin"


def _invoke_times(interp, runs: int, warmup: int, flush_bytes: int = 0) -> list:
    """The seconds of ``runs`` invokes of ``interp`` (inputs already set) after ``warmup`` untimed
    ones, back to back, the variables reset before each (untimed). ``flush_bytes``: a buffer that
    size is written between the timed runs (untimed), so the model's weights come from beyond the
    caches it evicts, as in a larger model.

    Interleaving interpreters round by round would spread a shared machine's load more evenly,
    but measured on ai-edge-litert 2.3 it makes an XNNPACK op take ~7 times longer in some
    processes (0.9 -> 6.6 µs, a FULLY_CONNECTED, all its invokes alike: presumably XNNPACK sets up
    again after another runtime ran), so each interpreter is timed alone."""
    scratch = np.zeros(int(flush_bytes), np.uint8)
    for _ in range(warmup):
        interp.reset_all_variables()
        interp.invoke()
    times = []
    for _ in range(runs):
        interp.reset_all_variables()
        if scratch.size:
            scratch += 1
        start = time.perf_counter()
        interp.invoke()
        times.append(time.perf_counter() - start)
    return times


def _median_invoke(interp, runs: int, warmup: int) -> float:
    """The median seconds of :func:`_invoke_times`."""
    return float(np.median(_invoke_times(interp, runs, warmup)))


def _child_profile(workdir: str, job: dict) -> None:
    """The child's side of :func:`run_profile`: every op of the main graph timed on its own (one
    single-op model per op, fed the values the whole file gives it on the sample), the whole
    file, and an empty graph (the invoke overhead), one after the other."""
    from importlib.metadata import version

    spec = job["profile"]
    threads, xnnpack, runs, warmup = spec["num_threads"], spec["xnnpack"], spec["runs"], spec["warmup"]
    with open(os.path.join(workdir, "model.tflite"), "rb") as fh:
        model = fh.read()
    debug = interpreter(model, num_threads=threads, xnnpack=False, preserve_all_tensors=True, allocate=False)
    inputs = debug.get_input_details()
    if job["inputs"]:  # the caller's samples: the first one, checked and quantized as run() does
        runner = Runner(model, threads)
        names = job["inputs"]
        arrays = [np.load(os.path.join(workdir, f"x{i}.npy"), allow_pickle=False) for i in range(len(names))]
        xs = runner.as_inputs(dict(zip(names, arrays)) if all(names) else arrays)
        detail_of = {int(d["index"]): d for d in runner.inputs}
        order = [int(d["index"]) for d in runner.inputs]
        sample = {t: quantize_input(np.asarray(xi[0])[None], detail_of[t]) for t, xi in zip(order, xs)}
    else:  # a generated sample: int8 values over the whole range, floats in [-1, 1], integer ids 0
        rng = np.random.default_rng(spec.get("seed", 0))
        sample = {}
        for d in inputs:
            shape = [1 if i == 0 else int(s) for i, s in enumerate(d.get("shape_signature", d["shape"]))]
            dtype = np.dtype(d["dtype"])
            if dtype.kind == "f":
                sample[int(d["index"])] = rng.uniform(-1, 1, shape).astype(dtype)
            elif d["quantization"][0] and dtype.kind in "iu":
                info = np.iinfo(dtype)
                sample[int(d["index"])] = rng.integers(info.min, info.max, shape, endpoint=True).astype(dtype)
            else:
                sample[int(d["index"])] = np.zeros(shape, dtype)
    for d in inputs:  # the file's shapes, fixed to the sample's (batch 1, its lengths)
        debug.resize_tensor_input(d["index"], list(sample[int(d["index"])].shape))
    debug.allocate_tensors()
    for d in inputs:
        debug.set_tensor(d["index"], sample[int(d["index"])])
    debug.reset_all_variables()
    debug.invoke()
    whole_values = {int(d["index"]): sample[int(d["index"])] for d in inputs}
    whole, delegate = _profile_interpreter(model, threads, xnnpack,
                                           {t: v.shape for t, v in whole_values.items()}, whole_values)
    taken = _delegated_ops(whole._get_ops_details(), len(spec["op_inputs"])) if delegate == "xnnpack" else set()
    with open(os.path.join(workdir, "empty.tflite"), "rb") as fh:
        empty_model = fh.read()
    empty_values = {int(d["index"]): np.zeros(d["shape"], d["dtype"])
                    for d in interpreter(empty_model, allocate=False).get_input_details()}
    empty, _ = _profile_interpreter(empty_model, threads, xnnpack, {t: v.shape for t, v in empty_values.items()},
                                    empty_values)
    medians = [_median_invoke(empty, runs, warmup), _median_invoke(whole, runs, warmup)]
    kernels = []
    for k, tensors in enumerate(spec["op_inputs"]):  # the single-op copy's inputs, as tensors of the file
        with open(os.path.join(workdir, f"op{k}.tflite"), "rb") as fh:
            op_model = fh.read()
        values = [np.array(debug.get_tensor(t)) for t in tensors]
        details = interpreter(op_model, allocate=False).get_input_details()
        by_index = {int(d["index"]): v for d, v in zip(details, values)}
        interp, kernel = _profile_interpreter(op_model, threads, xnnpack, {t: v.shape for t, v in by_index.items()},
                                              by_index)
        medians.append(_median_invoke(interp, runs, warmup))  # one op at a time: one interpreter alive
        kernels.append(kernel)
        del interp
    try:
        runtime = "ai-edge-litert " + version("ai-edge-litert")
    except Exception:  # an unusual install: the package without its metadata
        runtime = "ai-edge-litert"
    meta = {"runtime": runtime, "delegate": delegate, "overhead_s": medians[0], "whole_s": medians[1],
            "ops": [{"kernel": kernel, "model_kernel": "xnnpack" if k in taken else "builtin", "median_s": m}
                    for k, (kernel, m) in enumerate(zip(kernels, medians[2:]))]}
    with open(os.path.join(workdir, "meta.json.tmp"), "w") as fh:
        json.dump(meta, fh)
    os.replace(os.path.join(workdir, "meta.json.tmp"), os.path.join(workdir, "meta.json"))


def _child(workdir: str) -> None:
    """The child's side of :func:`run`: read the job from ``workdir``, write the results there."""
    with open(os.path.join(workdir, "job.json")) as fh:
        job = json.load(fh)
    if job.get("all_tensors"):
        return _child_tensors(workdir, job)
    if job.get("profile"):
        return _child_profile(workdir, job)
    with open(os.path.join(workdir, "model.tflite"), "rb") as fh:
        runner = Runner(fh.read(), job["num_threads"])
    arrays = [np.load(os.path.join(workdir, f"x{i}.npy"), allow_pickle=False) for i in range(len(job["inputs"]))]
    names = job["inputs"]
    xs = runner.as_inputs(dict(zip(names, arrays)) if all(names) else arrays)
    outputs = runner.predict(xs)
    outputs = outputs if isinstance(outputs, list) else [outputs]
    n = len(xs[0])
    if job.get("invoke_only"):  # the runtime's own time: inputs set once, invoke() alone timed
        runner.invoke_all([xi[0] for xi in xs])
        times = _invoke_times(runner.interpreter, job["latency_runs"], min(10, job["latency_runs"]),
                              job.get("flush_bytes", 0))
    else:
        for i in range(min(10, job["latency_runs"])):  # warm-up
            runner.invoke_all([xi[i % n] for xi in xs])
        times = []
        for i in range(job["latency_runs"]):
            start = time.perf_counter()
            runner.invoke_all([xi[i % n] for xi in xs])
            times.append(time.perf_counter() - start)
    for j, y in enumerate(outputs):
        np.save(os.path.join(workdir, f"y{j}.npy"), y)
    meta = {"output_steps": runner.output_steps, "delegate": runner.delegate, "times": times}
    with open(os.path.join(workdir, "meta.json.tmp"), "w") as fh:
        json.dump(meta, fh)
    os.replace(os.path.join(workdir, "meta.json.tmp"), os.path.join(workdir, "meta.json"))


def _crash_message(returncode: int, stderr: str) -> str:
    if returncode < 0:
        try:
            how = f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            how = f"was killed by signal {-returncode}"
    else:
        how = f"exited with status {returncode}"
    lines = [l for l in stderr.splitlines() if l.strip() and not l.startswith(("INFO:", "WARNING: All log"))]
    said = " | ".join(lines[-3:])[-600:]
    return f"the TFLite runtime {how} while running the model" + (f": {said}" if said else "")


def _launch(model: bytes, x, job: dict, timeout: float, workdir: str) -> dict:
    """Write the job to ``workdir``, run the child on it and return its ``meta.json``."""
    with open(os.path.join(workdir, "model.tflite"), "wb") as fh:
        fh.write(bytes(model))
    names, xs = (list(x), list(x.values())) if isinstance(x, dict) else \
        ([None] * len(x), list(x)) if isinstance(x, (list, tuple)) else ([None], [x])
    for i, xi in enumerate(xs):
        np.save(os.path.join(workdir, f"x{i}.npy"), np.asarray(xi))
    with open(os.path.join(workdir, "job.json"), "w") as fh:
        json.dump({**job, "inputs": names}, fh)
    cmd = [sys.executable, "-I", os.path.abspath(__file__), workdir]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    except subprocess.TimeoutExpired:
        raise RuntimeCrash(f"the TFLite runtime did not finish within {timeout:.0f} s on this model.") from None
    meta_path = os.path.join(workdir, "meta.json")
    if proc.returncode != 0 or not os.path.exists(meta_path):
        last = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ""
        if proc.returncode > 0 and last.startswith("ValueError: input "):  # samples that do not fit the file
            raise ValueError(last[len("ValueError: "):])
        if proc.returncode > 0 and "Traceback" in proc.stderr:  # a Python error: the runtime's refusal
            raise RuntimeCrash("the TFLite runtime refused the model: " + proc.stderr.strip().splitlines()[-1][-600:])
        raise RuntimeCrash(_crash_message(proc.returncode, proc.stderr))
    with open(meta_path) as fh:
        return json.load(fh)


def run_tensors(model: bytes, x, timeout: float = TIMEOUT_S) -> TensorsResult:
    """Run ``model`` on samples ``x`` (an array, or a list with one array per input in the file's
    order) one sample at a time in a child process with the built-in kernels, keeping every
    intermediate tensor: for layer-by-layer comparisons (``qx.debug_tflite``).

    Raises:
        RuntimeCrash: the runtime aborted, crashed or hung; nothing of it reaches the caller.
    """
    with tempfile.TemporaryDirectory(prefix="keras_qx-tensors-") as workdir:
        meta = _launch(model, list(x) if isinstance(x, (list, tuple)) else [x], {"all_tensors": True}, timeout, workdir)
        with np.load(os.path.join(workdir, "tensors.npz"), allow_pickle=False) as npz:
            values = {int(k[1:]): npz[k] for k in npz.files}
    tensors = {int(t): {**d, "quantization": (d["quantization"][0], d["quantization"][1])}
               for t, d in meta["tensors"].items()}
    return TensorsResult(tensors, meta["ops"], meta["inputs"], meta["outputs"], values)


def run_profile(model: bytes, op_models: list, op_inputs: list, empty_model: bytes, x=None, *, num_threads: int = 1,
                xnnpack: bool = True, runs: int = 50, warmup: int = 10, timeout: float = TIMEOUT_S) -> dict:
    """Time each op of ``model`` on its own in a child process (``keras_qx.lite.profile`` builds
    the single-op copies ``op_models``, whose inputs are the file's tensors ``op_inputs``, and
    the operator-free ``empty_model``), with the whole file and the invoke overhead. ``x``: the
    samples as :func:`run` takes them (the first one is used); None: a generated sample.

    Returns the child's figures: ``{"runtime", "delegate", "overhead_s", "whole_s", "ops": [{"kernel",
    "model_kernel", "median_s"}, ...]}``.

    Raises:
        RuntimeCrash: the runtime aborted, crashed or hung; nothing of it reaches the caller.
    """
    with tempfile.TemporaryDirectory(prefix="keras_qx-profile-") as workdir:
        for k, op_model in enumerate(op_models):
            with open(os.path.join(workdir, f"op{k}.tflite"), "wb") as fh:
                fh.write(bytes(op_model))
        with open(os.path.join(workdir, "empty.tflite"), "wb") as fh:
            fh.write(bytes(empty_model))
        job = {"profile": {"num_threads": int(num_threads), "xnnpack": bool(xnnpack), "runs": int(runs),
                           "warmup": int(warmup), "op_inputs": [[int(t) for t in ts] for ts in op_inputs]}}
        return _launch(model, [] if x is None else x, job, timeout, workdir)


def run(model: bytes, x, num_threads: int = 1, latency_runs: int = 0, timeout: float = TIMEOUT_S,
        invoke_only: bool = False, flush_bytes: int = 0) -> RunResult:
    """Run ``model`` on samples ``x`` (an array; for several inputs a dict by input name, or a
    list in the file's input order) in a child process (see the module docstring).

    ``latency_runs`` timed single-sample invocations follow (10 warm-up ones first): with
    ``invoke_only``, of the runtime's ``invoke()`` alone on the first sample (no Python around it:
    what the latency model measures; ``flush_bytes``: a buffer that size written between them),
    else of a whole sample in and out.

    Raises:
        RuntimeCrash: the runtime aborted, crashed or hung; nothing of it reaches the caller.
    """
    with tempfile.TemporaryDirectory(prefix="keras_qx-run-") as workdir:
        meta = _launch(model, x, {"num_threads": int(num_threads), "latency_runs": int(latency_runs),
                                  "invoke_only": bool(invoke_only), "flush_bytes": int(flush_bytes)},
                       timeout, workdir)
        outputs = [np.load(os.path.join(workdir, f"y{j}.npy"), allow_pickle=False) for j in range(len(meta["output_steps"]))]
    return RunResult(outputs, meta["output_steps"], meta["delegate"], meta["times"])


if __name__ == "__main__":
    _child(sys.argv[1])
