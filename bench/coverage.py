"""Coverage: one variant of every tf_keras.applications family, quantized by keras_qx and by
tfmot's quantize_model, exported to int8 TFLite; fully integer? agreement with Keras? size.

Run: python bench/coverage.py                        (all 16 take tens of minutes on 2 cores)
     python bench/coverage.py --families RegNet,ResNet --no-tfmot   (rerun some rows, keras_qx only)
     python bench/coverage.py --tiny                 (the reduced variants the tests use)
Deterministic: each row seeds Keras (weights, data) and turns on TensorFlow's op determinism, so
a rerun of a row gives the same figures on the same machine.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import platform
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # tests.families: the tiny variants and calibrate()
CALIBRATION_STEPS = 10
SEED = 0


def families():
    from keras_qx._compat import keras

    A = keras.applications
    small = dict(weights=None, classes=10)
    return {
        "ConvNeXt": lambda: A.ConvNeXtTiny(input_shape=(32, 32, 3), **small),
        "DenseNet": lambda: A.DenseNet121(input_shape=(32, 32, 3), **small),
        "EfficientNet": lambda: A.EfficientNetB0(input_shape=(32, 32, 3), **small),
        "EfficientNetV2": lambda: A.EfficientNetV2B0(input_shape=(32, 32, 3), **small),
        "InceptionResNetV2": lambda: A.InceptionResNetV2(input_shape=(75, 75, 3), **small),
        "InceptionV3": lambda: A.InceptionV3(input_shape=(75, 75, 3), **small),
        "MobileNet": lambda: A.MobileNet(input_shape=(32, 32, 3), alpha=0.25, **small),
        "MobileNetV2": lambda: A.MobileNetV2(input_shape=(32, 32, 3), alpha=0.35, **small),
        "MobileNetV3": lambda: A.MobileNetV3Small(input_shape=(32, 32, 3), alpha=0.75, **small),
        "NASNet": lambda: A.NASNetMobile(input_shape=(32, 32, 3), **small),
        "RegNet": lambda: A.RegNetX002(input_shape=(32, 32, 3), **small),
        "ResNet": lambda: A.ResNet50(input_shape=(32, 32, 3), **small),
        "ResNetRS": lambda: A.ResNetRS50(input_shape=(32, 32, 3), **small),
        "ResNetV2": lambda: A.ResNet50V2(input_shape=(32, 32, 3), **small),
        "VGG": lambda: A.VGG16(input_shape=(32, 32, 3), **small),
        "Xception": lambda: A.Xception(input_shape=(71, 71, 3), **small),
        "TransformerBlock": transformer_block,  # not an application: the sequence-model counterpart
    }


def transformer_block():
    """Dense projection, MultiHeadAttention, Add + LayerNormalization, gelu feed-forward,
    GlobalAveragePooling1D, softmax head: one encoder block on (16, 8) sequences."""
    from keras_qx._compat import keras

    L = keras.layers
    inputs = keras.Input((16, 8), name="seq")
    x = L.Dense(16, name="proj")(inputs)
    a = L.MultiHeadAttention(num_heads=2, key_dim=8, name="mha")(x, x)
    x = L.LayerNormalization(name="ln")(L.Add(name="res")([a, x]))
    x = L.Dense(32, activation="gelu", name="ff")(x)
    x = L.GlobalAveragePooling1D(name="gap")(x)
    return keras.Model(inputs, L.Dense(10, activation="softmax", name="predictions")(x), name="transformer_block")


def _samples(model, seed: int = 0):
    """16 random 0-255 images, or N(0, 1) sequences for a sequence model."""
    import numpy as np

    rng = np.random.default_rng(seed)
    shape = (16, *model.input_shape[1:])
    return rng.normal(size=shape).astype("float32") if len(shape) == 3 else 255 * rng.random(shape).astype("float32")


def _one(family: str, tool: str, tiny: bool, seed: int, queue) -> None:
    """Run :func:`_measure` and hand the row over before TensorFlow's teardown (which can
    abort the process and lose a queued result)."""
    queue.put(_measure(family, tool, tiny, seed))
    queue.close()
    queue.join_thread()
    os._exit(0)


def _measure(family: str, tool: str, tiny: bool = False, seed: int = SEED) -> dict:
    """Build, quantize (keras_qx or tfmot), calibrate with a few steps, export, verify."""
    import numpy as np

    import keras_qx as qx
    from keras_qx._compat import keras, tf, tfmot
    from keras_qx.lite.inspect import TFLiteRunner
    from tests.families import FAMILIES, build, calibrate

    start = time.perf_counter()
    try:
        # The weights' initializers and the SGD steps: the same numbers on every run (without
        # op determinism the steps' reductions vary between runs and so did the figures).
        keras.utils.set_random_seed(seed)
        tf.config.experimental.enable_op_determinism()
        model = build(family) if tiny and family in FAMILIES else families()[family]()
        x = _samples(model, seed)
        qat = qx.quantize(model) if tool == "keras_qx" else tfmot.quantization.keras.quantize_model(model)
        calibrate(qat, x, steps=CALIBRATION_STEPS)
        tfl = qx.export_tflite(qat, x, min_agreement=0.0)
        r = tfl.report
        # The Keras model's own conditioning: how far its output moves (in the same output steps)
        # when 0.5% of the input values move by one input quantization step (a grey level).
        runner = TFLiteRunner(bytes(tfl))
        step, in_step = runner.output_step, float(runner.input["quantization"][0])
        nudged = x.copy()
        mask = np.random.default_rng(2).random(x.shape) < 0.005
        nudged[mask] = np.where(nudged[mask] < x.max() - in_step, nudged[mask] + in_step, nudged[mask] - in_step)
        self_noise = float(np.abs(qat.predict(nudged, verbose=0) - qat.predict(x, verbose=0)).mean() / step)
        worst = _worst_own(qat, bytes(tfl), x)
        kernels = _kernels_apart(bytes(tfl), x, runner.predict(x), step)
        return ({"ok": True, "fully_integer": r.info.fully_integer, "float_ops": sorted(set(r.info.float_ops)),
                   "mean_steps": r.mean_error_steps, "max_steps": r.max_error_steps, "self_noise": self_noise,
                   "bytes": len(tfl), "seconds": time.perf_counter() - start, "kernels": kernels, **worst})
    except Exception as err:  # report any failure as a row
        return ({"ok": False, "error": f"{type(err).__name__}: {str(err).splitlines()[0][:120]}",
                   "seconds": time.perf_counter() - start})


def _kernels_apart(data: bytes, x, xnnpack_out, step: float) -> tuple:
    """The file run by TFLite's built-in int8 kernels against its XNNPACK run (the default, which
    ``export_tflite`` verifies with): mean and max difference in output steps. Two correct integer
    implementations of one file: how far one-step requantization differences travel."""
    import numpy as np

    from keras_qx._runtime import interpreter, quantize_input

    it = interpreter(data, xnnpack=False)
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    got = []
    for sample in x:
        it.set_tensor(inp["index"], quantize_input(sample[None], inp))
        it.invoke()
        got.append(it.get_tensor(out["index"])[0])
    scale, zero = out["quantization"]
    diff = np.abs((np.stack(got).astype(np.float32) - zero) * scale - xnnpack_out) / step
    return float(diff.mean()), float(diff.max())


def _worst_own(qat, data: bytes, x) -> dict:
    """The op with the largest own error (``compare_layers``: each layer fed the file's values of
    its inputs), by max then mean, in steps of that op's output scale; and the largest own mean."""
    from keras_qx.lite.fidelity import debug_tflite

    cmp = debug_tflite(qat, data, x)
    own = [e for e in cmp.layers if e.own_max_steps is not None]
    if not own:
        return {"own": None}
    top = max(own, key=lambda e: (round(e.own_max_steps), e.own_mean_steps))
    top_mean = max(own, key=lambda e: e.own_mean_steps)
    return {"own": (top.own_max_steps, top.own_mean_steps, top.layer, top.op),
            "own_mean": (top_mean.own_mean_steps, top_mean.layer, top_mean.op),
            "output_own": (own[-1].own_mean_steps, own[-1].own_max_steps) if own[-1] is cmp.layers[-1] else None}


