"""Predicted vs measured gzip'd TFLite file size: the cost model's ``gzip`` mode checked on real files.

Rows: the 16 tf_keras.applications families of bench/coverage.py (weights=None, small inputs)
quantized with the default policy and with a mixed 4/8 policy (quantizable layers alternately 4
and 8 bits), calibrated with ``qx.calibrate`` on 16 random images (no training), exported with
verify=False; plus the digits CNN and mnist1d_cnn, trained briefly in float, at uniform 8, 4 and 2
bits. Measured: ``gzip.compress(file, 9)``; predicted: ``qx.predict_gzip_bytes(model, policy)``
(numpy on the float weights, no conversion).

Run: python bench/gzip_cost.py [NAME ...]   (all rows: about 30-40 min on 2 shared cores)
     python bench/gzip_cost.py --fit         (the constants of keras_qx/quant/cost.py's gzip mode, from
                                             synthetic tensors and a separate set of small models)
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
# The fit set of the non-kernel constants: models not in the table (tests/families.py's reduced
# variants, minus the three that are full size there, and two MLPs), so the table is a validation.
FIT_FAMILIES = ("ConvNeXt", "DenseNet", "EfficientNet", "EfficientNetV2", "InceptionResNetV2", "MobileNet",
                "MobileNetV2", "MobileNetV3", "NASNet", "RegNet", "ResNet", "ResNetRS", "ResNetV2")
FIT_MODELS = ("fit-mlp", "fit-sparse", "fit-cnn", "fit-conv1d") + tuple(f"fit-{f}" for f in FIT_FAMILIES)


def rows():
    """``[(row name, model name, policy name)]`` in table order."""
    from coverage import families

    out = [(f"{m} W{b}", m, f"w{b}") for m, bits in SMALL.items() for b in bits]
    return out + [(f"{f} {p}", f, p) for f in families() for p in ("default", "mixed")]


def build(name: str, cache: str):
    """The float model ``name`` (a family, or a small model trained briefly) with the weights
    it had when exported: built under a fixed seed, and its weights read back from ``cache``."""
    import numpy as np

    from keras_qx._compat import keras
    from keras_qx._seed import seeded
    from keras_qx.data import digits_cnn, load_digits, load_mnist1d, mnist1d_cnn

    weights = os.path.join(cache, f"{name}.weights.h5")
    if name in ("fit-mlp", "fit-sparse"):
        (x, y), _ = load_digits()
        x = x.reshape(len(x), -1)
        with seeded(1):
            inputs = keras.Input((64,))
            h = keras.layers.Dense(256 if name == "fit-sparse" else 96, activation="relu", name="hidden")(inputs)
            model = keras.Model(inputs, keras.layers.Dense(10, name="head")(h))
            if name == "fit-mlp" and not os.path.exists(weights):
                model.compile(keras.optimizers.Adam(1e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
                model.fit(x, y, epochs=5, batch_size=64, verbose=0)
        if name == "fit-sparse" and not os.path.exists(weights):
            w, b = model.get_layer("hidden").get_weights()
            w[np.random.default_rng(0).random(w.shape) < 0.9] = 0  # a pruned kernel
            model.get_layer("hidden").set_weights([w, b])
    elif name in ("fit-cnn", "fit-conv1d"):  # small trained models unlike the table's two
        one_d = name == "fit-conv1d"
        (x, y), _ = (load_mnist1d if one_d else load_digits)()
        conv, pool = (keras.layers.Conv1D, keras.layers.MaxPooling1D) if one_d else (keras.layers.Conv2D,
                                                                                    keras.layers.MaxPooling2D)
        with seeded(2):
            inputs = keras.Input(x.shape[1:])
            h = pool(2)(conv(16, 7 if one_d else 3, padding="same", activation="relu")(inputs))
            h = conv(48, 3, padding="same", activation="relu")(h)
            h = keras.layers.Dense(64, activation="relu")(keras.layers.Flatten()(h))
            model = keras.Model(inputs, keras.layers.Dense(10)(h))
            if not os.path.exists(weights):
                model.compile(keras.optimizers.Adam(1e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
                model.fit(x, y, epochs=4, batch_size=64, verbose=0)
    elif name.startswith("fit-"):
        from tests.families import build as tiny

        with seeded(0):
            model = tiny(name[4:])
        x = 255 * np.random.default_rng(0).random((16, *model.input_shape[1:])).astype("float32")
    elif name in SMALL:
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


def _entropy_and_gzip(data):
    import numpy as np

    counts = np.bincount(data, minlength=256)
    p = counts[counts > 0] / data.size
    return float(-(p * np.log2(p)).sum()), len(gzip.compress(data.tobytes(), 9, mtime=0)) * 8 / data.size


def fit_deflate(knots=(0.0, 0.05, 0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0, 5.5, 6.0, 6.5,
                       7.0, 7.5, 8.0)):
    """gzip -9 bits per byte against order-0 entropy on synthetic weight tensors (64 KiB each):
    Gaussian, Laplace, Student-t and uniform weights quantized by their max |value| to int8,
    INT4 (and 2-bit on the INT4 grid) and INT2, packed, 0-97% zeroed; a piecewise-linear least
    squares fit in relative error, made non-decreasing."""
    import numpy as np

    from keras_qx.quant.cost import pack

    rng = np.random.default_rng(1)
    dists = {"gauss": lambda n: rng.normal(size=n), "laplace": lambda n: rng.laplace(size=n),
             "t3": lambda n: rng.standard_t(3, n), "t6": lambda n: rng.standard_t(6, n),
             "uniform": lambda n: rng.uniform(-1, 1, n)}
    h, g = [], []
    for storage, levels, scale in ((8, 127, 1), (4, 7, 1), (2, 1, 1), (4, 1, 7), (8, 7, 1)):
        for draw in dists.values():
            for zeros in (0, 0.3, 0.6, 0.8, 0.9, 0.97):
                n = 65536 * (8 // storage)
                w = draw(n)
                q = np.round(w / np.abs(w).max() * levels) * scale
                q[rng.random(n) < zeros] = 0
                e, bits = _entropy_and_gzip(pack(q.astype(np.int32), storage))
                h.append(e)
                g.append(bits)
    h, g = np.array(h), np.array(g)
    basis = np.array([np.interp(h, knots, row) for row in np.eye(len(knots))]).T
    weight = 1 / np.maximum(g, 0.02)
    values = np.linalg.lstsq(basis * weight[:, None], g * weight, rcond=None)[0]
    values = np.maximum.accumulate(values)
    err = (basis @ values - g) / g
    return knots, values, float(np.sqrt((err ** 2).mean())), float(np.abs(err).max())


def fit_rest(cache: str):
    """Least squares (non-negative, in relative error of the file) of the file's gzip'd bytes minus
    the kernels' prediction on [1, ops, nonzero biases, per-channel channels], on FIT_MODELS."""
    import numpy as np
    from scipy.optimize import nnls

    import keras_qx as qx
    from keras_qx.quant import cost
    from keras_qx.rewrite.flatten import flatten_nested

    rows = []
    for name in FIT_MODELS:
        for policy in ("default", "w4"):
            path = os.path.join(cache, f"{name}-{policy}.tflite")
            if not os.path.exists(path):
                continue
            model, _ = build(name, cache)
            pred = qx.predict_gzip_bytes(model, policy_for(model, policy))
            layers = flatten_nested(model, copies=False).layers
            features = cost._non_kernel_features(layers)
            rows.append((f"{name} {policy}", len(gzip.compress(open(path, "rb").read(), 9, mtime=0)), pred.kernels,
                         features))
    full = np.array([r[1] for r in rows], float)
    x = np.array([[1.0, *r[3]] for r in rows])
    coef = nnls(x / full[:, None], (full - [r[2] for r in rows]) / full)[0]
    err = (np.array([r[2] for r in rows]) + x @ coef - full) / full
    return coef, rows, err


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("names", nargs="*", help="models to run (default: all)")
    parser.add_argument("--cache", default=os.path.join("/tmp", "keras_qx_gzip_cost"))
    parser.add_argument("--export-only", action="store_true")
    parser.add_argument("--cached-only", action="store_true", help="predict the cached files; export nothing")
    parser.add_argument("--fit", action="store_true", help="fit the gzip mode's constants and print them")
    args = parser.parse_args(argv)
    os.makedirs(args.cache, exist_ok=True)
    if args.fit:
        knots, values, rms, worst = fit_deflate()
        print(f"_DEFLATE = {tuple(round(float(v), 3) for v in values)}  # at entropy {knots}; rms {rms:.1%}, "
              f"max {worst:.1%}")
        for name in FIT_MODELS:
            missing = [p for p in ("default", "w4") if not os.path.exists(os.path.join(args.cache, f"{name}-{p}.tflite"))]
            if missing:
                error = export(name, missing, args.cache)
                if error:
                    print(f"{name}: {error}", file=sys.stderr, flush=True)
        coef, fitted, err = fit_rest(args.cache)
        print("_FILE_FIXED, _PER_OP, _PER_BIAS, _PER_CHANNEL = " + ", ".join(f"{c:.2f}" for c in coef))
        for (label, *_), e in zip(fitted, err):
            print(f"  fit row {label}: {e:+.2%}")
        return 0
    table = [r for r in rows() if not args.names or r[1] in args.names]
    start = time.perf_counter()
    errors = {}
    for model in dict.fromkeys(m for _, m, _ in table):
        missing = [p for _, m, p in table if m == model and not os.path.exists(os.path.join(args.cache, f"{model}-{p}.tflite"))]
        if missing and args.cached_only:
            errors[model] = "not exported in this run (--cached-only)"
        elif missing:
            errors[model] = export(model, missing, args.cache)
            if errors[model]:
                print(f"{model}: {errors[model]}", file=sys.stderr, flush=True)
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
    lines += ["", "None of these files fitted the constants: the deflate curve comes from synthetic tensors "
                  "and the non-kernel constants from other models (`--fit`: two MLPs, a small CNN and a Conv1D net "
                  "trained on digits/MNIST-1D, and tests/families.py's reduced variants). Where it misses: the "
                  "small MobileNets (alpha 0.25/0.35), over by 4-6%: their per-channel scales and graph compress "
                  "better than the fitted per-channel/per-op constants say (their kernels are predicted within "
                  "0.3%); 2-bit kernels (digits/mnist1d W2), under by 4-5%: deflate does worse than the fitted "
                  "curve on the three-valued INT4 bytes of a trained 2-bit kernel.",
              "", f"Max |error| {worst:.1%}. gzip level 9 (python's gzip module, as bench/compression.py). "
                  f"Total {time.perf_counter() - start:.0f}s (prediction only, when the files were cached) on "
                  f"{platform.platform()}, {os.cpu_count()} CPUs, Python {platform.python_version()}."]
    text = "\n".join(lines)
    print(text)
    if not args.names or args.cached_only:
        from keras_qx._io import write_atomic

        header = "# Predicted vs measured gzip'd file size (bench/gzip_cost.py)\n\n" + __doc__.split("\n\n")[1] + "\n\n"
        write_atomic(os.path.join(HERE, "results", "gzip_cost.md"), (header + text + "\n").encode())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
