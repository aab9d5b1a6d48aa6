"""Coverage: one variant of every tf_keras.applications family, quantized by keras_qx and by
tfmot's quantize_model, exported to int8 TFLite; fully integer? agreement with Keras? size.

Run: python bench/coverage.py [FAMILY ...]   (all 16 take tens of minutes on 2 cores)
     python bench/coverage.py --tiny           (the reduced variants the tests use)
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
    }


def _one(family: str, tool: str, tiny: bool, queue) -> None:
    """Run :func:`_measure` and hand the row over before TensorFlow's teardown (which can
    abort the process and lose a queued result)."""
    queue.put(_measure(family, tool, tiny))
    queue.close()
    queue.join_thread()
    os._exit(0)


def _measure(family: str, tool: str, tiny: bool = False) -> dict:
    """Build, quantize (keras_qx or tfmot), calibrate with a few steps, export, verify."""
    import numpy as np

    import keras_qx as qx
    from keras_qx._compat import tfmot
    from keras_qx.lite.inspect import TFLiteRunner
    from tests.families import build, calibrate

    start = time.perf_counter()
    try:
        model = build(family) if tiny else families()[family]()
        x = 255 * np.random.default_rng(0).random((16, *model.input_shape[1:])).astype("float32")
        qat = qx.quantize(model) if tool == "keras_qx" else tfmot.quantization.keras.quantize_model(model)
        calibrate(qat, x, steps=CALIBRATION_STEPS)
        tfl = qx.export_tflite(qat, x, min_agreement=0.0)
        r = tfl.report
        # The Keras model's own conditioning: how far its output moves (in the same output steps)
        # when 0.5% of the input pixels change by one grey level.
        nudged = x.copy()
        mask = np.random.default_rng(2).random(x.shape) < 0.005
        nudged[mask] = np.where(nudged[mask] < 254, nudged[mask] + 1, nudged[mask] - 1)
        step = TFLiteRunner(bytes(tfl)).output_step
        self_noise = float(np.abs(qat.predict(nudged, verbose=0) - qat.predict(x, verbose=0)).mean() / step)
        return ({"ok": True, "fully_integer": r.info.fully_integer, "float_ops": sorted(set(r.info.float_ops)),
                   "mean_steps": r.mean_error_steps, "max_steps": r.max_error_steps, "self_noise": self_noise,
                   "bytes": len(tfl), "seconds": time.perf_counter() - start})
    except Exception as err:  # report any failure as a row
        return ({"ok": False, "error": f"{type(err).__name__}: {str(err).splitlines()[0][:120]}",
                   "seconds": time.perf_counter() - start})


def run(family: str, tool: str, tiny: bool = False, timeout: int = 900) -> dict:
    """Each run in a fresh process: memory and Keras name state do not leak between models."""
    queue = mp.get_context("spawn").Queue()
    proc = mp.get_context("spawn").Process(target=_one, args=(family, tool, tiny, queue))
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


def main(argv=None) -> int:
    args = list(argv if argv is not None else sys.argv[1:])
    tiny = "--tiny" in args
    names = [a for a in args if a != "--tiny"] or list(families())
    lines = ["| family | keras_qx: fully integer; output error mean / max (steps) (nudge); file | tfmot quantize_model |",
             "|---|---|---|"]
    for name in names:
        ours, theirs = run(name, "keras_qx", tiny), run(name, "tfmot", tiny)
        lines.append(f"| {name} | {_cell(ours)} | {_cell(theirs)} |")
        print(lines[-1], file=sys.stderr, flush=True)
    lines += ["", f"Untrained models (weights=None) at small inputs{' (reduced variants: tests/families.py)' if tiny else ''}; "
                  f"{CALIBRATION_STEPS} SGD steps on 16 random 0-255 images with random labels set the activation "
                  "ranges and BatchNorm statistics (one forward pass leaves an untrained net ill-conditioned: "
                  "zero-variance BatchNorm channels amplify 1-step rounding differences ~100x); the error is "
                  "TFLite vs the Keras QAT model on those images, in output quantization steps, mean / max; "
                  "'nudge' is the Keras model's own mean output change when 0.5% of the input pixels move by one "
                  "grey level (how strongly the untrained network amplifies a tiny difference).",
              f"Machine: {platform.platform()}, {os.cpu_count()} CPUs. Rerun: `python bench/coverage.py`"]
    text = "\n".join(lines)
    print(text)
    if argv is None and not sys.argv[1:] or args == ["--tiny"]:
        from keras_qx._io import write_atomic

        os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
        name = "coverage_tiny.md" if tiny else "coverage.md"
        write_atomic(os.path.join(HERE, "results", name), ("# Coverage\n\n" + text + "\n").encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
