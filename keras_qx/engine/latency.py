"""A measured, per-layer latency model: what each layer costs in time on this machine's runtime.

(Interface first; the measurement lands with issue 20.)

``latency_table(model, candidates)`` gives ``{layer: {bits: microseconds}}`` for every quantizable
layer and the time of everything else (``base_us``); the engine (``auto_policy``, the search, the
Pareto sweep) adds a layer's time at its width the way it adds its bytes.
"""
from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["LatencyTable", "latency_table"]


@dataclass
class LatencyTable:
    """Per-layer time on one runtime: ``layers[name][bits]`` in microseconds (bits as the
    policy gives them: 2/4/8; ``None`` for the layer kept float) and ``base_us``, the time of the
    ops no quantizable layer owns (pooling, adds, softmax, quantize edges) in the int8 file."""

    base_us: float
    layers: dict = field(default_factory=dict)
    num_threads: int = 1
    runtime: str = ""  # e.g. "ai-edge-litert 2.3.0, xnnpack, <cpu>"

    def total_us(self, bits: dict) -> float:
        """Predicted microseconds of the file whose layers have ``bits`` ({layer: bits})."""
        return self.base_us + sum(self.layers[name][b] for name, b in bits.items() if name in self.layers)


def latency_table(model, candidates=(2, 4, 8), *, num_threads: int = 1, cache=None, verbose: int = 0) -> LatencyTable:
    """The :class:`LatencyTable` of ``model``'s quantizable layers at ``candidates``."""
    raise NotImplementedError("latency_table lands with issue 20")
