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

__all__ = ["Runner", "RunResult", "RuntimeCrash", "run", "interpreter", "quantize_input", "debug_interpreter",
           "ops_details"]

TIMEOUT_S = 600


class RuntimeCrash(RuntimeError):
    """The TFLite runtime ended its process (abort, segfault) or hung on a model."""


@dataclass
class RunResult:
    outputs: np.ndarray  # dequantized first output, (n, ...)
    output_step: float  # one quantization step of that output (0 for float)
    delegate: str  # "xnnpack", or "builtin" where XNNPACK declined the graph
    times: list  # seconds of each timed single-sample invocation


def interpreter(model: bytes, num_threads: int = 1, xnnpack: bool = True, preserve_all_tensors: bool = False):
    """An allocated LiteRT interpreter; ``xnnpack=False``: the built-in kernels only."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    resolver = OpResolverType.AUTO if xnnpack else OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    result = Interpreter(model_content=bytes(model), num_threads=num_threads,
                         experimental_preserve_all_tensors=preserve_all_tensors,
                         experimental_op_resolver_type=resolver)
    result.allocate_tensors()
    return result


def quantize_input(x, detail) -> np.ndarray:
    """Float samples as the input tensor ``detail`` takes them (quantized to its int8 scale)."""
    dtype = detail["dtype"]
    scale, zero = detail["quantization"]
    if dtype == np.float32 or not scale:  # float, or integer ids (not quantized values)
        return x.astype(dtype)
    info = np.iinfo(dtype)
    return np.clip(np.round(x / scale + zero), info.min, info.max).astype(dtype)


class Runner:
    """Run a single-input TFLite model (bytes) on float data, (de)quantizing int8 I/O as needed."""

    def __init__(self, model: bytes, num_threads: int = 1):
        self.model = bytes(model)
        self.num_threads = num_threads
        self.delegate = "xnnpack"
        self.interpreter = interpreter(self.model, num_threads)
        inputs = self.interpreter.get_input_details()
        if len(inputs) != 1:
            raise ValueError(f"TFLiteRunner handles single-input models; this one has {len(inputs)} inputs.")
        self.input = inputs[0]
        self.output = self.interpreter.get_output_details()[0]

    @property
    def input_shape(self):
        return tuple(int(s) for s in self.input["shape"][1:])

    @property
    def output_step(self) -> float:
        """One quantization step of the output (0 for a float output)."""
        return float(self.output["quantization"][0]) if self.output["dtype"] != np.float32 else 0.0

    def _dequantize_output(self, y):
        if self.output["dtype"] == np.float32:
            return y.astype(np.float32)
        scale, zero = self.output["quantization"]
        return ((y.astype(np.float32) - zero) * scale).astype(np.float32)

    def invoke_one(self, sample) -> np.ndarray:
        self.interpreter.set_tensor(self.input["index"], quantize_input(sample[None], self.input))
        try:
            self.interpreter.invoke()
        except RuntimeError as err:
            # XNNPACK declines some quantized graphs ("failed to create XNNPACK runtime");
            # the built-in kernels run them. Latency then reflects the built-in kernels.
            if self.delegate != "xnnpack" or "XNNPACK" not in str(err):
                raise
            self.delegate = "builtin"
            self.interpreter = interpreter(self.model, self.num_threads, xnnpack=False)
            self.interpreter.set_tensor(self.input["index"], quantize_input(sample[None], self.input))
            self.interpreter.invoke()
        return self._dequantize_output(self.interpreter.get_tensor(self.output["index"]))[0]

    def predict(self, x) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32 if self.input["quantization"][0] else self.input["dtype"])
        if x.shape[1:] != self.input_shape:
            raise ValueError(f"input shape {x.shape[1:]} does not match the model's {self.input_shape}.")
        return np.stack([self.invoke_one(sample) for sample in x])


def debug_interpreter(model: bytes):
    """An in-process interpreter that keeps every intermediate tensor (built-in kernels)."""
    return interpreter(model, xnnpack=False, preserve_all_tensors=True)


def ops_details(interpreter) -> list:
    """Each op of the main graph: ``{"op_name", "inputs", "outputs", ...}``."""
    return interpreter._get_ops_details()


def _child(workdir: str) -> None:
    """The child's side of :func:`run`: read the job from ``workdir``, write the results there."""
    with open(os.path.join(workdir, "job.json")) as fh:
        job = json.load(fh)
    with open(os.path.join(workdir, "model.tflite"), "rb") as fh:
        runner = Runner(fh.read(), job["num_threads"])
    x = np.load(os.path.join(workdir, "x.npy"), allow_pickle=False)
    outputs = runner.predict(x)
    for sample in x[: min(10, job["latency_runs"])]:  # warm-up
        runner.invoke_one(sample)
    times = []
    for i in range(job["latency_runs"]):
        start = time.perf_counter()
        runner.invoke_one(x[i % len(x)])
        times.append(time.perf_counter() - start)
    np.save(os.path.join(workdir, "outputs.npy"), outputs)
    meta = {"output_step": runner.output_step, "delegate": runner.delegate, "times": times}
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


def run(model: bytes, x, num_threads: int = 1, latency_runs: int = 0, timeout: float = TIMEOUT_S) -> RunResult:
    """Run ``model`` on samples ``x`` in a child process (see the module docstring).

    Raises:
        RuntimeCrash: the runtime aborted, crashed or hung; nothing of it reaches the caller.
    """
    with tempfile.TemporaryDirectory(prefix="keras_qx-run-") as workdir:
        with open(os.path.join(workdir, "model.tflite"), "wb") as fh:
            fh.write(bytes(model))
        np.save(os.path.join(workdir, "x.npy"), np.asarray(x))
        with open(os.path.join(workdir, "job.json"), "w") as fh:
            json.dump({"num_threads": int(num_threads), "latency_runs": int(latency_runs)}, fh)
        # -I: no script directory or user site on sys.path (this file sits among keras_qx's modules).
        cmd = [sys.executable, "-I", os.path.abspath(__file__), workdir]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                                  env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
        except subprocess.TimeoutExpired:
            raise RuntimeCrash(f"the TFLite runtime did not finish within {timeout:.0f} s on this model.") from None
        meta_path = os.path.join(workdir, "meta.json")
        if proc.returncode != 0 or not os.path.exists(meta_path):
            if proc.returncode > 0 and "Traceback" in proc.stderr:  # a Python error: the runtime's refusal
                raise RuntimeCrash("the TFLite runtime refused the model: " + proc.stderr.strip().splitlines()[-1][-600:])
            raise RuntimeCrash(_crash_message(proc.returncode, proc.stderr))
        with open(meta_path) as fh:
            meta = json.load(fh)
        outputs = np.load(os.path.join(workdir, "outputs.npy"), allow_pickle=False)
    return RunResult(outputs, meta["output_step"], meta["delegate"], meta["times"])


if __name__ == "__main__":
    _child(sys.argv[1])
