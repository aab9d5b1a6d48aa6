"""Benchmark keras_qx against tfmot's ``quantize_model`` on the digits CNN.

Rows: the float model, tfmot default 8-bit QAT, keras_qx uniform 8-bit (``qx.quantize(model)``)
and, for reference, a keras_qx mixed 4/8-bit policy. Columns: QAT step time (median wall time
of one training step, batch 64, the first (tracing) epoch skipped), export time to an
int8-I/O TFLite file, file size (raw / gzip -9), TFLite test accuracy and single-sample latency.

Noise control (the machine has 2 cores and may be busy): each of ``--repeats`` rounds builds
a fresh QAT copy of the same float weights for every variant and runs its first (tracing)
epoch untimed; the remaining epochs are cut into chunks of ``--chunk`` batches that every
variant fits in turn (order reversed on alternate chunks), so background load hits all
variants alike. Reported: the median over all timed steps, and a paired ratio (median of the
per-chunk ratios). Exports are interleaved too. TF's thread pools are fixed (``--threads``)
before TensorFlow runs anything.

Run:
    cd /work/main && /work/venv/bin/python bench/vs_tfmot.py
"""
from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time
import warnings

import numpy as np

from keras_qx._compat import keras, tf, tfmot
from keras_qx._io import write_atomic

MIXED_POLICY = {
    "rules": [{"type": "Dense", "weight_bits": 4}, {"type": "Conv2D", "weight_bits": 4}],
    "layers": {"conv1": {"weight_bits": 8}, "logits": {"weight_bits": 8}},
}
BATCH = 64
CALIB = 300
TARGET_RATIO = 1.15
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "vs_tfmot.md")


