"""The one place keras_qx imports TensorFlow, tf_keras, tfmot and keras_tuner.

tfmot only works with Keras 2 (``tf_keras``); TF 2.16+ ships Keras 3 as
``tf.keras``. Everything in keras_qx imports Keras from here so that a Keras 3
object can never slip in unnoticed.
"""
from __future__ import annotations

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # tfmot sets it too; be explicit.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402
import tf_keras as keras  # noqa: E402
import tensorflow_model_optimization as tfmot  # noqa: E402
from tensorflow_model_optimization.python.core.quantization.keras import (  # noqa: E402
    quant_ops,
    quantize_annotate,
    quantize_config as tfmot_quantize_config,
    quantize_layer,
    quantize_registry as tfmot_quantize_registry,
    quantize_scheme as tfmot_quantize_scheme,
    quantize_wrapper,
    quantizers as tfmot_quantizers,
)
from tensorflow_model_optimization.python.core.quantization.keras.default_8bit import (  # noqa: E402
    default_8bit_quantize_configs,
    default_8bit_quantize_layout_transform,
    default_8bit_quantize_registry,
    default_8bit_transforms,
)
from tensorflow_model_optimization.python.core.quantization.keras.graph_transformations import (  # noqa: E402
    model_transformer,
)

__all__ = [
    "tf",
    "keras",
    "tfmot",
    "quant_ops",
    "quantize_annotate",
    "tfmot_quantize_config",
    "quantize_layer",
    "tfmot_quantize_registry",
    "tfmot_quantize_scheme",
    "quantize_wrapper",
    "tfmot_quantizers",
    "default_8bit_quantize_configs",
    "default_8bit_quantize_layout_transform",
    "default_8bit_quantize_registry",
    "default_8bit_transforms",
    "model_transformer",
    "keras_tuner",
    "check_model",
]

PACKAGE = "keras_qx"


def keras_tuner():
    """Import keras_tuner lazily: it imports Keras 3 and costs seconds."""
    import keras_tuner as kt

    return kt


def check_model(model, what: str = "model") -> None:
    """Raise a clear error unless ``model`` is a built tf_keras Sequential/Functional model."""
    if isinstance(model, keras.Model):
        if not isinstance(model, keras.Sequential) and not getattr(model, "_is_graph_network", False):
            raise TypeError(
                f"{what} {model.name!r} is a subclassed tf_keras model ({type(model).__name__}); "
                "keras_qx (like tfmot) needs a Sequential or Functional model. Rebuild it with "
                "keras.Sequential([...]) or keras.Model(inputs, outputs)."
            )
        if not model.built:
            raise ValueError(
                f"{what} {model.name!r} is not built; call model.build(input_shape) or give the "
                "first layer an input_shape before quantizing."
            )
        return
    module = type(model).__module__ or ""
    if module.startswith("keras") or (hasattr(model, "layers") and hasattr(model, "predict")):
        raise TypeError(
            f"{what} is a {module}.{type(model).__name__} (Keras 3), but tfmot and keras_qx need "
            "Keras 2 models. Build the model with `import tf_keras as keras` (not `tf.keras` or "
            "`import keras`)."
        )
    raise TypeError(f"{what} must be a tf_keras Model, got {type(model).__name__}.")
