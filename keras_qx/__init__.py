"""keras_qx: mixed-precision quantization-aware training for tf_keras, exported to TFLite.

Example:
    >>> import keras_qx as qx
    >>> from keras_qx.data import digits_cnn, load_digits
    >>> (x, y), _ = load_digits()
    >>> qat = qx.quantize(digits_cnn(), {"rules": [{"type": "Dense", "weight_bits": 4}]})
    >>> qx.summary(qat, print_fn=None).startswith('Model: "digits_cnn"')
    True
"""
from importlib.metadata import PackageNotFoundError, version as _version

from keras_qx import configs, cost, quantizers, registry
from keras_qx.allocate import InfeasibleBudget, auto_policy
from keras_qx.annotate import annotate
from keras_qx.evaluate import evaluate_tflite
from keras_qx.export import ExportError, export_tflite
from keras_qx.policy import LayerSpec, Policy, PolicyError
from keras_qx.ptq import ptq
from keras_qx.pareto import ParetoResult, pareto
from keras_qx.quantize import quantize
from keras_qx.registry import register_layer
from keras_qx.sensitivity import SensitivityReport, sensitivity
from keras_qx.saving import load_model, quantize_scope
from keras_qx.summary import summary
from keras_qx.tflite import inspect_tflite

try:
    __version__ = _version("keras_qx")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0"

__all__ = [
    "Policy",
    "LayerSpec",
    "PolicyError",
    "ExportError",
    "annotate",
    "auto_policy",
    "InfeasibleBudget",
    "pareto",
    "ParetoResult",
    "sensitivity",
    "SensitivityReport",
    "quantize",
    "register_layer",
    "export_tflite",
    "evaluate_tflite",
    "ptq",
    "inspect_tflite",
    "summary",
    "quantize_scope",
    "load_model",
    "configs",
    "cost",
    "quantizers",
    "registry",
]
