"""``keras-qx`` command line.

    keras-qx demo [--budget 0.6x] [--epochs 20] [--qat-epochs 4] [--out DIR]
        the main job on the digits data: float vs int8 vs auto mixed-precision TFLite
    keras-qx analyze [--model M --data D.npz] [--method loss] [--out DIR]
        per-layer sensitivity table, JSON and plot
    keras-qx quantize --budget 0.6x [--size gzip] [--weights gptq] [--qat-epochs 0] [--model M --data D.npz] [--out DIR]
        auto_policy under the budget, calibrate, QAT, export: policy JSON, .tflite and a Markdown report
    keras-qx search --budget 0.6x [--size gzip] [--trials 10] [--oracle bayesian] [--model M --data D.npz] [--out DIR]
        KerasTuner search of per-layer bits under the budget (first trial: auto_policy's),
        then export the best: policy JSON, .tflite, results table (CSV, Markdown) and a plot

``--budget`` is keras_qx's one budget syntax: bytes (60000, 60kB), 0.6x of the uniform-int8
kernel bytes, 4.5bits on average, a predicted latency (2ms, 500us: each layer's time at its
width, measured on this machine's runtime, one thread), or one size and one latency budget
separated by a comma (0.6x,2ms): both hold.
    keras-qx inspect model.tflite
        ops, INT4 tensors, sizes, each weight's zeros and distinct values
    keras-qx eval a.tflite b.tflite ... --data D.npz [--metric accuracy] [--plot roads.png]
        one table comparing the files in the runtime: metric, bytes, gzip, sparsity, latency
    keras-qx profile model.tflite [--data D.npz] [--threads 1] [--runs 50] [--warmup 10] [--no-xnnpack]
                     [--json profile.json] [--plot profile.png]
        the time of each op (per layer) in the runtime, with the kernel that ran it; a file with
        a dynamic dimension needs --data (its first x_test, or x, sample is timed)

Without ``--model``, analyze, quantize and search train the digits CNN first (on four fifths of
its training split). ``--data`` is an ``.npz`` with ``x_train, y_train, x_test, y_test`` and,
best, ``x_val, y_val``: data the float model did not train on. QAT trains on ``x_train``; the
policy is chosen (sensitivity, the search's trials) on ``x_val``, else on ``x_test`` with a
warning that the test accuracy is then optimistic; the report names the split. The targets of
every split are checked against the model's loss and output before any work.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

__all__ = ["main"]


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


class _Data:
    """The CLI's splits: ``train`` (QAT trains on it), ``test`` (the file is scored on it) and
    ``val``, where sensitivity and the search's trials are scored: data the float model has not
    trained on (see :func:`_validation`). ``val_name`` and ``note`` say which, for the report."""

    def __init__(self, train, test, val, val_name, note=""):
        self.train, self.test, self.val, self.val_name, self.note = train, test, val, val_name, note

    def describe(self) -> str:
        return f"Validation split (chose the policy): {self.val_name}, {len(self.val[0]):,} samples.{self.note}"


def _model_and_data(args) -> tuple:
    """``(model, _Data)``: the user's model and .npz, or the digits CNN trained here with a fifth
    of its training split held out for validation. The targets of every split are checked
    against the model's loss and output before any work."""
    if args.model is None:
        if args.data is not None:
            raise ValueError("--data needs --model (the digits data comes with the default model).")
        return _train_default(args.epochs)
    from keras_qx.qat.saving import load_model

    if args.data is None:
        raise ValueError("--model needs --data: an .npz with x_train, y_train, x_test, y_test (and x_val, y_val).")
    arrays = _load_data(args.data)  # the cheap check first
    model = load_model(args.model)
    data = _validation(arrays, args.data)
    _check_splits(model, data)
    return model, data


