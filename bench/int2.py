"""INT2 kernels (issue 12): file bytes and Keras agreement with 2-bit FULLY_CONNECTED filters
stored as INT2 against the same file with INT4 filters, what goes wrong without the bias
rescale, the latency of one FULLY_CONNECTED with INT2 / INT4 / int8 filters in LiteRT, and
the 2-bit grid study of bench/int2_grid.py (read from bench/results/int2_grid.json).

Run: python bench/int2.py   (about 2 minutes on 2 shared cores; writes bench/results/int2.md;
run bench/int2_grid.py first for the grid table)
"""
from __future__ import annotations

import json
import os
import platform
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import numpy as np  # noqa: E402

import keras_qx as qx  # noqa: E402
from keras_qx._compat import keras  # noqa: E402
from keras_qx._seed import seeded  # noqa: E402
from keras_qx._io import write_atomic  # noqa: E402
from keras_qx._runtime import Runner, RuntimeCrash, interpreter, io_details, run  # noqa: E402
from keras_qx._compat import tflite_model_bytes, tflite_model_object  # noqa: E402
from keras_qx.data import digits_cnn, load_digits  # noqa: E402
from keras_qx.lite import convert  # noqa: E402
from keras_qx.lite.bias_grid import snap_biases  # noqa: E402
from keras_qx.lite.int2 import to_int2  # noqa: E402
from keras_qx.quant import quantizers  # noqa: E402

L = keras.layers
LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
LATENCY_RUNS = 300
ROUNDING: list = []  # rows of the rounding table, filled by files_table


def _int4_file(qat, x) -> bytes:
    """The file export_tflite writes before the INT2 rewrite (biases snapped the same way)."""
    snap_biases(qat)
    return convert._convert_qat(qat, [x], True)[0]


def _builtin(data: bytes) -> Runner:
    """A runner on LiteRT's built-in kernels only (no XNNPACK), in this process."""
    runner = Runner(data)
    runner.interpreter = interpreter(data, 1, xnnpack=False)
    runner.inputs, runner.outputs = io_details(runner.interpreter)
    runner.input, runner.output = runner.inputs[0], runner.outputs[0]
    runner.delegate = "builtin"
    return runner


def _agreement(data: bytes, qat, x) -> str:
    """``mean / max`` output steps of the file against Keras, as verification runs it
    (XNNPACK where it takes the graph) | on the built-in kernels only."""
    try:
        result = run(data, x)
    except RuntimeCrash as err:
        return f"refused: {str(err).split('RuntimeError: ')[-1][:90]} | -"
    keras_out = qat.predict(x, verbose=0)
    steps = np.abs(result.output - keras_out) / result.output_steps[0]
    builtin = np.abs(_builtin(data).predict(x) - keras_out) / result.output_steps[0]
    return f"{steps.mean():.3f} / {steps.max():.0f} | {builtin.mean():.3f} / {builtin.max():.0f}"


def _bias_values_kept(int2: bytes, int4: bytes) -> bytes:
    """``int2`` with its FULLY_CONNECTED bias holding the INT4 file's int32 values again (its
    scale still the rescaled one): the runtime then accepts it and adds 7x the bias."""
    new, old = tflite_model_object(int2), tflite_model_object(int4)
    for model in (new, old):
        graph = model.subgraphs[0]
        model._bias = next(graph.tensors[op.inputs[2]] for op in graph.operators if len(op.inputs) > 2 and op.inputs[2] >= 0)
    new.buffers[new._bias.buffer].data = old.buffers[old._bias.buffer].data
    return tflite_model_bytes(new)


def _digits():
    (x, y), (xt, yt) = load_digits()
    with seeded(0):
        model = digits_cnn(16, 64)
        model.compile(keras.optimizers.Adam(2e-3), LOSS)
        model.fit(x, y, epochs=10, batch_size=64, verbose=0)
        qat = qx.calibrate(qx.quantize(model, {"default": {"weight_bits": 8}, "layers": {"fc1": {"weight_bits": 2}}}),
                           x[:500])
        qat.compile(keras.optimizers.Adam(1e-4), LOSS)
        qat.fit(x, y, epochs=3, batch_size=64, verbose=0)
    return "digits CNN (fc1 2-bit)", qat, x[:300], xt[:300]


