"""Pareto sweep: auto_policy vs random bit mixes vs uniform bits at equal size, on a task.

``--task digits`` (default) trains ``digits_cnn()`` on ``load_digits()`` (Adam 1e-3, 20 epochs);
``--task mnist1d`` trains ``mnist1d_cnn()`` on MNIST-1D (``load_mnist1d()``, generated offline;
Adam 2e-3, 30 epochs), a harder task where layers differ in how many bits they need. Both use
from-logits cross-entropy, batch 64, seed 0; then ``keras_qx.engine.pareto.pareto``: one
sensitivity report, and per size budget (fractions of uniform int8; ``--size kernel``: kernel
bytes as stored, ``--size gzip``: their predicted gzip'd bytes) the auto policy and ``--random`` random per-layer mixes of
about the same size, plus uniform W8/W4/W2; each QAT-trained ``--qat-epochs``, exported to
TFLite and evaluated on the test split. Writes ``pareto.md``/``pareto.png`` (digits) or
``pareto_mnist1d.md``/``pareto_mnist1d.png`` to ``--out`` (``_gzip`` added with ``--size gzip``).

2-bit Dense kernels are stored as INT2 (four values a byte); 2-bit convolution kernels as INT4
(the runtime's CONV_2D takes no INT2), so in kernel bytes a 2-bit convolution costs what a
4-bit one does, while gzip'd it is far smaller.

Run:
    python bench/pareto.py                    # digits
    python bench/pareto.py --task mnist1d     # MNIST-1D (pip install 'keras_qx[tasks]')
    python bench/pareto.py --task mnist1d --size gzip --budgets 0.3,0.15
"""
from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time

import numpy as np

from keras_qx._compat import keras, tf, tfmot
from keras_qx.data import digits_cnn, load_digits, load_mnist1d, mnist1d_cnn
from keras_qx._io import write_atomic
from keras_qx.engine.pareto import pareto

HERE = os.path.dirname(os.path.abspath(__file__))


def _budgets(text: str) -> tuple:
    """Comma-separated budgets in keras_qx's syntax ("0.6x", bytes, "4bits"); a bare fraction
    such as 0.6 is read as "0.6x" (the script's flags predate the syntax)."""
    from keras_qx.engine.allocate import parse_budget

    out = []
    for part in text.split(","):
        part = part.strip()
        try:
            value = int(part) if part.isdigit() else f"{float(part):g}x" if part.replace(".", "", 1).isdigit() else part
            parse_budget(value)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
        out.append(value)
    return tuple(out)


# task -> (title, data loader, model builder, float learning rate, default float epochs, sample noun)
TASKS = {
    "digits": ("digits CNN", lambda: load_digits(seed=0), digits_cnn, 1e-3, 20, "images"),
    "mnist1d": ("MNIST-1D CNN", load_mnist1d, mnist1d_cnn, 2e-3, 30, "signals"),
}


