"""``qx.ptq``: post-training quantization of a float model, no training needed.

Modes: ``"dynamic"`` (int8 weights, float activations), ``"int8"`` (fully integer, needs
representative data), ``"float16"`` (half-precision weights), ``"int16x8"`` (int16
activations, int8 weights; needs representative data).

Example:
    >>> tfl = qx.ptq(float_model, "int8", x_train[:300])      # doctest: +SKIP
"""
from __future__ import annotations

from keras_qx._compat import check_model, tf
from keras_qx._io import check_samples
from keras_qx.lite.convert import ExportError, convert, converter_for
from keras_qx.rewrite.keras3 import as_tf_keras

__all__ = ["ptq", "PTQ_MODES"]

PTQ_MODES = ("dynamic", "int8", "float16", "int16x8")


def ptq(model, mode: str, representative_data=None, int8_io: bool = False) -> bytes:
    """Convert a float tf_keras model to TFLite with a post-training quantization mode (a Keras 3
    model of standard layers is rebuilt as tf_keras first).

    Args:
        mode: one of :data:`PTQ_MODES`.
        representative_data: float samples (n, *input_shape); required for "int8"/"int16x8".
        int8_io: for "int8", int8 input/output tensors instead of float.
    """
    model = as_tf_keras(model)
    check_model(model)
    if mode not in PTQ_MODES:
        raise ValueError(f"unknown PTQ mode {mode!r}; use one of {PTQ_MODES}.")
    converter = converter_for(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if mode in ("int8", "int16x8"):
        if representative_data is None:
            raise ValueError(f"PTQ mode {mode!r} calibrates activation ranges: pass representative_data "
                             "(a few hundred training samples).")
        samples = check_samples(representative_data, model.input_shape[1:])[:500]
        converter.representative_dataset = lambda: ([s[None]] for s in samples)
        if mode == "int8":
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
            if int8_io:
                converter.inference_input_type = converter.inference_output_type = tf.int8
        else:
            converter.target_spec.supported_ops = [
                tf.lite.OpsSet.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8]
    elif mode == "float16":
        converter.target_spec.supported_types = [tf.float16]
    try:
        return convert(converter)[0]
    except ExportError as err:
        raise ExportError(f"({mode}) {err}") from err.__cause__
