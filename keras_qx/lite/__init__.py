"""QAT or float model -> TFLite file, and what can be learnt from the file.

``convert`` (the converter set-up), ``verify`` (TFLite vs Keras), ``export`` (the front door
``export_tflite``), ``inspect`` (reading and running flatbuffers), ``ptq`` (post-training
modes) and ``evaluate`` (accuracy, size, latency).

May import: the helpers, ``keras_qx.quant``, ``keras_qx.rewrite``, ``keras_qx.qat`` and this folder.
"""
