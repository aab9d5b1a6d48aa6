"""QAT or float model -> TFLite file, and what can be learnt from the file.

``convert`` (the converter set-up), ``verify`` (TFLite vs Keras), ``export`` (the front door
``export_tflite``), ``inspect`` (reading and running flatbuffers), ``ptq`` (post-training
modes), ``evaluate`` (accuracy, size, latency), ``fidelity`` (``debug_tflite``: where a
file and its QAT model part, layer by layer), ``profile`` (``profile_tflite``: the time of each
op, per layer) and ``int2`` (2-bit FULLY_CONNECTED filters rewritten as INT2 after conversion).

May import: the helpers, ``keras_qx.quant``, ``keras_qx.rewrite``, ``keras_qx.qat`` and this folder.
"""