def train_float(x, y, epochs: float, seed: int = 0, task: str = "digits"):
    """The task's model trained ``epochs`` epochs (a fractional part trains on that share of a
    shuffled copy of the data)."""
    _, _, build, lr, _, _ = TASKS[task]
    model = build(seed=seed)
    model.compile(keras.optimizers.Adam(lr), keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    whole, part = int(epochs), epochs - int(epochs)
    if whole:
        model.fit(x, y, epochs=whole, batch_size=64, verbose=0)
    if part > 0:
        idx = np.random.default_rng(seed).permutation(len(x))[:max(1, round(part * len(x)))]
        model.fit(x[idx], y[idx], epochs=1, batch_size=64, verbose=0)
    return model


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--task", choices=sorted(TASKS), default="digits", help="digits (default) or mnist1d")
    p.add_argument("--epochs", type=float, default=None,
                   help="float training epochs (default 20 for digits, 30 for mnist1d)")
    p.add_argument("--qat-epochs", type=int, default=2, help="QAT epochs per variant (default 2)")
    p.add_argument("--budgets", type=_budgets, default=("0.75x", "0.6x", "0.5x", "0.3x"),
                   help="comma-separated fractions of int8 kernel bytes, or byte counts (default 0.75,0.6,0.5,0.3)")
    p.add_argument("--size", choices=("kernel", "gzip"), default="kernel",
                   help="what budgets count: kernel bytes as stored (default) or their predicted gzip'd bytes")
    p.add_argument("--random", type=int, default=5, help="random mixes per budget (default 5)")
    p.add_argument("--seeds", type=int, default=3, help="QAT runs per variant, accuracy averaged (default 3)")
    p.add_argument("--method", default="loss", help="sensitivity method: loss, hessian or sqnr (default loss)")
    p.add_argument("--out", default=os.path.join(HERE, "results"), help="output directory (default bench/results)")
    args = p.parse_args(argv)
    title, load, _, _, default_epochs, noun = TASKS[args.task]
    if args.epochs is None:
        args.epochs = default_epochs
    if args.epochs <= 0:
        p.error(f"--epochs must be > 0, got {args.epochs}")
    if args.seeds < 1:
        p.error(f"--seeds must be >= 1, got {args.seeds}")
    os.makedirs(args.out, exist_ok=True)

    start = time.perf_counter()
    (x_train, y_train), (x_test, y_test) = load()
    keras.utils.set_random_seed(0)
    print(f"training the float {title} ({len(x_train)} {noun}, {args.epochs:g} epochs)...", flush=True)
    model = train_float(x_train, y_train, args.epochs, task=args.task)
    float_acc = float(model.evaluate(x_test, y_test, verbose=0)[1])
    print(f"      float Keras test accuracy {float_acc:.2%} ({time.perf_counter() - start:.0f}s)", flush=True)
    result = pareto(model, x_train, y_train, validation_data=(x_test, y_test), budgets=args.budgets,
                    method=args.method, qat_epochs=args.qat_epochs, random_mixes=args.random, seed=0,
                    seeds=args.seeds, size=args.size, verbose=1)
    total = time.perf_counter() - start

    rerun = "python bench/pareto.py" + "".join(
        " " + shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    machine = (f"Machine: {platform.platform()}, {platform.processor() or platform.machine()}, "
               f"{os.cpu_count()} CPUs, Python {platform.python_version()}; TF {tf.__version__}, "
               f"tfmot {tfmot.__version__}; total {total:.0f} s (sweep {result.seconds:.0f} s).")
    setup = (f"{title}, float {args.epochs:g} epochs (Keras test accuracy {float_acc:.2%}); each variant: "
             f"`qx.quantize` + `qx.calibrate` (500 samples) + {args.qat_epochs} QAT epochs (Adam 1e-4, batch 64) + `qx.export_tflite` "
             f"(300 calibration samples) + `qx.evaluate_tflite` on {len(x_test)} test {noun}; accuracy is the "
             f"mean of {args.seeds} QAT seeds (identical assignments run once). Random mixes: "
             f"per layer uniformly from its non-dominated widths, rejection-sampled into [0.85, 1] x budget "
             f"(cost model), else the largest found within it. Kernel bytes: rank>=2 constant tensors "
             f"in the file.")
    text = "\n\n".join([result.table(), setup, machine, f"Rerun: `{rerun}`"])
    print("\n" + text)
    stem = ("pareto" if args.task == "digits" else f"pareto_{args.task}") + ("_gzip" if args.size == "gzip" else "")
    md = os.path.join(args.out, stem + ".md")
    png = os.path.join(args.out, stem + ".png")
    write_atomic(md, (f"# Pareto sweep: auto_policy vs random mixes vs uniform ({title})\n\n" + text + "\n").encode())
    result.plot(png)
    print(f"\nwrote {os.path.relpath(md)} and {os.path.relpath(png)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
