"""The vocabulary of quantization, with no model surgery in it.

``quantizers`` (fake-quantizers), ``kinds`` (which layer types carry kernels and how the
exporter stores them; ``register_layer``'s state), ``configs`` (tfmot QuantizeConfigs),
``policy`` (bits per layer as plain data) and ``cost`` (the one cost model: bytes in the file).

May import: the helpers (``keras_qx._compat``, ``_io``, ``_plot``, ``_graph``, ``_seed``) and modules of this folder.
"""
