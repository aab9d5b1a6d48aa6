"""Compression beside quantization: magnitude pruning (``prune``, ``pruning_callbacks``,
``strip_pruning``) on tfmot's sparsity API, with per-layer control in the policy's style, and
the sparsity measurements ``summary`` and the export report use.

May import: the helpers, ``keras_qx.quant``, ``keras_qx.rewrite`` and this folder (``qat`` sits
at the same tier; ``qat.quantize`` uses this folder's checks).
"""
