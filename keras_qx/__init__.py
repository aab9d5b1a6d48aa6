"""keras_qx: mixed-precision quantization-aware training for tf_keras, exported to TFLite."""
from importlib.metadata import PackageNotFoundError, version as _version

from keras_qx import configs, quantizers, registry
from keras_qx.annotate import annotate
from keras_qx.policy import LayerSpec, Policy, PolicyError
from keras_qx.quantize import quantize
from keras_qx.saving import quantize_scope

try:
    __version__ = _version("keras_qx")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0"

__all__ = ["Policy", "LayerSpec", "PolicyError", "annotate", "quantize", "quantize_scope",
           "configs", "quantizers", "registry"]
