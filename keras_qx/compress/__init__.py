"""Compression beside quantization: magnitude pruning (``prune``, ``pruning_callbacks``,
``strip_pruning``) on tfmot's sparsity API and weight clustering (``cluster``,
``strip_clustering``, the centroid tables of ``quantize(..., preserve_clusters=True)``) on its
clustering API, with per-layer control in the policy's style, and the sparsity and
distinct-value measurements ``summary`` and the export report use.

May import: the helpers, ``keras_qx.quant``, ``keras_qx.rewrite`` and this folder (``qat`` sits
at the same tier; ``qat.quantize`` uses this folder's checks).
"""
