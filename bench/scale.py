"""Transformer-size encoders through every step of keras_qx: seconds and peak memory per step.

Untrained encoders of tf_keras layers, as in issue 21: token ids (length SEQ) -> Embedding ->
N blocks of [MultiHeadAttention -> Add -> LayerNormalization -> Dense(4 * width, gelu) ->
Dense(width) -> Add -> LayerNormalization] -> GlobalAveragePooling1D -> Dense(4). Each size runs
in a fresh process: build, ``qx.sensitivity`` (``method="hessian"``: Hutchinson probes of the
loss's Hessian trace per kernel, a few passes over the data for all layers and widths at once,
not one pass per layer and width), ``qx.auto_policy`` at "0.4x" from that report, ``qx.quantize``,
``qx.calibrate`` (32 samples), ``qx.export_tflite`` (the same 32 as representative data, verified
on 16 by default). Peak memory: the process's resident high-water mark (VmHWM) during the step,
reset before each step (``/proc/self/clear_refs``), so it counts what the step holds on top of
what the steps before left. A size can stop at a memory guard (a watchdog kills the process) or a
time limit; its row says where.

Run: python bench/scale.py                      (23M, 108M, 334M; ~15 min on 2 cores)
     python bench/scale.py --sizes 23M --skip-sensitivity
     python bench/scale.py --sizes 1B --skip-sensitivity --guard-gb 23 (the 1B encoder, about 7 min)
Writes bench/results/scale.md (the sizes run).
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import multiprocessing as mp
import os
import platform
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)  # bench/layernorm_depth.py: the encoder

SEQ, CLASSES, SAMPLES, VERIFY = 32, 4, 32, 16
# name -> (blocks, width, heads, vocabulary)
SIZES = {
    "23M": (6, 512, 8, 8000),
    "108M": (12, 768, 12, 30522),
    "334M": (24, 1024, 16, 30522),
    "1B": (20, 2048, 16, 30522),
}
STEPS = ("build", "sensitivity", "auto_policy", "quantize", "calibrate", "export")


def encoder(blocks: int, width: int, heads: int, vocab: int, seed: int = 0):
    """The encoder of the module docstring (a tf_keras functional model): bench/layernorm_depth.py's
    stack at this bench's sizes."""
    from layernorm_depth import encoder as stack

    return stack(blocks, width, seed, heads=heads, vocab=vocab, ff=4, seq=SEQ, name=f"encoder_{blocks}x{width}")


def _status(key: str) -> float:
    """A /proc/self/status field in GB (VmRSS, VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 2 ** 20
    return float("nan")


def _trim() -> None:
    """Collect Python's cyclic garbage (a Keras model is full of cycles: a deleted one waits for
    the collector, which runs on object counts, not bytes) and give the C heap's free pages back to
    the system (glibc), so the resident size counts what is held."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    except OSError:
        pass


class _Guard(threading.Thread):
    """Ends the process (exit code 3) when its resident memory passes ``limit_gb``."""

    def __init__(self, limit_gb: float, report):
        super().__init__(daemon=True)
        self.limit_gb, self.report = limit_gb, report

    def run(self):
        while True:
            if _status("VmRSS") > self.limit_gb:
                self.report(f"stopped by the memory guard at {self.limit_gb:g} GB")
                os._exit(3)
            time.sleep(0.05)


def _run_size(name: str, args, queue) -> None:
    """All steps of one size, each row sent to ``queue`` as soon as it is measured."""
    import warnings

    import numpy as np

    def send(**row):
        queue.put(row)

    # oneDNN's CPU allocator keeps what TensorFlow frees (measured: 200 MB of deleted variables
    # stay resident), so each step would carry the peaks of the steps before; set before TF loads.
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

    _Guard(args.guard_gb, lambda why: send(step="guard", note=why)).start()
    import keras_qx as qx
    from keras_qx._compat import keras

    blocks, width, heads, vocab = SIZES[name]
    rng = np.random.default_rng(0)
    x = rng.integers(0, vocab, (max(SAMPLES, args.sensitivity_samples), SEQ)).astype("int32")
    y = rng.integers(0, CLASSES, len(x))
    state = {}

    def step(label, fn):
        _trim()
        _reset_peak()
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = fn()
        send(step=label, seconds=time.perf_counter() - start, peak_gb=_status("VmHWM"), rss_gb=_status("VmRSS"))
        return out

    model = step("build", lambda: encoder(blocks, width, heads, vocab))
    send(step="params", value=int(model.count_params()))
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile("adam", loss)
    policy = None
    if not args.skip_sensitivity:
        report = step("sensitivity", lambda: qx.sensitivity(
            model, x[:args.sensitivity_samples], y[:args.sensitivity_samples], method="hessian",
            hessian_probes=args.probes, verbose=0))
        policy = step("auto_policy", lambda: qx.auto_policy(model, budget="0.4x", report=report, verbose=0))
        bits = [e.get("weight_bits", 8) for e in policy.to_dict()["layers"].values()]
        send(step="policy", value={b: bits.count(b) for b in sorted(set(bits))})
    qat = step("quantize", lambda: qx.quantize(model, policy))
    del model  # what a user who only needs the file does; the QAT model holds the weights
    step("calibrate", lambda: qx.calibrate(qat, x[:SAMPLES]))
    state["tfl"] = step("export", lambda: qx.export_tflite(qat, x[:SAMPLES], verify_samples=args.verify,
                                                          min_agreement=0.0))
    r = state["tfl"].report
    send(step="file", value={"bytes": len(bytes(state["tfl"])), "mean_steps": float(r.mean_error_steps),
                             "max_steps": float(r.max_error_steps), "fully_integer": bool(r.info.fully_integer)})
    queue.close()
    queue.join_thread()
    os._exit(0)


