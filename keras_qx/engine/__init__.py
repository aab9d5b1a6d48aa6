"""Choosing bits: ``sensitivity`` (per layer, per width), ``allocate`` (the exact allocation
under a budget; ``auto_policy``), ``pareto`` (the benchmark sweep: auto vs random vs uniform)
and the KerasTuner search over bit widths: ``search`` (``BitWidthTuner``), ``search_space``
(what it chooses from, the soft size objective) and ``oracles`` (keras-tuner's oracles under a
hard budget).

May import: every folder below it (``quant``, ``rewrite``, ``qat``, ``lite``), the helpers and
this folder. Nothing below imports the engine.
"""
