"""Predicted vs measured gzip'd TFLite file size: the cost model's ``gzip`` mode checked on real files.

Rows: the 16 tf_keras.applications families of bench/coverage.py (weights=None, small inputs)
quantized with the default policy and with a mixed 4/8 policy (quantizable layers alternately 4
and 8 bits), calibrated with ``qx.calibrate`` on 16 random images (no training), exported with
verify=False; plus the digits CNN and mnist1d_cnn, trained briefly in float, at uniform 8, 4 and 2
bits. Measured: ``gzip.compress(file, 9)``; predicted: ``qx.predict_gzip_bytes(model, policy)``
(numpy on the float weights, no conversion).

Run: python bench/gzip_cost.py [NAME ...]   (all rows: about 30-40 min on 2 shared cores)
The exported files and the float weights are kept in --cache (default /tmp/keras_qx_gzip_cost,
outside the repository) so that the prediction can be re-run without converting again.
"""
from __future__ import annotations

import argparse
import gzip
import multiprocessing as mp
import os
import platform
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
SMALL = {"digits": (8, 4, 2), "mnist1d": (8, 4, 2)}


def rows():
    """``[(row name, model name, policy name)]`` in table order."""
    from coverage import families

    out = [(f"{m} W{b}", m, f"w{b}") for m, bits in SMALL.items() for b in bits]
    return out + [(f"{f} {p}", f, p) for f in families() for p in ("default", "mixed")]


def build(name: str, cache: str):
    """The float model ``name`` (a family, or a small model trained briefly) with the weights
    it had when exported: built under a fixed seed, and its weights read back from ``cache``."""
    import numpy as np

    from keras_qx._compat import keras, seeded
    from keras_qx.data import digits_cnn, load_digits, load_mnist1d, mnist1d_cnn

    weights = os.path.join(cache, f"{name}.weights.h5")
    if name in SMALL:
        (x, y), _ = (load_digits if name == "digits" else load_mnist1d)()
        model = (digits_cnn if name == "digits" else mnist1d_cnn)()
        if not os.path.exists(weights):
            with seeded(0):
                model.compile(keras.optimizers.Adam(1e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
                model.fit(x, y, epochs=5, batch_size=64, verbose=0)
    else:
        from coverage import families

        with seeded(0):
            model = families()[name]()
        x = 255 * np.random.default_rng(0).random((16, *model.input_shape[1:])).astype("float32")
    if os.path.exists(weights):
        model.load_weights(weights)
    else:
        model.save_weights(weights)
    return model, x


def policy_for(model, policy: str):
    import keras_qx as qx
    from keras_qx.engine.sensitivity import quantizable_layers

    if policy == "default":
        return qx.Policy()
    if policy == "mixed":
        return qx.Policy.from_bits({l.name: (4 if i % 2 == 0 else 8) for i, l in enumerate(quantizable_layers(model))})
    return qx.Policy.uniform(int(policy[1:]))


def _export(name: str, policies: list, cache: str, queue) -> None:
    import keras_qx as qx

    try:
        model, x = build(name, cache)
        for policy in policies:
            start = time.perf_counter()
            qat = qx.quantize(model, policy_for(model, policy))
            qx.calibrate(qat, x[:200])
            tfl = qx.export_tflite(qat, x[:200], verify=False)
            with open(os.path.join(cache, f"{name}-{policy}.tflite"), "wb") as f:
                f.write(bytes(tfl))
            print(f"exported {name} {policy}: {len(tfl):,} B in {time.perf_counter() - start:.0f}s", file=sys.stderr,
                  flush=True)
        queue.put(None)
    except Exception as err:  # a failure is a row, not the end of the run
        queue.put(f"{type(err).__name__}: {str(err).splitlines()[0][:160]}")
    queue.close()
    queue.join_thread()
    os._exit(0)


def export(name: str, policies: list, cache: str, timeout: int = 1800):
    """Quantize, calibrate and export ``name`` under each policy in a fresh process."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_export, args=(name, policies, cache, queue))
    proc.start()
    try:
        return queue.get(timeout=timeout)
    except Exception:
        return f"no result in {timeout}s (exit {proc.exitcode})"
    finally:
        proc.join(5)
        if proc.is_alive():
            proc.kill()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("names", nargs="*", help="models to run (default: all)")
    parser.add_argument("--cache", default=os.path.join("/tmp", "keras_qx_gzip_cost"))
    parser.add_argument("--export-only", action="store_true")
    args = parser.parse_args(argv)
    os.makedirs(args.cache, exist_ok=True)
    table = [r for r in rows() if not args.names or r[1] in args.names]
    start = time.perf_counter()
    errors = {}
    for model in dict.fromkeys(m for _, m, _ in table):
        missing = [p for _, m, p in table if m == model and not os.path.exists(os.path.join(args.cache, f"{model}-{p}.tflite"))]
        if missing:
            errors[model] = export(model, missing, args.cache)
    if args.export_only:
        return 0
    import keras_qx as qx

    lines = ["| model | policy | file bytes | measured gzip | predicted gzip | error | of which kernels (predicted) |",
             "|---|---|---|---|---|---|---|"]
    worst = 0.0
    for label, model_name, policy in table:
        path = os.path.join(args.cache, f"{model_name}-{policy}.tflite")
        if not os.path.exists(path):
            lines.append(f"| {model_name} | {policy} | fails: {errors.get(model_name)} | | | | |")
            continue
        data = open(path, "rb").read()
        measured = len(gzip.compress(data, 9, mtime=0))
        model, _ = build(model_name, args.cache)
        pred = qx.predict_gzip_bytes(model, policy_for(model, policy))
        err = (pred.total - measured) / measured
        worst = max(worst, abs(err))
        lines.append(f"| {model_name} | {policy} | {len(data):,} | {measured:,} | {pred.total:,} | {err:+.1%} | "
                     f"{pred.kernels:,} |")
        print(lines[-1], file=sys.stderr, flush=True)
    lines += ["", f"Max |error| {worst:.1%}. gzip level 9 (python's gzip module, as bench/compression.py). "
                  f"Total {time.perf_counter() - start:.0f}s (prediction only, when the files were cached) on "
                  f"{platform.platform()}, {os.cpu_count()} CPUs, Python {platform.python_version()}."]
    text = "\n".join(lines)
    print(text)
    if not args.names:
        from keras_qx._io import write_atomic

        header = "# Predicted vs measured gzip'd file size (bench/gzip_cost.py)\n\n" + __doc__.split("\n\n")[1] + "\n\n"
        write_atomic(os.path.join(HERE, "results", "gzip_cost.md"), (header + text + "\n").encode())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