def measure(name: str, args) -> dict:
    """One size in a fresh process: ``{step: {...}}`` plus ``params``, ``policy``, ``file``,
    ``stopped`` (why it ended early, or None)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_run_size, args=(name, args, queue))
    proc.start()
    rows, deadline = {"stopped": None}, time.time() + args.time_limit
    while True:
        try:
            row = queue.get(timeout=5)
        except Exception:  # queue.Empty: check the process
            if not proc.is_alive():
                break
            if time.time() > deadline:
                proc.kill()
                rows["stopped"] = f"stopped at the {args.time_limit:.0f} s time limit"
                break
            continue
        label = row.pop("step")
        if label in ("params", "policy", "file"):
            rows[label] = row["value"]
        elif label == "guard":
            rows["stopped"] = row["note"]
        else:
            rows[label] = row
            print(f"  {name} {label}: {row['seconds']:.1f} s, peak {row['peak_gb']:.2f} GB, after {row['rss_gb']:.2f} GB", flush=True)
        if label == "file":
            break
    proc.join(timeout=60)
    if rows["stopped"] is None and "file" not in rows:
        ran = [s for s in STEPS if s in rows]
        during = next((s for s in STEPS[STEPS.index(ran[-1]) + 1:] if not (args.skip_sensitivity and s in (
            "sensitivity", "auto_policy"))), "?") if ran else "build"
        rows["stopped"] = (f"stopped by the memory guard ({args.guard_gb:g} GB) in {during}" if proc.exitcode == 3
                           else f"the process ended (exit code {proc.exitcode}) in {during}")
    return rows


def check_sensitivity(blocks: int = 4, width: int = 128, samples: int = 128, probes: int = 4) -> dict:
    """The Hutchinson ("hessian") sensitivity against the exact one ("loss": each layer rounded
    alone, the loss measured again over the samples) on a small encoder of the same shape,
    trained on a task it can learn (random weights and labels give the exact method noise):
    Spearman rank correlation of the damages over (layer, width), the seconds of each, and the
    bits ``auto_policy`` picks at 0.4x from each report."""
    import warnings

    import numpy as np
    from scipy.stats import spearmanr

    import keras_qx as qx
    from keras_qx._compat import keras

    model = encoder(blocks, width, 4, 2000)
    model.compile(keras.optimizers.Adam(1e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    rng = np.random.default_rng(1)
    x_all = rng.integers(0, 2000, (2048 + samples, SEQ)).astype("int32")
    count = (x_all < 600).sum(1)  # a bag-of-tokens task the pooled encoder can learn: how many ids < 600
    y_all = np.digitize(count, np.quantile(count, [0.25, 0.5, 0.75]))
    fit = model.fit(x_all[:2048], y_all[:2048], epochs=4, batch_size=64, verbose=0)
    x, y = x_all[2048:], y_all[2048:]
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for method in ("loss", "hessian"):
            start = time.perf_counter()
            report = qx.sensitivity(model, x, y, method=method, hessian_probes=probes, verbose=0)
            out[method] = {"seconds": time.perf_counter() - start, "report": report,
                           "policy": qx.auto_policy(model, budget="0.4x", report=report, verbose=0)}
    keys = [(n, b) for n in out["loss"]["report"].damage for b in out["loss"]["report"].candidates]
    exact = [out["loss"]["report"].damage[n][b] for n, b in keys]
    estimate = [out["hessian"]["report"].damage[n][b] for n, b in keys]
    bits = {m: {n: e.get("weight_bits", 8) for n, e in out[m]["policy"].to_dict()["layers"].items()} for m in out}
    same = sum(bits["loss"][n] == bits["hessian"].get(n) for n in bits["loss"])
    return {"model": f"{blocks} x {width}", "params": int(model.count_params()), "samples": samples,
            "train_accuracy": float(fit.history["accuracy"][-1]),
            "spearman": float(spearmanr(exact, estimate)[0]), "pairs": len(keys),
            "loss_s": out["loss"]["seconds"], "hessian_s": out["hessian"]["seconds"],
            "same_bits": f"{same}/{len(bits['loss'])}"}


def table(results: dict) -> str:
    head = ["encoder", "params"] + [f"{s} s / GB" for s in STEPS] + ["bits (layers)", "file bytes",
                                                                     "file vs QAT (steps)", "note"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, rows in results.items():
        cells = [f"{name} ({SIZES[name][0]} x {SIZES[name][1]})", f"{rows.get('params', 0) / 1e6:.0f} M"]
        for s in STEPS:
            r = rows.get(s)
            cells.append(f"{r['seconds']:.0f} / {r['peak_gb']:.1f}" if r else "-")
        policy = rows.get("policy")
        cells.append(", ".join(f"{b}-bit {n}" for b, n in policy.items()) if policy else "default (8)")
        f = rows.get("file")
        cells.append(f"{f['bytes']:,}" if f else "-")
        cells.append(f"{f['mean_steps']:.2f} / {f['max_steps']:.0f}" if f else "-")
        cells.append(rows["stopped"] or "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _check_text(check) -> str:
    if not check:
        return ""
    return (f"\n\nThe estimate against the exact sensitivity (`--check-sensitivity`; a {check['model']} encoder, "
            f"{check['params'] / 1e6:.1f} M parameters, trained 4 epochs on a bag-of-tokens task to "
            f"{100 * check['train_accuracy']:.0f}% train accuracy; {check['samples']} held-out samples, 4 probes): Spearman "
            f"{check['spearman']:.2f} over {check['pairs']} (layer, width) damages; {check['hessian_s']:.1f} s against "
            f"{check['loss_s']:.1f} s; auto_policy at 0.4x gives the same bits on {check['same_bits']} layers.")


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="23M,108M,334M", help=f"comma-separated, of {', '.join(SIZES)}")
    parser.add_argument("--skip-sensitivity", action="store_true", help="default policy, no sensitivity/auto_policy")
    parser.add_argument("--sensitivity-samples", type=int, default=64)
    parser.add_argument("--probes", type=int, default=4, help="Hutchinson probes (default 4)")
    parser.add_argument("--verify", type=int, default=VERIFY, help=f"samples export verifies on (default {VERIFY})")
    parser.add_argument("--guard-gb", type=float, default=21.0, help="memory guard (default 21 GB)")
    parser.add_argument("--time-limit", type=float, default=3600.0, help="seconds per size (default 3600)")
    parser.add_argument("--check-sensitivity", action="store_true",
                        help="also: the hessian estimate against the exact sensitivity on a small encoder")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "scale.md"))
    args = parser.parse_args(argv)
    names = [s.strip() for s in args.sizes.split(",") if s.strip()]
    unknown = [n for n in names if n not in SIZES]
    if unknown:
        parser.error(f"unknown size(s) {unknown}; choose from {list(SIZES)}")
    results = {}
    for name in names:
        print(f"{name}: {SIZES[name]}", flush=True)
        results[name] = measure(name, args)
    text = table(results)
    print(text)
    check = None
    if args.check_sensitivity:
        check = check_sensitivity()
        print(check)
    from keras_qx._io import write_atomic

    raw = os.path.splitext(args.out)[0] + ".json"
    old = json.load(open(raw)) if os.path.exists(raw) else {}
    old.update(results)
    if check is not None:
        old["_sensitivity_check"] = check
    write_atomic(raw, json.dumps(old, indent=1).encode())
    import tensorflow as tf

    doc = (f"# Transformer-size encoders, step by step (issue 21)\n\n`bench/scale.py`: {__doc__.splitlines()[0]}\n\n"
           + table({k: old[k] for k in SIZES if k in old})
           + _check_text(old.get("_sensitivity_check"))
           + f"\n\nCells: seconds / peak resident GB of the step. Sensitivity: {args.sensitivity_samples} samples, "
             f"{args.probes} Hutchinson probes, candidates 2/4/8; auto_policy at 0.4x of the int8 kernel bytes. "
             f"Export verified on {args.verify} samples (`min_agreement=0.0`: untrained random encoders have no "
             "decisive top-1; the error in output steps is the check). Machine: "
             f"{platform.platform()}, {os.cpu_count()} CPUs, TF {tf.__version__}, Python {platform.python_version()}.\n"
             "Rerun: `python bench/scale.py --sizes 23M,108M,334M` (one size: `--sizes 108M`); the 1B encoder: "
             "`python bench/scale.py --sizes 1B --skip-sensitivity --guard-gb 23`. Run with `TF_ENABLE_ONEDNN_OPTS=0` "
             "(set by the bench), Python's garbage collected and the C heap trimmed before each step.\n")
    write_atomic(args.out, doc.encode())
    return text


if __name__ == "__main__":
    main()
