"""Rewriting a model into layers tfmot can quantize, names and weights kept.

``flatten`` (nested models inlined, attention decomposed, fused activations split),
``tfop`` (raw TF calls as serializable layers) and ``scale_shift`` (standalone BatchNorm and
Normalization as the one integer op TFLite runs them as).

May import: the helpers (``_compat``, ``_io``, ``_plot``, ``_graph``, ``_seed``), ``keras_qx.quant`` and this folder.
"""