def run(family: str, tool: str, tiny: bool = False, timeout: int = 900, seed: int = SEED) -> dict:
    """Each run in a fresh process: memory and Keras name state do not leak between models."""
    queue = mp.get_context("spawn").Queue()
    proc = mp.get_context("spawn").Process(target=_one, args=(family, tool, tiny, seed, queue))
    proc.start()
    try:
        return queue.get(timeout=timeout)
    except Exception:
        return {"ok": False, "error": f"no result in {timeout}s (exit {proc.exitcode})"}
    finally:
        proc.join(5)
        if proc.is_alive():
            proc.kill()


def _cell(r: dict) -> str:
    if not r["ok"]:
        return f"fails: {r['error']}"
    integer = "yes" if r["fully_integer"] else "no (" + ", ".join(r["float_ops"]) + ")"
    return (f"{integer}; {r['mean_steps']:.2f} / {r['max_steps']:.0f} steps (nudge {r['self_noise']:.2f}); "
            f"{r['bytes']:,} B")


def _kernels_cell(r: dict) -> str:
    return f"{r['kernels'][0]:.2f} / {r['kernels'][1]:.0f}" if r["ok"] and r.get("kernels") else "-"


def _own_cell(r: dict) -> str:
    if not r["ok"] or r.get("own") is None:
        return "-"
    mx, mean, layer, op = r["own"]
    m, m_layer, m_op = r["own_mean"]
    cell = f"{mx:.0f} (mean {mean:.2f}) {layer} ({op})"
    return cell + (f"; top mean {m:.2f} {m_layer} ({m_op})" if m_layer != layer else "")


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help="families (as --families)")
    parser.add_argument("--families", default="", help="comma-separated families, e.g. RegNet,ResNet (default all)")
    parser.add_argument("--tiny", action="store_true", help="the reduced variants of tests/families.py")
    parser.add_argument("--no-tfmot", action="store_true", help="skip tfmot's column")
    parser.add_argument("--seed", type=int, default=SEED, help=f"weights, data and steps (default {SEED})")
    opts = parser.parse_args(argv)
    tiny = opts.tiny
    known = list(families())
    names = [n for n in opts.names + opts.families.split(",") if n] or known
    unknown = [n for n in names if n not in known]
    if unknown:
        parser.error(f"unknown family {', '.join(unknown)}; pick from {', '.join(known)}")
    whole = names == known and not opts.no_tfmot and opts.seed == SEED
    lines = ["| family | keras_qx: fully integer; output error mean / max (steps) (nudge); file "
             "| built-in vs XNNPACK kernels, same file (steps) | worst own error (steps): max (mean) layer (op) "
             "| tfmot quantize_model |",
             "|---|---|---|---|---|"]
    for name in names:
        ours = run(name, "keras_qx", tiny, seed=opts.seed)
        theirs = ({"ok": False, "error": "not run (--no-tfmot)"} if opts.no_tfmot
                  else run(name, "tfmot", tiny, seed=opts.seed))
        lines.append(f"| {name} | {_cell(ours)} | {_kernels_cell(ours)} | {_own_cell(ours)} | {_cell(theirs)} |")
        print(lines[-1], file=sys.stderr, flush=True)
    lines += ["", f"Untrained models (weights=None) at small inputs{' (reduced variants: tests/families.py)' if tiny else ''}; "
                  f"seed {opts.seed}: Keras' random seed and TensorFlow's op determinism make every row repeatable. "
                  f"{CALIBRATION_STEPS} SGD steps on 16 random 0-255 images (N(0, 1) sequences for the transformer "
                  "block) with random labels set the activation ranges and BatchNorm statistics (one forward pass "
                  "leaves an untrained net ill-conditioned: zero-variance BatchNorm channels amplify 1-step rounding "
                  "differences ~100x). Output error: the TFLite file (XNNPACK, as export_tflite verifies it) vs the "
                  "Keras QAT model on those inputs, in output quantization steps, mean / max. 'nudge': the Keras "
                  "model's own mean output change when 0.5% of the input values move by one input step (how "
                  "strongly the untrained network amplifies a tiny difference). 'built-in vs XNNPACK': the same "
                  "file run by TFLite's built-in int8 kernels against its XNNPACK run (two integer implementations "
                  "of one file that round some requantizations differently by one step). 'worst own error': "
                  "qx.debug_tflite with the built-in kernels, each Keras layer fed the file's values of its "
                  "inputs; the layer with the largest max (rounded to a whole step, then the largest mean) own error, in steps of its own tensor.",
              f"Machine: {platform.platform()}, {os.cpu_count()} CPUs. Rerun: `python bench/coverage.py` "
              "(one row: `--families RegNet --no-tfmot`)"]
    text = "\n".join(lines)
    print(text)
    if whole:
        from keras_qx._io import write_atomic

        os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
        name = "coverage_tiny.md" if tiny else "coverage.md"
        write_atomic(os.path.join(HERE, "results", name), ("# Coverage\n\n" + text + "\n").encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
