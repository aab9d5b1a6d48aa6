"""Export speed: TFLiteConverter.from_keras_model (a Keras SavedModel export that traces every
layer) vs keras_qx.lite.convert.converter_for (one traced tf.function), on the same QAT models, with
the same converter settings. Same flatbuffer content? (op list and kernel bytes compared.)

Run: python bench/export_speed.py
"""
from __future__ import annotations

import os
import platform
import sys
import time
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))


def convert(converter, x):
    import tensorflow as tf

    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = lambda: ([s[None]] for s in x)
    converter.inference_input_type = converter.inference_output_type = tf.int8
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data = converter.convert()
    return data, time.perf_counter() - start


def main() -> int:
    import numpy as np
    import tensorflow as tf

    import keras_qx as qx
    from keras_qx.data import digits_cnn
    from keras_qx.lite.convert import converter_for
    from keras_qx.lite.inspect import inspect_tflite
    from tests.families import build, calibrate

    models = {"digits CNN": digits_cnn, "MobileNetV2 (tiny)": lambda: build("MobileNetV2"),
              "EfficientNetV2 (tiny)": lambda: build("EfficientNetV2"), "ConvNeXt (tiny)": lambda: build("ConvNeXt")}
    lines = ["| model | layers | from_keras_model s | converter_for s | speed-up | same ops | same kernel bytes |",
             "|---|---|---|---|---|---|---|"]
    for name, make in models.items():
        model = make()
        x = np.random.default_rng(0).random((16, *model.input_shape[1:])).astype("float32")
        qat = qx.quantize(model)
        calibrate(qat, x, steps=2)
        old, t_old = convert(tf.lite.TFLiteConverter.from_keras_model(qat), x)
        new, t_new = convert(converter_for(qat), x)
        a, b = inspect_tflite(old), inspect_tflite(new)
        lines.append(f"| {name} | {len(qat.layers)} | {t_old:.1f} | {t_new:.1f} | {t_old / t_new:.1f}x | "
                     f"{'yes' if a.ops == b.ops else 'no'} | {'yes' if a.kernel_bytes == b.kernel_bytes else 'no'} |")
        print(lines[-1], file=sys.stderr, flush=True)
    lines += ["", f"Machine: {platform.platform()}, {os.cpu_count()} CPUs. Rerun: `python bench/export_speed.py`"]
    text = "\n".join(lines)
    print(text)
    from keras_qx._io import write_atomic

    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    write_atomic(os.path.join(HERE, "results", "export_speed.md"), ("# Export speed\n\n" + text + "\n").encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