def _train_default(epochs: int):
    """The digits CNN trained on four fifths of the digits training split; the last fifth,
    never trained on, is the validation split."""
    from keras_qx._compat import keras
    from keras_qx._seed import seeded
    from keras_qx.data import digits_cnn, load_digits

    (x, y), test = load_digits()
    n_val = len(x) // 5
    (x, y), val = (x[:-n_val], y[:-n_val]), (x[-n_val:], y[-n_val:])
    _say(f"training the float digits CNN ({len(x)} images, {epochs} epochs; {n_val} held out for validation)...")
    with seeded(0):
        model = digits_cnn(seed=0)
        model.compile(keras.optimizers.Adam(1e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      metrics=["accuracy"])
        model.fit(x, y, epochs=epochs, batch_size=64, verbose=0)
    return model, _Data((x, y), test, val, "the last fifth of the digits training split, held out of float training")


def _load_data(path: str) -> dict:
    """The arrays of an ``.npz``: ``x_train, y_train, x_test, y_test``, and ``x_val, y_val``
    if it has them (both or neither)."""
    import numpy as np

    arrays = _read_npz(path, ("x_train", "y_train", "x_test", "y_test"))
    with np.load(path, allow_pickle=False) as npz:
        present = [k for k in ("x_val", "y_val") if k in npz.files]
    if len(present) == 1:
        other = ({"x_val", "y_val"} - set(present)).pop()
        raise ValueError(f"--data {path!r} has {present[0]} but not {other}; save both (np.savez(path, ..., "
                         "x_val=..., y_val=...)) or neither.")
    if present:
        arrays.update(_read_npz(path, ("x_val", "y_val")))
    return arrays


def _validation(arrays: dict, path: str) -> "_Data":
    """Where the policy is chosen (sensitivity, the search's trials): ``x_val, y_val`` if the
    .npz has them; else the test split, with a warning that the test figures are then
    optimistic (the float model trained on ``x_train``, so its tail is no validation)."""
    train, test = (arrays["x_train"], arrays["y_train"]), (arrays["x_test"], arrays["y_test"])
    if "x_val" in arrays:
        return _Data(train, test, (arrays["x_val"], arrays["y_val"]), "x_val/y_val")
    note = (f" {os.path.basename(path)} has no x_val/y_val, so the test split chose the policy and the test "
            "accuracy is optimistic; add x_val, y_val (held out of the float model's training) for an unbiased "
            "test figure.")
    _say("warning:" + note)
    return _Data(train, test, test, "x_test/y_test (no x_val in the data)", note)


def _check_splits(model, data: "_Data") -> None:
    """Every split's samples and targets checked against the model's input, loss and output
    (:func:`~keras_qx.engine.sensitivity.check_targets`), before any work."""
    from keras_qx._io import check_inputs, model_input_specs
    from keras_qx.engine.sensitivity import check_targets

    specs = model_input_specs(model)
    splits = [("train", data.train), ("test", data.test)]
    if data.val is not data.test:
        splits.append(("val", data.val))
    for name, (x, y) in splits:
        head = check_inputs(x[:2], specs, f"x_{name}")
        check_targets(model, head[0] if len(head) == 1 else head, y, what=f"y_{name}", n=len(x))


def _read_npz(path: str, keys: tuple, alternatives: tuple = ()) -> dict:
    """The arrays ``keys`` (or, if absent, ``alternatives``) of an ``.npz``, never unpickling: a
    data file cannot run code (object arrays are refused)."""
    import zipfile

    import numpy as np

    try:
        npz = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as err:
        if isinstance(err, FileNotFoundError):
            raise FileNotFoundError(f"--data {path!r}: no such file.") from None
        raise ValueError(f"--data {path!r} is not a readable .npz file ({err}); write it with "
                         f"np.savez(path, {', '.join(k + '=...' for k in keys)}).") from err
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise ValueError(f"--data {path!r} is a single .npy array; the data must be an .npz with "
                         f"{', '.join(keys)} (np.savez).")
    with npz:
        if alternatives and not all(k in npz.files for k in keys) and all(k in npz.files for k in alternatives):
            keys = alternatives
        missing = [k for k in keys if k not in npz.files]
        if missing:
            raise ValueError(f"--data {path!r} lacks array(s) {missing}; it has {npz.files}.")
        arrays = {}
        for key in keys:
            try:
                arrays[key] = npz[key]
            except ValueError as err:
                if "allow_pickle" in str(err):  # an object array: loading it would unpickle
                    raise ValueError(f"--data {path!r}: array {key!r} holds Python objects, which keras-qx does "
                                     "not unpickle (a data file must not run code); save numeric arrays.") from err
                raise ValueError(f"--data {path!r}: array {key!r} is unreadable ({err}).") from err
            except (OSError, EOFError, zipfile.BadZipFile) as err:
                raise ValueError(f"--data {path!r}: array {key!r} is unreadable ({err}); the file may be "
                                 "truncated.") from err
    return arrays


def _candidates(text: str) -> tuple:
    try:
        bits = tuple(int(b) for b in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"candidates must look like 2,4,8, got {text!r}") from None
    bad = [b for b in bits if not 2 <= b <= 8]
    if bad:
        raise argparse.ArgumentTypeError(f"candidates {bad} are not weight bit widths; use integers in 2..8, "
                                         "e.g. 2,4,8")
    return bits


def _out_path(args, name):
    os.makedirs(args.out, exist_ok=True)
    return os.path.join(args.out, name)


def _demo(args) -> int:
    from keras_qx.demo import format_table, run_demo

    from keras_qx.quant.policy import Policy

    policy = Policy.from_file(args.policy) if args.policy else None  # a bad file fails before training
    if args.out:
        os.makedirs(args.out, exist_ok=True)
    rows = run_demo(epochs=args.epochs, qat_epochs=args.qat_epochs, out_dir=args.out, policy=policy,
                    budget=args.budget, print_fn=_say)
    print(format_table(rows))
    return 0


def _analyze(args) -> int:
    from keras_qx._io import write_atomic
    from keras_qx.engine.sensitivity import sensitivity

    model, data = _model_and_data(args)
    _say(f"sensitivity ({args.method}) of {model.name}...")
    report = sensitivity(model, *data.val, args.candidates, method=args.method, verbose=1)
    print(f"Sensitivity measured on {data.val_name}, {len(data.val[0]):,} samples.")
    print(report.table())
    print(f"({report.seconds:.2f}s)")
    if args.out:
        write_atomic(_out_path(args, "sensitivity.json"), json.dumps(report.to_dict(), indent=2).encode())
        report.plot(_out_path(args, "sensitivity.png"))
        _say(f"wrote {args.out}/sensitivity.json and sensitivity.png")
    return 0


def _quantize(args) -> int:
    from keras_qx._compat import keras
    from keras_qx.engine.allocate import auto_policy, budget_from, join_budget, split_budget
    from keras_qx.quant.cost import SIZE_UNITS
    from keras_qx.lite.evaluate import evaluate_tflite
    from keras_qx._io import write_atomic
    from keras_qx.lite.export import export_tflite
    from keras_qx.qat.calibrate import calibrate
    from keras_qx.qat.quantize import quantize
    from keras_qx.engine.sensitivity import infer_loss, quantizable_layers, sensitivity
    from keras_qx.qat.summary import summary

    size_budget, budget_us = split_budget(args.budget)
    model, data = _model_and_data(args)
    (x, y), (xt, yt) = data.train, data.test
    unit = SIZE_UNITS[args.size]
    budget = None if size_budget is None else budget_from(quantizable_layers(model), size_budget, size=args.size)
    _say(f"sensitivity ({args.method}) on {data.val_name}, {len(data.val[0]):,} samples...")
    report = sensitivity(model, *data.val, args.candidates, method=args.method, verbose=1)
    if budget_us is not None:
        _say("latency table (each layer at each width, this machine's runtime)...")
    policy = auto_policy(model, report=report, budget=join_budget(budget, budget_us), keep=args.keep, size=args.size)
    meta = policy.meta["auto_policy"]
    rounding = "GPTQ" if args.weights == "gptq" else "round-to-nearest"
    calib = x[:256]
    _say(f"allocation: {_predicted(meta['predicted_kernel_bytes'], budget, unit, meta)}; calibrate "
         f"({rounding}, {len(calib)} samples)" + (f", QAT {args.qat_epochs} epochs..." if args.qat_epochs else
                                                  ", no QAT (--qat-epochs 0)..."))
    qat = calibrate(quantize(model, policy), calib, weights=args.weights)
    if args.qat_epochs:
        qat.compile(keras.optimizers.Adam(1e-4), infer_loss(model, y), metrics=["accuracy"])
        qat.fit(x, y, epochs=args.qat_epochs, batch_size=64, verbose=0)
    tfl = export_tflite(qat, x[:300], _out_path(args, "model.tflite"))
    _say(tfl.table())
    result = evaluate_tflite(tfl, xt, yt)
    file_kernels = tfl.report.info.kernel_bytes
    lines = ["# keras_qx quantization report", "",
             f"Budget ({args.budget}): {_predicted(meta['predicted_kernel_bytes'], budget, unit, meta)} "
             f"(int8 would be {meta['int8_kernel_bytes']:,} {unit}); kernel bytes in the file {file_kernels:,}.", "",
             f"TFLite (test split, {len(xt):,} samples): accuracy {result['accuracy']:.2%}, "
             f"{result['size_bytes']:,} bytes ({result['gzip_bytes']:,} gzipped), median latency "
             f"{result['latency_ms']:.3f} ms.", "",
             data.describe() + " The sensitivity (damage below) was measured there.", "",
             f"Weights: calibrated on {len(calib)} training samples with {rounding} rounding, then "
             + (f"{args.qat_epochs} QAT epoch(s)." if args.qat_epochs else "no QAT (--qat-epochs 0)."), "",
             f"| layer | bits | {unit} | damage |", "|---|---|---|---|"]
    if budget_us is not None:
        lines[-2:] = [f"| layer | bits | {unit} | predicted µs | damage |", "|---|---|---|---|---|"]
        lines += [f"| {n} | {v['bits']} | {v['kernel_bytes']:,} | {v['latency_us']:,.1f} | {v['damage']:.4g} |"
                  for n, v in meta["layers"].items()]
    else:
        lines += [f"| {n} | {v['bits']} | {v['kernel_bytes']:,} | {v['damage']:.4g} |" for n, v in meta["layers"].items()]
    lines += ["", "```", summary(qat, print_fn=None), "```", "", report.table().replace("\n", "  \n"),
              "", "![sensitivity](sensitivity.png)", ""]
    report.plot(_out_path(args, "sensitivity.png"))
    write_atomic(_out_path(args, "policy.json"), policy.to_json().encode())
    write_atomic(_out_path(args, "report.md"), "\n".join(lines).encode())
    print("\n".join(lines[:7]))
    _say(f"wrote {args.out}/policy.json, model.tflite, report.md, sensitivity.png")
    return 0


def _predicted(predicted_bytes, budget, unit, meta) -> str:
    """"predicted 700 of 727 kernel bytes, 1,234.5 of 2,000.0 µs" (each part where it applies)."""
    text = f"predicted {predicted_bytes:,}" + (f" of {budget:,}" if budget is not None else "") + f" {unit}"
    if meta.get("predicted_latency_us") is not None:
        cap = meta.get("latency_budget_us")
        text += f", {meta['predicted_latency_us']:,.1f}" + (f" of {cap:,.1f}" if cap is not None else "") + " µs"
    return text


def _plot_search(rows, budget, path, metric):
    from keras_qx._plot import axes, finish

    fig, ax = axes()
    done = [r for r in rows if r["status"] == "COMPLETED" and r["metric"] is not None]
    ax.scatter([r["kernel_bytes"] for r in done], [r["metric"] for r in done], label="trials", color="tab:blue")
    warm = [r for r in done if r["warm_start"]]
    if warm:
        ax.scatter([r["kernel_bytes"] for r in warm], [r["metric"] for r in warm], marker="*", s=220,
                   color="tab:orange", label="auto_policy (warm start)", zorder=3)
    if budget is not None:
        ax.axvline(budget, color="tab:red", linestyle="--", label=f"budget {budget:,} B")
    ax.set_xlabel("predicted kernel bytes")
    ax.set_ylabel(metric)
    ax.set_title("bit-width search")
    ax.legend(loc="best")
    finish(fig, path)


def _search(args) -> int:
    from keras_qx.engine.allocate import parse_budget
    from keras_qx.lite.evaluate import evaluate_tflite
    from keras_qx.lite.export import export_tflite, write_atomic
    from keras_qx.engine.search import BitWidthTuner, format_results

    parse_budget(args.budget)
    model, data = _model_and_data(args)
    (x, y), (xt, yt) = data.train, data.test
    tuner = BitWidthTuner(model, candidates=args.candidates, budget=args.budget, oracle=args.oracle,
                          max_trials=args.trials, directory=args.out, project_name="search",
                          overwrite=args.overwrite, seed=args.seed, verbose=0, size=args.size)
    tuner.print_fn = _say  # the CLI's progress goes to stderr
    caps = ([f"{tuner.budget_bytes:,} {tuner.unit}"] if tuner.budget_bytes is not None else []) + \
        ([f"{tuner.budget_us:,.1f} µs"] if tuner.budget_us is not None else [])
    _say(f"search: {args.trials} trials ({args.oracle}), budget {' and '.join(caps)} ({args.budget}), "
         f"QAT {args.qat_epochs} epoch(s) each...")
    _say(f"trials validated on {data.val_name}, {len(data.val[0]):,} samples")
    tuner.search(x, y, validation_data=data.val, epochs=args.qat_epochs, batch_size=64)
    policy = tuner.best_policy()
    meta = policy.meta["search"]
    qat = tuner.best_model()
    tfl = export_tflite(qat, x[:300], _out_path(args, "model.tflite"))
    _say(tfl.table())
    result = evaluate_tflite(tfl, xt, yt)
    rows = tuner.results()
    name = tuner.metric.name
    write_atomic(_out_path(args, "policy.json"), policy.to_json().encode())
    write_atomic(_out_path(args, "results.csv"), format_results(rows, name, fmt="csv").encode())
    table = format_results(rows, name, tuner.objective.direction, budget_bytes=tuner.budget_bytes, stats=tuner.stats,
                           budget_us=tuner.budget_us)
    _plot_search(rows, tuner.budget_bytes, _out_path(args, "search.png"), name)
    lines = ["# keras_qx bit-width search", "",
             f"Budget ({args.budget}): best trial {meta['trial_id']} "
             f"{_predicted(meta['predicted_kernel_bytes'], tuner.budget_bytes, tuner.unit, meta)} (int8 would be "
             f"{tuner.int8_bytes:,}); kernel bytes in the file {tfl.report.info.kernel_bytes:,}.", "",
             f"TFLite (test split, {len(xt):,} samples): accuracy {result['accuracy']:.2%}, "
             f"{result['size_bytes']:,} bytes ({result['gzip_bytes']:,} gzipped), median latency "
             f"{result['latency_ms']:.3f} ms.", "",
             data.describe() + f" The trials' {name} below is measured there.", "",
             table, "", "![search](search.png)", ""]
    write_atomic(_out_path(args, "results.md"), "\n".join(lines).encode())
    print("\n".join(lines[:7]))
    _say(f"wrote {args.out}/policy.json, model.tflite, results.csv, results.md, search.png")
    return 0


def _inspect(args) -> int:
    from keras_qx.lite.evaluate import gzip_size
    from keras_qx.lite.inspect import inspect_tflite, read_model

    info = inspect_tflite(args.path)  # errors name the file
    data = read_model(args.path)
    print(f"{args.path}: {info.size_bytes:,} bytes ({gzip_size(data):,} gzipped), "
          f"{'fully integer' if info.fully_integer else 'float compute ops: ' + ', '.join(info.float_ops)}")
    print("ops: " + ", ".join(info.ops))
    print(f"kernel sparsity: {info.kernel_sparsity:.1%} of the kernel values are 0")
    print(f"  {'type':<8} {'shape':<20} {'bytes':>12}  {'zeros':>6} {'values':>10}  name   "
          "(values: distinct, and the most in one channel of a per-channel tensor)")
    rows = sorted(zip(info.weights, info.weight_stats), key=lambda r: -r[0][3])[: args.top]
    for (name, dtype, shape, nbytes), stats in rows:
        zeros, distinct = (f"{stats.sparsity:.1%}", f"{stats.distinct:,}") if stats is not None else ("-", "-")
        if stats is not None and stats.channel_distinct is not None:
            distinct += f" ({stats.channel_distinct}/ch)"
        print(f"  {dtype:<8} {str(shape):<20} {nbytes:>10,} B  {zeros:>6} {distinct:>10}  {name[:70]}")
    return 0


def _eval(args) -> int:
    from keras_qx.lite.compare import compare

    arrays = _read_npz(args.data, ("x_test", "y_test"), alternatives=("x", "y"))
    x, y = arrays.get("x_test", arrays.get("x")), arrays.get("y_test", arrays.get("y"))
    names = [os.path.splitext(os.path.basename(p))[0] for p in args.paths]
    if len(set(names)) != len(names):
        names = list(args.paths)
    _say(f"evaluating {len(names)} file(s) on {len(x)} samples ({args.latency_runs} timed runs each)...")
    result = compare(dict(zip(names, args.paths)), x, y, metric=args.metric, latency_runs=args.latency_runs,
                     num_threads=args.threads)
    print(result.table())
    if args.plot:
        result.plot(args.plot)
        _say(f"wrote {args.plot}")
    return 0


def _profile(args) -> int:
    from keras_qx._io import write_atomic
    from keras_qx.lite.profile import profile_tflite

    x = None
    if args.data:
        arrays = _read_npz(args.data, ("x_test",), alternatives=("x",))
        x = arrays.get("x_test", arrays.get("x"))
    _say(f"profiling {args.path} ({args.warmup} warm-up and {args.runs} timed runs of each op)...")
    result = profile_tflite(args.path, x, num_threads=args.threads, xnnpack=not args.no_xnnpack, runs=args.runs,
                            warmup=args.warmup)
    print(result.table())
    if args.json:
        write_atomic(args.json, json.dumps(result.to_dict(), indent=2).encode())
        _say(f"wrote {args.json}")
    if args.plot:
        result.plot(args.plot)
        _say(f"wrote {args.plot}")
    return 0


def _model_options(parser):
    parser.add_argument("--model", help="a float model (.keras, .h5, SavedModel); default: train the digits CNN")
    parser.add_argument("--data", help=".npz with x_train, y_train, x_test, y_test and, best, x_val, y_val held out "
                        "of the float model's training: the policy is chosen on x_val (else x_test, with a warning)")
    parser.add_argument("--epochs", type=int, default=20, help="float training epochs for the digits CNN")
    parser.add_argument("--method", default="loss", choices=("loss", "hessian", "sqnr"), help="sensitivity method")
    parser.add_argument("--candidates", type=_candidates, default=(2, 4, 8), help="bit widths, e.g. 2,4,8")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="keras-qx", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train, quantize (int8 and auto mixed-precision), export and compare on digits")
    demo.add_argument("--epochs", type=int, default=20, help="float training epochs")
    demo.add_argument("--qat-epochs", type=int, default=4, help="quantization-aware training epochs")
    demo.add_argument("--budget", default="0.6x", help="kernel bytes, or a fraction of int8's like 0.6x")
    demo.add_argument("--policy", help="a policy JSON file for the mixed model instead of auto_policy")
    demo.add_argument("--out", help="directory for the .tflite files and the policy JSON")
    demo.set_defaults(func=_demo)
    analyze = sub.add_parser("analyze", help="per-layer sensitivity report and plot")
    _model_options(analyze)
    analyze.add_argument("--out", help="directory for sensitivity.json and sensitivity.png")
    analyze.set_defaults(func=_analyze)
    quant = sub.add_parser("quantize", help="auto_policy under a budget, QAT, export and report")
    _model_options(quant)
    quant.add_argument("--budget", required=True, help="kernel bytes (60kB), a fraction of int8's (0.6x), average bits (4.5bits), a "
                       "predicted latency (2ms), or a size and a latency: 0.6x,2ms")
    quant.add_argument("--size", default="kernel", choices=("kernel", "gzip"),
                       help="what the budget counts: kernel bytes as stored, or their predicted gzip'd bytes")
    quant.add_argument("--keep", type=lambda s: [n for n in s.split(",") if n], default=[],
                       help="layers kept at 8 bits, comma-separated")
    quant.add_argument("--qat-epochs", type=int, default=2,
                       help="QAT epochs after calibration (default 2; 0: none, the file from calibration alone)")
    quant.add_argument("--weights", default="nearest", choices=("nearest", "gptq"),
                       help="how kernels round onto their grid at calibration: nearest (default) or gptq "
                            "(second-order, layer by layer; keeps more accuracy at 4 and 2 bits without QAT)")
    quant.add_argument("--out", default="keras_qx_out", help="output directory (default keras_qx_out)")
    quant.set_defaults(func=_quantize)
    search = sub.add_parser("search", help="KerasTuner search of per-layer bits under a budget, export the best")
    _model_options(search)
    search.set_defaults(candidates=(4, 8))
    search.add_argument("--budget", required=True, help="kernel bytes (60kB), a fraction of int8's (0.6x), average bits (4.5bits), a "
                       "predicted latency (2ms), or a size and a latency: 0.6x,2ms")
    search.add_argument("--size", default="kernel", choices=("kernel", "gzip"),
                        help="what the budget counts: kernel bytes as stored, or their predicted gzip'd bytes")
    search.add_argument("--trials", type=int, default=10, help="trained trials (over-budget ones are never trained)")
    search.add_argument("--qat-epochs", type=int, default=2, help="QAT epochs per trial")
    search.add_argument("--oracle", default="bayesian", choices=("bayesian", "random", "hyperband"))
    search.add_argument("--seed", type=int, default=0)
    search.add_argument("--overwrite", action="store_true", help="start afresh instead of resuming DIR/search")
    search.add_argument("--out", default="keras_qx_search", help="output directory (default keras_qx_search)")
    search.set_defaults(func=_search)
    inspect = sub.add_parser("inspect", help="show what a .tflite file holds")
    inspect.add_argument("path")
    inspect.add_argument("--top", type=int, default=20, help="largest constant tensors to list")
    inspect.set_defaults(func=_inspect)
    evaluate = sub.add_parser("eval", help="compare .tflite files: metric, bytes, gzip, sparsity, latency")
    evaluate.add_argument("paths", nargs="+", metavar="FILE", help=".tflite files")
    evaluate.add_argument("--data", required=True, help=".npz with x_test, y_test (or x, y)")
    evaluate.add_argument("--metric", default="accuracy", choices=("accuracy", "mae", "mse", "rmse"))
    evaluate.add_argument("--latency-runs", type=int, default=200, help="timed single-sample runs per file")
    evaluate.add_argument("--threads", type=int, default=1, help="interpreter threads")
    evaluate.add_argument("--plot", help="write a size-vs-metric plot (PNG) here")
    evaluate.set_defaults(func=_eval)
    profile = sub.add_parser("profile", help="time each op of a .tflite file in the runtime, per layer")
    profile.add_argument("path", metavar="FILE", help="a .tflite file")
    profile.add_argument("--data", help=".npz with x_test (or x): its first sample is timed; default a generated "
                         "sample (needed for a file with a dynamic dimension)")
    profile.add_argument("--threads", type=int, default=1, help="interpreter threads")
    profile.add_argument("--runs", type=int, default=50, help="timed runs of each op (the median is kept)")
    profile.add_argument("--warmup", type=int, default=10, help="untimed runs of each op first")
    profile.add_argument("--no-xnnpack", action="store_true", help="built-in kernels only (default: XNNPACK where "
                         "it takes the op, as the runtime does)")
    profile.add_argument("--json", help="write the profile as JSON here")
    profile.add_argument("--plot", help="write a time-per-layer plot (PNG) here")
    profile.set_defaults(func=_profile)
    args = parser.parse_args(argv)
    for name in ("epochs", "qat_epochs", "top", "trials", "latency_runs", "threads", "runs", "warmup"):
        least = 0 if name == "qat_epochs" and getattr(args, "func", None) is _quantize else 1  # quantize: calibration alone
        if getattr(args, name, 1) is not None and getattr(args, name, 1) < least:
            parser.error(f"--{name.replace('_', '-')} must be at least {least}")
    if getattr(args, "policy", None) and not os.path.isfile(args.policy):
        parser.error(f"--policy {args.policy!r}: no such file")
    if getattr(args, "data", None) and not os.path.isfile(args.data):
        parser.error(f"--data {args.data!r}: no such file; pass an .npz with x_train, y_train, x_test, y_test "
                     "(np.savez(path, x_train=..., y_train=..., x_test=..., y_test=...))")
    missing = [p for p in getattr(args, "paths", []) if not os.path.isfile(p)]
    if missing:
        parser.error(f"no such .tflite file: {missing[0]!r}")
    if getattr(args, "model", None) and not os.path.exists(args.model):
        parser.error(f"--model {args.model!r}: no such file or directory; pass a .keras, .h5 or SavedModel "
                     "written by model.save(...)")
    if getattr(args, "out", None) and os.path.exists(args.out) and not os.path.isdir(args.out):
        parser.error(f"--out {args.out!r} is a file, not a directory; pass a directory for the outputs")
    try:
        return args.func(args)
    except (ValueError, TypeError, OSError, RuntimeError) as err:  # OSError: files (missing, corrupt, denied)
        lines = [line for line in str(err).splitlines() if line.strip()] or [type(err).__name__]
        print(f"keras-qx: error: {lines[0]}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("keras-qx: interrupted.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
