"""keras_qx: mixed-precision quantization-aware training for tf_keras, exported to TFLite.

The package follows the data path: ``rewrite/`` (make a model quantizable) -> ``quant/`` (the
vocabulary: quantizers, configs, layer kinds, the policy, the cost model) -> ``qat/`` (model ->
QAT model; ``compress/`` prunes beside it) -> ``lite/`` (TFLite export, inspection, evaluation, post-training modes), with
``engine/`` (sensitivity, allocation, sweeps) choosing bits beside it. This module only
gathers the public API.

Example:
    >>> import keras_qx as qx
    >>> from keras_qx.data import digits_cnn, load_digits
    >>> (x, y), _ = load_digits()
    >>> qat = qx.quantize(digits_cnn(), {"rules": [{"type": "Dense", "weight_bits": 4}]})
    >>> qx.summary(qat, print_fn=None).startswith('Model: "digits_cnn"')
    True
"""
from importlib.metadata import PackageNotFoundError, version as _version

from keras_qx.compress.cluster import cluster, strip_clustering
from keras_qx.compress.prune import prune, pruning_callbacks, strip_pruning
from keras_qx.engine.allocate import InfeasibleBudget, auto_policy
from keras_qx.engine.search import BitWidthTuner
from keras_qx.engine.sensitivity import SensitivityReport, sensitivity
from keras_qx.lite.compare import Comparison, compare
from keras_qx.lite.evaluate import evaluate_tflite
from keras_qx.lite.export import ExportError, export_tflite
from keras_qx.lite.fidelity import compare_layers
from keras_qx.lite.inspect import inspect_tflite
from keras_qx.lite.ptq import ptq
from keras_qx.qat import registry
from keras_qx.qat.annotate import annotate
from keras_qx.qat.calibrate import calibrate, uncalibrated_ranges
from keras_qx.qat.quantize import quantize
from keras_qx.qat.saving import load_model, quantize_scope
from keras_qx.qat.summary import predict_gzip_bytes, summary
from keras_qx.quant import configs, cost, quantizers
from keras_qx.quant.kinds import register_layer
from keras_qx.quant.policy import LayerSpec, Policy, PolicyError

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
    "BitWidthTuner",
    "sensitivity",
    "SensitivityReport",
    "quantize",
    "calibrate",
    "uncalibrated_ranges",
    "register_layer",
    "export_tflite",
    "compare_layers",
    "evaluate_tflite",
    "compare",
    "Comparison",
    "ptq",
    "prune",
    "pruning_callbacks",
    "strip_pruning",
    "cluster",
    "strip_clustering",
    "inspect_tflite",
    "summary",
    "predict_gzip_bytes",
    "quantize_scope",
    "load_model",
    "configs",
    "cost",
    "quantizers",
    "registry",
]
