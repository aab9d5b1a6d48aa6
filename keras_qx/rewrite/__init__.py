"""Rewriting a model into layers tfmot can quantize, names and weights kept.

``flatten`` (nested models inlined, attention decomposed, fused activations split) and
``tfop`` (raw TF calls as serializable layers).

May import: the helpers (``_compat``, ``_io``, ``_plot``), ``keras_qx.quant`` and this folder.
"""
