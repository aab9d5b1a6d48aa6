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

from keras_qx._deprecation import deprecated_alias as _deprecated_alias
from keras_qx._runtime import RuntimeCrash
from keras_qx.compress.cluster import cluster, strip_clustering
from keras_qx.compress.prune import prune, pruning_callbacks, strip_pruning
from keras_qx.engine.allocate import InfeasibleBudget, auto_policy
from keras_qx.engine.latency import (LatencyPrediction, LatencyTable, export_latency_files, latency_table,
                                     predict_latency)
from keras_qx.engine.pareto import ParetoResult, pareto
from keras_qx.engine.search import BitWidthTuner
from keras_qx.engine.sensitivity import SensitivityReport, sensitivity
from keras_qx.lite.compare import Comparison, compare
from keras_qx.lite.evaluate import Evaluation, evaluate_tflite
from keras_qx.lite.export import ExportError, ExportReport, LengthError, TFLiteModel, export_tflite
from keras_qx.lite.fidelity import LayerComparison, LayerError, debug_tflite
from keras_qx.lite.inspect import TFLiteInfo, inspect_tflite
from keras_qx.lite.profile import Profile, profile_tflite
from keras_qx.lite.ptq import ptq
from keras_qx.qat import registry
from keras_qx.qat.annotate import annotate
from keras_qx.qat.calibrate import calibrate, uncalibrated_ranges
from keras_qx.qat.quantize import quantize
from keras_qx.qat.saving import load_model, quantize_scope
from keras_qx.qat.summary import predict_gzip_bytes, summary
from keras_qx.quant import configs, cost, quantizers
from keras_qx.quant.cost import GzipPrediction
from keras_qx.quant.kinds import register_layer
from keras_qx.quant.policy import LayerSpec, Policy, PolicyError
from keras_qx.rewrite.keras3 import Keras3Error

compare_layers = _deprecated_alias(debug_tflite, "compare_layers")  # renamed in 0.1.0

try:
    __version__ = _version("keras_qx")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0"

__all__ = [
    # the policy
    "Policy", "LayerSpec", "annotate", "register_layer",
    # choosing bits
    "sensitivity", "SensitivityReport", "auto_policy", "BitWidthTuner", "pareto", "ParetoResult",
    "latency_table", "LatencyTable", "predict_latency", "LatencyPrediction", "export_latency_files",
    # QAT
    "quantize", "calibrate", "uncalibrated_ranges", "summary", "predict_gzip_bytes", "GzipPrediction",
    "quantize_scope", "load_model",
    # pruning and clustering
    "prune", "pruning_callbacks", "strip_pruning", "cluster", "strip_clustering",
    # the file
    "export_tflite", "ptq", "TFLiteModel", "ExportReport", "inspect_tflite", "TFLiteInfo", "evaluate_tflite",
    "Evaluation", "compare", "Comparison", "debug_tflite", "LayerComparison", "LayerError", "profile_tflite", "Profile",
    # errors (each subclasses the builtin you would catch)
    "PolicyError", "InfeasibleBudget", "ExportError", "LengthError", "RuntimeCrash", "Keras3Error",
    # modules
    "configs", "cost", "quantizers", "registry",
    # deprecated names (removed in 0.2.0)
    "compare_layers",
]
