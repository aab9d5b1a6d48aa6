"""Model -> QAT model: the front door ``quantize`` and what it needs.

``annotate`` (bits in a model definition), ``registry`` (the tfmot registry and scheme that
apply a policy), ``quantize``, ``calibrate`` (ranges from data) with ``gptq`` (GPTQ rounding of
the kernels), ``saving`` (``quantize_scope``, ``load_model``) and ``summary``.

May import: the helpers, ``keras_qx.quant``, ``keras_qx.rewrite`` and this folder.
"""