def _feed_forward(seq: int = 16, d: int = 64):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1024, seq, d)).astype("float32")
    target = np.tanh(x @ rng.normal(size=(d, d)).astype("float32") / np.sqrt(d))
    with seeded(0):
        inputs = keras.Input((seq, d), name="x")
        h = L.Dense(4 * d, activation="gelu", name="up")(inputs)
        model = keras.Model(inputs, L.Dense(d, name="down")(h), name="ffn")
        model.compile(keras.optimizers.Adam(2e-3), "mse")
        model.fit(x, target, epochs=5, verbose=0)
        qat = qx.calibrate(qx.quantize(model, {"default": {"weight_bits": 2}}), x[:256])
        qat.compile(keras.optimizers.Adam(1e-4), "mse")
        qat.fit(x, target, epochs=2, verbose=0)
    return f"feed-forward (seq {seq}, Dense {d}->{4 * d} gelu, {4 * d}->{d}; both 2-bit)", qat, x[:256], x[256:512]


def _narrow_dense():
    """A Dense 64->16 on the old narrow 2-bit grid: INT4 {-7, 0, 7} at s/7 from the converter."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(512, 64)).astype("float32")
    target = x[:, :16] * 0.5 + 0.3
    with seeded(0):
        inputs = keras.Input((64,), name="x")
        model = keras.Model(inputs, L.Dense(16, name="fc")(inputs), name="narrow")
        model.compile("adam", "mse")
        model.fit(x, target, epochs=10, verbose=0)
        qat = qx.quantize(model, {"default": {"weight_bits": 2}})
        qat.get_layer("quant_fc")._weight_vars[0][1].full_range = False
        qat = qx.calibrate(qat, x[:256])
        qat.compile("adam", "mse")
        qat.fit(x, target, epochs=2, verbose=0)
    snap_biases(qat)
    # the converter's own storage of the fake-quantized kernel, as before export handed sub-4-bit
    # kernels over on the INT4 grid of their own step (quantizers.exporting)
    saved, quantizers.exporting = quantizers.exporting, lambda: False
    try:
        int4 = convert._convert_qat(qat, [x[:256]], True)[0]
    finally:
        quantizers.exporting = saved
    return qat, int4, x[256:]


def files_table() -> list[str]:
    lines = ["| model | filters | bytes | Keras vs file: mean / max output steps (as verified: XNNPACK) | "
             "same, built-in kernels only |", "|---|---|---|---|---|"]
    for name, qat, calib, test in (_digits(), _feed_forward()):
        int4 = _int4_file(qat, calib)
        int2, renamed = to_int2(int4)
        for label, data in (("INT4", int4), (f"INT2 ({len(renamed)} rewritten)", int2)):
            lines.append(f"| {name} | {label} | {len(data):,} | {_agreement(data, qat, test)} |")
        ROUNDING.extend(rounding_rows(f"{name.split(' (')[0]}, {label.split(' (')[0]} file", data, test[:200])
                        for label, data in (("INT4", int4), ("INT2", int2)))
    qat, int4, test = _narrow_dense()
    for label, data in (("INT4 {-7,0,7} at s/7 (converter)", int4), ("INT2 {-1,0,1} at s, bias /7", to_int2(int4)[0]),
                        ("INT2 {-1,0,1} at s, bias left as is", to_int2(int4, rescale_bias=False)[0]),
                        ("INT2 {-1,0,1} at s, bias scale x7, values left", _bias_values_kept(to_int2(int4)[0], int4))):
        lines.append(f"| Dense 64->16, narrow 2-bit grid | {label} | {len(data):,} | {_agreement(data, qat, test)} |")
    return lines


def _half_away(v):
    return np.sign(v) * np.floor(np.abs(v) + 0.5)


def rounding_rows(name: str, data: bytes, x) -> list[str]:
    """For each FULLY_CONNECTED with a packed (INT2/INT4) filter: its outputs on the built-in
    kernels against numpy recomputations from its own int8 input, one with a single rounding
    of ``acc * M`` and one with the runtime's two (gemmlowp-style: a rounding doubling high
    multiply by M * 2**shift, then a rounding right shift), fraction of outputs that differ."""
    from keras_qx._compat import tflite_schema
    from keras_qx._runtime import debug_interpreter, quantize_input
    from keras_qx.lite.inspect import tensor_values

    schema = tflite_schema()
    names = {schema.TensorType.INT2: "INT2", schema.TensorType.INT4: "INT4"}
    model = tflite_model_object(data)
    graph = model.subgraphs[0]
    it = debug_interpreter(data)
    detail = it.get_input_details()[0]
    ops = []
    for op in graph.operators:
        code = model.operatorCodes[op.opcodeIndex]
        if max(code.builtinCode, code.deprecatedBuiltinCode) == schema.BuiltinOperator.FULLY_CONNECTED and \
                graph.tensors[op.inputs[1]].type in names:
            ops.append(op)
    seen = {int(i): [] for op in ops for i in (op.inputs[0], op.outputs[0])}
    for xi in x:
        it.set_tensor(detail["index"], quantize_input(xi[None], detail))
        it.invoke()
        for index, values in seen.items():
            values.append(it.get_tensor(index).astype(np.int64))
    rows = []
    for op in ops:
        filt = graph.tensors[op.inputs[1]]
        inp, out = graph.tensors[op.inputs[0]], graph.tensors[op.outputs[0]]
        xs = np.concatenate(seen[int(op.inputs[0])]).reshape(-1, int(filt.shape[1]))
        ys = np.concatenate(seen[int(op.outputs[0])]).reshape(-1, int(filt.shape[0]))
        u = tensor_values(model.buffers[filt.buffer].data, names[filt.type], filt.shape).astype(np.int64)
        b = np.frombuffer(bytes(model.buffers[graph.tensors[op.inputs[2]].buffer].data), np.int32) \
            if len(op.inputs) > 2 and op.inputs[2] >= 0 else 0
        multiplier = float(inp.quantization.scale[0]) * float(filt.quantization.scale[0]) / float(out.quantization.scale[0])
        real = ((xs - int(inp.quantization.zeroPoint[0])) @ u.reshape(filt.shape).T + b) * multiplier
        low = int(out.quantization.zeroPoint[0]) if op.builtinOptions.fusedActivationFunction == 1 else -128
        shift = -int(np.floor(np.log2(multiplier))) - 1
        single = np.clip(_half_away(real) + out.quantization.zeroPoint[0], low, 127)
        double = np.clip(_half_away(np.round(real * 2.0 ** shift) / 2.0 ** shift) + out.quantization.zeroPoint[0],
                         low, 127)
        rows.append(f"| {name} | {names[filt.type]} {tuple(int(d) for d in filt.shape)} | {multiplier:.4f} | {shift} | "
                    f"{np.mean(ys != single):.2%} | {np.mean(ys != double):.2%} |")
    return rows


def _fc_file(n: int, bits: int) -> tuple[bytes, np.ndarray]:
    rng = np.random.default_rng(n)
    x = rng.normal(size=(64, n)).astype("float32")
    with seeded(0):
        inputs = keras.Input((n,), name="x")
        model = keras.Model(inputs, L.Dense(n, name="fc")(inputs), name=f"fc{n}")
        qat = qx.calibrate(qx.quantize(model, {"default": {"weight_bits": bits}}), x)
    return _int4_file(qat, x) if bits <= 4 else convert._convert_qat(qat, [x], True)[0], x


def _builtin_ms(data: bytes, x) -> float:
    runner = _builtin(data)
    sample = runner.as_inputs(x[:1])
    for _ in range(10):
        runner.invoke_all([xi[0] for xi in sample])
    times = []
    for _ in range(LATENCY_RUNS):
        start = time.perf_counter()
        runner.invoke_all([xi[0] for xi in sample])
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1e3)


def latency_table() -> list[str]:
    lines = [f"| FULLY_CONNECTED, batch 1 | filter | filter bytes | file bytes | median latency ms ({LATENCY_RUNS} invokes) "
             "| p10-p90 ms | built-in kernels only: median ms (in process) |", "|---|---|---|---|---|---|---|"]
    for n in (512, 1024):
        int4, x = _fc_file(n, 2)
        int8, _ = _fc_file(n, 8)
        for label, data, filt in (("int8", int8, n * n), ("INT4", int4, n * n // 2), ("INT2", to_int2(int4)[0], n * n // 4)):
            result = run(data, x[:1], latency_runs=LATENCY_RUNS)
            times = np.asarray(result.times) * 1e3
            lines.append(f"| {n}x{n} | {label} | {filt:,} | {len(data):,} | {np.median(times):.3f} | "
                         f"{np.percentile(times, 10):.3f}-{np.percentile(times, 90):.3f} | {_builtin_ms(data, x):.3f} |")
    return lines


def grid_table() -> list[str]:
    path = os.path.join(HERE, "results", "int2_grid.json")
    if not os.path.exists(path):
        return ["(run bench/int2_grid.py for this table)"]
    with open(path) as fh:
        rows = json.load(fh)["rows"]
    order = ("sym3", "sym3-half", "4level-twos", "4level-half")
    lines = ["| task | grid (fc1, 2-bit) | levels used | Keras QAT accuracy, seeds 0/1/2 | mean | TFLite (sym3 file) | float |",
             "|---|---|---|---|---|---|---|"]
    for task in dict.fromkeys(r["task"] for r in rows):
        for grid in order:
            mine = sorted((r for r in rows if r["task"] == task and r["grid"] == grid), key=lambda r: r["seed"])
            if not mine:
                continue
            accs = [r["keras"] for r in mine]
            tfl = [r["tflite"] for r in mine if r["tflite"] is not None]
            lines.append(f"| {task} | {grid} | {max(r['levels'] for r in mine)} | {' / '.join(f'{a:.1%}' for a in accs)} "
                         f"| {np.mean(accs):.1%} | {' / '.join(f'{a:.1%}' for a in tfl) or '-'} "
                         f"| {np.mean([r['float'] for r in mine]):.1%} |")
    return lines


def main() -> int:
    start = time.perf_counter()
    parts = [("(a) File bytes and agreement with Keras, INT2 against INT4 filters", files_table()),
             ("(b) One FULLY_CONNECTED in LiteRT, int8 input", latency_table()),
             ("(c) The 2-bit grid (bench/int2_grid.py)", grid_table()),
             ("(d) Why INT2 and INT4 files differ from Keras at all: the runtime's requantization", [
                 "| file | filter | multiplier M | right shift | outputs != single rounding | outputs != double rounding |",
                 "|---|---|---|---|---|---|", *[row for rows in ROUNDING for row in rows]])]
    out = [f"# INT2 kernels (python bench/int2.py, {time.perf_counter() - start:.0f} s; {platform.machine()}, "
           f"{os.cpu_count()} cores, 1 thread)", ""]
    notes = {
        parts[0][0]: "INT4: the file as converted (sub-4-bit kernels through a 4-bit fake-quant of their own step); "
                     "INT2: the same file after `keras_qx.lite.int2.to_int2`. Agreement on held-out samples, in "
                     "output quantization steps: as `export_tflite` verifies (LiteRT with XNNPACK where it takes "
                     "the graph), and on the built-in kernels only. The last rows rebuild the earlier failed "
                     "rewrite (a narrow-grid 2-bit Dense, INT4 {-7, 0, 7}) with and without the bias rescale.",
        parts[1][0]: "A Dense n->n (2-bit for INT4/INT2, 8-bit for int8), batch 1, one thread; "
                     "`keras_qx._runtime.run(..., latency_runs=N)` times each invoke in a child process.",
        parts[2][0]: "fc1 trained at 2 bits, everything else 8-bit; float model per seed, then 3 QAT epochs per "
                     "grid. sym3: {-1,0,1}*max|w| (the old grid); sym3-half: {-1,0,1}*max|w|/2; 4level-twos: "
                     "tfmot's two's-complement range [-2a, a], a = max(max w, -min w / 2); 4level-half: "
                     "{-2,-1,0,1}*max|w|/2 (the new default for 2-bit Dense/EinsumDense).",
        parts[3][0]: "Each packed FULLY_CONNECTED's int8 outputs on the built-in kernels against numpy from its own "
                     "int8 inputs: acc * M rounded once, or rounded at M's right shift first and then again "
                     "(gemmlowp's SaturatingRoundingDoublingHighMul + RoundingDivideByPOT).",
    }
    for title, lines in parts:
        out += [f"## {title}", "", notes[title], "", *lines, ""]
        print("\n".join([title, *lines]), flush=True)
    text = "\n".join(out)
    write_atomic(os.path.join(HERE, "results", "int2.md"), text.encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
