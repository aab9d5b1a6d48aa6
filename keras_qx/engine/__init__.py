"""Choosing bits: ``sensitivity`` (per layer, per width), ``allocate`` (the exact allocation
under a budget; ``auto_policy``), ``pareto`` (the benchmark sweep: auto vs random vs uniform)
and ``search`` (KerasTuner over bit widths).

May import: every folder below it (``quant``, ``rewrite``, ``qat``, ``lite``), the helpers and
this folder. Nothing below imports the engine.
"""