def log(msg: str) -> None:
    print(f"[vs_tfmot {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class StepTimer(keras.callbacks.Callback):
    """Wall time of every training batch, per epoch."""

    def __init__(self):
        super().__init__()
        self.epochs: list[list[float]] = []
        self._t0 = 0.0

    def on_epoch_begin(self, epoch, logs=None):
        self.epochs.append([])

    def on_train_batch_begin(self, batch, logs=None):
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.epochs[-1].append(time.perf_counter() - self._t0)

    def steps(self) -> list[float]:
        return [t for epoch in self.epochs for t in epoch]

    def steady_steps(self) -> list[float]:
        """Step times after the first epoch (which includes tf.function tracing)."""
        return [t for epoch in self.epochs[1:] for t in epoch]


def compile_model(model, lr: float) -> None:
    model.compile(
        optimizer=keras.optimizers.Adam(lr),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )


def fresh_float(float_model):
    """An independent copy of the trained float model (so no variant can touch another's weights)."""
    copy = keras.models.clone_model(float_model)
    copy.set_weights(float_model.get_weights())
    return copy


def make_qat(variant: str, float_model):
    import keras_qx as qx

    base = fresh_float(float_model)
    if variant == "tfmot":
        return tfmot.quantization.keras.quantize_model(base)
    if variant == "qx8":
        return qx.quantize(base)
    if variant == "qxmix":
        return qx.quantize(base, MIXED_POLICY)
    raise ValueError(variant)


def export_tfmot(qat, calib: np.ndarray) -> tuple[bytes, float, float]:
    """(bytes, convert seconds, total seconds): converted as a tfmot user would (from_keras_model),
    with the settings keras_qx uses."""
    start = time.perf_counter()
    converter = tf.lite.TFLiteConverter.from_keras_model(qat)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = lambda: ([s[None]] for s in calib)
    converter.inference_input_type = tf.int8
    converter.inference_output_type = tf.int8
    t_conv = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data = converter.convert()
    end = time.perf_counter()
    return data, end - t_conv, end - start


def export_qx(qat, calib: np.ndarray) -> tuple[bytes, float, float]:
    import keras_qx as qx

    start = time.perf_counter()
    tfl = qx.export_tflite(qat, calib)
    total = time.perf_counter() - start
    return bytes(tfl), tfl.report.convert_seconds, total


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=15, help="float training epochs (default 15)")
    p.add_argument("--qat-epochs", type=int, default=4,
                   help="QAT epochs per round; the first is untimed tracing (default 4, min 2)")
    p.add_argument("--repeats", type=int, default=3,
                   help="rounds of interleaved QAT timing (fresh QAT models each; default 3)")
    p.add_argument("--chunk", type=int, default=3,
                   help="batches per interleaving chunk of the timed QAT epochs (default 3)")
    p.add_argument("--threads", type=int, default=2,
                   help="TF intra-op threads for every variant (inter-op is 1; default 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--qat-lr", type=float, default=1e-4, help="Adam learning rate during QAT")
    p.add_argument("--no-write", action="store_true", help="do not write bench/results/vs_tfmot.md")
    args = p.parse_args(argv)
    if args.qat_epochs < 2:
        p.error("--qat-epochs must be >= 2 (the first epoch is skipped as tracing)")
    if min(args.repeats, args.epochs, args.threads, args.chunk) < 1:
        p.error("--epochs, --repeats, --threads and --chunk must be >= 1")

    # Before TF executes anything: the thread pools cannot be changed afterwards.
    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)

    import keras_qx as qx
    from keras_qx.data import digits_cnn, load_digits

    (x_train, y_train), (x_test, y_test) = load_digits(seed=args.seed)
    calib = x_train[:CALIB]
    load_start = os.getloadavg()[0]
    log(f"data: {len(x_train)} train / {len(x_test)} test; threads intra={args.threads} inter=1")

    # ---- float model -------------------------------------------------------------------
    float_model = digits_cnn(seed=args.seed)  # seeds keras/tf/numpy
    compile_model(float_model, 1e-3)
    timer = StepTimer()
    t0 = time.perf_counter()
    float_model.fit(x_train, y_train, batch_size=BATCH, epochs=args.epochs, verbose=0,
                    callbacks=[timer])
    float_acc = float(float_model.evaluate(x_test, y_test, verbose=0)[1])
    float_step = float(np.median(timer.steady_steps())) * 1e3 if args.epochs > 1 else None
    log(f"float: trained {args.epochs} epochs in {time.perf_counter() - t0:.1f}s, "
        f"test accuracy {float_acc:.4f}")

    # ---- QAT fits, interleaved in chunks of a few batches ------------------------------
    # Each round builds a fresh QAT copy of every variant and runs its first epoch (tf.function
    # tracing) untimed. The remaining epochs are cut into chunks of --chunk full batches of
    # one shared permutation per epoch; every chunk is fitted by each variant in turn (order
    # reversed on alternate chunks), so bursts of background load hit every variant alike.
    variants = ["tfmot", "qx8", "qxmix"]
    labels = {
        "tfmot": "tfmot `quantize_model` (8-bit)",
        "qx8": "keras_qx `quantize(model)` (8-bit)",
        "qxmix": "keras_qx mixed W4 (conv1, logits W8)",
    }
    n_full = len(x_train) // BATCH * BATCH  # timed epochs use full batches only
    per_chunk = args.chunk * BATCH
    steps: dict[str, list[float]] = {v: [] for v in variants}
    round_medians: dict[str, list[float]] = {v: [] for v in variants}
    chunk_ratios: dict[str, list[float]] = {v: [] for v in variants}  # paired: v / tfmot
    trained: dict = {}
    for r in range(args.repeats):
        models, timers = {}, {}
        for v in (variants if r % 2 == 0 else variants[::-1]):
            models[v] = make_qat(v, float_model)
            compile_model(models[v], args.qat_lr)
            keras.utils.set_random_seed(args.seed + 1)
            t0 = time.perf_counter()
            models[v].fit(x_train, y_train, batch_size=BATCH, epochs=1, verbose=0)
            timers[v] = StepTimer()
            log(f"round {r + 1}/{args.repeats} {v:6s}: built + first (tracing) epoch "
                f"{time.perf_counter() - t0:.2f}s")
        k = 0
        for e in range(1, args.qat_epochs):
            perm = np.random.default_rng([args.seed, r, e]).permutation(len(x_train))[:n_full]
            for start in range(0, n_full, per_chunk):
                idx = perm[start:start + per_chunk]
                xs, ys = x_train[idx], y_train[idx]
                chunk_med = {}
                for v in (variants if k % 2 == 0 else variants[::-1]):
                    models[v].fit(xs, ys, batch_size=BATCH, epochs=1, shuffle=False, verbose=0,
                                  callbacks=[timers[v]])
                    chunk_med[v] = float(np.median(timers[v].epochs[-1]))
                for v in variants:
                    chunk_ratios[v].append(chunk_med[v] / chunk_med["tfmot"])
                k += 1
        n_timed = len(timers["tfmot"].steps())
        for v in variants:
            steps[v] += timers[v].steps()
            round_medians[v].append(float(np.median(timers[v].steps())) * 1e3)
            trained[v] = models[v]  # the last round's models are exported
        log(f"round {r + 1}/{args.repeats} median step ms: " +
            ", ".join(f"{v} {round_medians[v][-1]:.2f}" for v in variants) +
            f" ({n_timed} steps each, {k} interleaved chunks)")

    # ---- export, interleaved -----------------------------------------------------------
    exports: dict[str, dict] = {v: {"convert": [], "total": []} for v in variants}
    for r in range(args.repeats):
        order = variants if r % 2 == 0 else variants[::-1]
        for v in order:
            fn = export_tfmot if v == "tfmot" else export_qx
            data, conv_s, total_s = fn(trained[v], calib)
            exports[v]["convert"].append(conv_s)
            exports[v]["total"].append(total_s)
            exports[v]["bytes"] = data
            log(f"export {r + 1}/{args.repeats} {v:6s}: convert {conv_s:.2f}s, total {total_s:.2f}s, "
                f"{len(data):,} bytes")

    # ---- evaluate ----------------------------------------------------------------------
    rows = []
    results: dict[str, dict] = {}
    for v in variants:
        ev = qx.evaluate_tflite(exports[v]["bytes"], x_test, y_test)
        qat_acc = float(trained[v].evaluate(x_test, y_test, verbose=0)[1])
        results[v] = ev
        log(f"eval {v:6s}: QAT Keras acc {qat_acc:.4f}, TFLite acc {ev['accuracy']:.4f}, "
            f"latency {ev['latency_ms']:.4f} ms")
        results[v]["qat_acc"] = qat_acc

    step = {v: float(np.median(steps[v])) * 1e3 for v in variants}
    ratio = step["qx8"] / step["tfmot"]
    paired = {v: float(np.median(chunk_ratios[v])) for v in variants}

    def fmt_steps(v):
        spread = "" if len(round_medians[v]) < 2 else \
            f" ({min(round_medians[v]):.2f}–{max(round_medians[v]):.2f})"
        return f"{step[v]:.2f}{spread}"

    header = ("| variant | QAT step ms (rounds min–max) | vs tfmot | paired vs tfmot | convert s | export total s | "
              "bytes | gzip bytes | Keras acc | TFLite acc | latency ms |")
    rows.append(header)
    rows.append("|" + "---|" * 11)
    float_cell = "—" if float_step is None else f"{float_step:.2f}"
    rows.append(f"| float (Keras) | {float_cell} | — | — | — | — | — | — | {float_acc:.4f} | — | — |")
    for v in variants:
        ev = results[v]
        rows.append(
            f"| {labels[v]} | {fmt_steps(v)} | {step[v] / step['tfmot']:.3f}x | {paired[v]:.3f}x | "
            f"{np.median(exports[v]['convert']):.2f} | {np.median(exports[v]['total']):.2f} | "
            f"{ev['size_bytes']:,} | {ev['gzip_bytes']:,} | {ev['qat_acc']:.4f} | "
            f"{ev['accuracy']:.4f} | {ev['latency_ms']:.4f} |"
        )

    import tf_keras

    verdict = "PASS" if ratio <= TARGET_RATIO else "FAIL"
    cmd = "cd /work/main && /work/venv/bin/python bench/vs_tfmot.py " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    notes = [
        "",
        f"QAT step-time ratio keras_qx 8-bit / tfmot: **{ratio:.3f}x** "
        f"(target <= {TARGET_RATIO}x: {verdict}); paired estimate (median of per-chunk ratios): "
        f"{paired['qx8']:.3f}x; mixed policy / tfmot: {step['qxmix'] / step['tfmot']:.3f}x.",
        "",
        f"Step time: median wall time of a training step (batch {BATCH}) over {args.repeats} rounds x "
        f"{n_timed} steps (epochs 2..{args.qat_epochs} of a fresh {args.qat_epochs}-epoch QAT, full "
        f"batches; epoch 1 is tracing, untimed), variants interleaved every {args.chunk} batches; "
        f"in parentheses the range of the per-round medians. Paired: median over the {len(chunk_ratios['qx8'])} "
        f"chunks of (variant chunk median / tfmot chunk median), which cancels load shared by a chunk. "
        f"Same Adam(lr={args.qat_lr:g}) compile for all. "
        f"Float row (not interleaved, reference only): "
        f"steps of epochs 2..{args.epochs} of float training (Adam 1e-3). "
        f"Convert s: `converter.convert()` only (keras_qx: `report.convert_seconds`); export total: "
        f"converter construction + convert (+ keras_qx's verification against Keras). Both int8 I/O, "
        f"Optimize.DEFAULT, {CALIB} representative samples; median of {args.repeats}. "
        f"Accuracy on {len(x_test)} test images; latency: `qx.evaluate_tflite` median single-sample "
        f"invoke, 1 TFLite thread.",
        "",
        f"Machine: {platform.platform()}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}; TF {tf.__version__}, "
        f"tf_keras {tf_keras.__version__}, tfmot {tfmot.__version__}, keras_qx {qx.__version__}; "
        f"TF threads intra={args.threads} inter=1; 1-min load average {load_start:.2f} at start, "
        f"{os.getloadavg()[0]:.2f} at end (incl. this benchmark's own ~2); a high start value means "
        f"other processes shared the CPUs and the timings are noisy.",
        "",
        f"Rerun: `{cmd.strip()}`",
    ]
    text = "\n".join(rows + notes) + "\n"
    print(text)
    if not args.no_write:
        os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
        write_atomic(RESULTS, ("# keras_qx vs tfmot (digits CNN)\n\n" + text).encode())
        log(f"wrote {os.path.relpath(RESULTS)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
