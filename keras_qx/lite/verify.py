"""Verification: run the TFLite file and the Keras model on the same samples and compare.

Errors are measured in output quantization steps (the int8 output's scale), so one figure
means the same on every model.

Two judgements refuse a file (``check_agreement``; ``export_tflite`` raises :class:`ExportError`
and writes nothing):

* **Top-1 agreement** of a classifier output (softmax, logits, a segmentation map per pixel)
  on the positions where the Keras model is decisive, below ``min_agreement``.
* **The error itself**, for every output kind (classifier, binary probability or logit,
  regression, maps, each output of a multi-output model): a mean error above
  ``MAX_MEAN_STEPS`` (4) steps, or a 99th-percentile error above ``MAX_P99_STEPS`` (32) steps.
  The figures faithful files show, measured: the 16 application families of
  bench/results/coverage.md (untrained big nets, the hardest case) are at most 2.82 mean
  (RegNet) and 21 max (EfficientNetV2, ResNetRS) output steps off their QAT model; the 22 files
  of the gallery corpus (bench/results/gallery.md: small user models, text, maps, multi-output)
  at most 1.42 mean (MLP-Mixer) and 23 max (a small U-Net's per-pixel softmax), most under
  0.3 / 2. A broken file is an order of magnitude beyond: the Embedding -> LSTM file of issue 18
  was 94.65 mean / 191 max. 4 mean is 1.4x the worst faithful mean; 32 steps at p99 is 1.4x the
  worst faithful *max* and 1/8 of the int8 range. A max alone refuses nothing: one sample at the
  edge of a calibrated range can be amplified by a deep net, so the bar is on the p99.
* The step that errors are judged in is the file's output step, or 1/255 of the Keras
  output's observed range where that is coarser (an int16 or float32 output has a step far
  finer than its int8 grid would be, and a file is not broken for rounding like an int8 one):
  ``Verification.unit_steps``. For an int8 output the two agree, so the bars read as int8
  steps everywhere: 4 steps mean is 1.6% of the output's range, 32 steps 12.5%.

Example:
    >>> result = verify(qat, tflite_bytes, x[:256])          # doctest: +SKIP
    >>> result.mean_error_steps, result.agreement             # doctest: +SKIP
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from keras_qx.lite.convert import ExportError
from keras_qx._io import model_input_specs
from keras_qx._runtime import RuntimeCrash, run

__all__ = ["Verification", "verify", "judge", "combine", "check_agreement", "check_error", "MAX_TYPICAL_STEPS",
           "MAX_MEAN_STEPS", "MAX_P99_STEPS"]

MAX_TYPICAL_STEPS = 8.0  # the cap of the decisive bar: a typical error above this cannot excuse disagreement
MAX_MEAN_STEPS = 4.0  # refuse above: faithful files measured <= 2.82 mean (RegNet), gallery <= 1.42
MAX_P99_STEPS = 32.0  # refuse above: faithful files' *max* measured <= 21 (coverage), 23 (gallery U-Net)


@dataclass(frozen=True)
class Verification:
    """TFLite vs Keras on the verification samples, in output quantization steps.

    Top-1 agreement is taken along the last axis (per position: a segmentation map is judged
    per pixel) and only where the Keras model's margin between its top two classes exceeds
    ``2 * clip(typical error, 1, 8)`` steps, the typical error being the median over samples of
    each sample's largest error: two outputs moving apart by that much each can flip a smaller
    margin, so there the argmax says nothing about the file. The median keeps a few broken
    samples from raising the bar that would expose them; the cap of 8 steps keeps a file that is
    wrong everywhere from excusing itself.
    """

    agreement: float  # top-1 agreement on the decisive positions (1.0 if none is decisive)
    max_error_steps: float
    mean_error_steps: float
    samples: int
    classifier: bool  # a last axis wider than one unit: agreement is meaningful
    p99_error_steps: float = 0.0
    decisive: float = 0.0  # fraction of positions whose top-2 margin exceeds the bar (see above)
    disagreeing: tuple = ()  # sample indices with a decisive position that disagrees
    worst: tuple = ()  # sample indices with the largest errors, worst first
    output: str = ""  # the model output judged ("" for a single-output model)
    per_output: tuple = ()  # a multi-output model: one Verification per output; the fields above are the worst
    range_steps: float = 0.0  # the Keras output's observed range (max - min), in output steps
    unit_steps: float = 1.0  # the step errors are judged in, in output steps: max(1, range_steps / 255)

    def judged(self) -> tuple:
        """The per-output verifications (this one alone for a single-output model)."""
        return self.per_output or (self,)


def _margins(ref: np.ndarray) -> np.ndarray:
    top2 = np.sort(ref, axis=-1)[..., -2:]
    return top2[..., 1] - top2[..., 0]


def verify(model, tflite_bytes: bytes, x) -> Verification:
    """Compare ``model`` (Keras) with the TFLite file on samples ``x`` (an array, or one per
    input), output by output; the file runs in a child process, so a runtime abort becomes an
    :class:`ExportError` instead of ending the caller."""
    xs = list(x) if isinstance(x, (list, tuple)) else [x]
    try:  # by input name: the file does not keep the model's input order
        result = run(tflite_bytes, dict(zip([n for n, _, _ in model_input_specs(model)], xs)) if len(xs) > 1 else xs[0])
    except RuntimeCrash as err:
        raise ExportError(f"{err}. Nothing was written. Calibrate the QAT model first (qx.calibrate) or "
                          "train it, or keep the failing layer float by policy.") from None
    refs = model.predict(xs if len(xs) > 1 else xs[0], verbose=0, batch_size=256)
    refs = refs if isinstance(refs, list) else [refs]
    if len(refs) != len(result.outputs):
        raise ExportError(f"the TFLite file has {len(result.outputs)} outputs but the Keras model {len(refs)}.")
    names = [n[len("quant_"):] if n.startswith("quant_") else n for n in model.output_names]
    judged = []
    for name, ours, ref, step in zip(names, result.outputs, refs, result.output_steps):
        ref = np.asarray(ref).reshape(ours.shape)
        judged.append(replace(judge(ours, ref, step or float(np.ptp(ref) / 255 or 1.0)), output=name))
    return judged[0] if len(judged) == 1 else combine(judged)


def combine(results: list) -> Verification:
    """One verification for a multi-output model: the worst figure of each kind over its outputs."""
    return Verification(
        agreement=min(r.agreement for r in results),
        max_error_steps=max(r.max_error_steps for r in results),
        mean_error_steps=max(r.mean_error_steps for r in results),
        samples=results[0].samples,
        classifier=any(r.classifier for r in results),
        p99_error_steps=max(r.p99_error_steps for r in results),
        decisive=min(r.decisive for r in results),
        disagreeing=tuple(sorted({i for r in results for i in r.disagreeing}))[:10],
        worst=max(results, key=lambda r: r.max_error_steps).worst,
        per_output=tuple(results),
        range_steps=max(r.range_steps for r in results),
        unit_steps=max(r.unit_steps for r in results),
    )


def judge(ours: np.ndarray, ref: np.ndarray, step: float) -> Verification:
    """The comparison of :func:`verify` on outputs ``(n, ...)`` of the file and of Keras, with
    one output quantization step ``step``."""
    n = len(ours)
    err = np.abs(ours - ref) / step
    per_sample = err.reshape(n, -1).max(1)
    worst = tuple(int(i) for i in np.argsort(-per_sample, kind="stable")[:5] if per_sample[i] > 0)
    p99 = float(np.percentile(err, 99))
    span = float(np.ptp(ref)) / step if ref.size else 0.0
    ranges = dict(range_steps=span, unit_steps=max(1.0, span / 255))
    classifier = ours.ndim > 1 and ours.shape[-1] > 1
    if not classifier:
        return Verification(1.0, float(err.max()), float(err.mean()), n, False, p99, worst=worst, **ranges)
    bar = 2 * float(np.clip(np.median(per_sample), 1.0, MAX_TYPICAL_STEPS))
    decisive = _margins(ref) / step > bar
    agree = ours.argmax(-1) == ref.argmax(-1)
    wrong = decisive & ~agree
    disagreeing = tuple(int(i) for i in np.nonzero(wrong.reshape(n, -1).any(1))[0][:10])
    agreement = float(agree[decisive].mean()) if decisive.any() else 1.0
    return Verification(agreement, float(err.max()), float(err.mean()), n, True, p99,
                        float(decisive.mean()), disagreeing, worst, **ranges)


def check_agreement(verification: Verification, min_agreement: float, *, error: bool = True) -> None:
    """Raise :class:`ExportError` when a classifier output's top-1 agreement on the decisive
    positions is below ``min_agreement``, or (``error=True``) when any output's error is beyond
    what faithful files show (:func:`check_error`), naming the output of a multi-output model."""
    for result in verification.judged():
        _check_one(result, min_agreement, f"output {result.output!r} of " if verification.per_output else "")
    if error:
        check_error(verification)


def check_error(verification: Verification, max_mean_steps: float = MAX_MEAN_STEPS,
                max_p99_steps: float = MAX_P99_STEPS) -> None:
    """Raise :class:`ExportError` when an output's mean error exceeds ``max_mean_steps`` or its
    99th-percentile error ``max_p99_steps``, in units of ``Verification.unit_steps`` (see the
    module docstring for the figures behind the defaults); every output kind is judged."""
    for result in verification.judged():
        unit = result.unit_steps or 1.0
        mean, p99 = result.mean_error_steps / unit, result.p99_error_steps / unit
        if mean <= max_mean_steps and p99 <= max_p99_steps:
            continue
        where = f"output {result.output!r} of " if verification.per_output else ""
        kind = "mean" if mean > max_mean_steps else "p99"
        bar = max_mean_steps if kind == "mean" else max_p99_steps
        unit_said = "" if unit == 1.0 else f" (in units of {unit:.3g} output steps: 1/255 of the output's range)"
        raise ExportError(
            f"{where}the TFLite model is far from the Keras model: output error mean {mean:.2f} / p99 {p99:.1f} / "
            f"max {result.max_error_steps / unit:.0f} steps{unit_said} on {result.samples} samples, {kind} above the "
            f"{bar:g} steps faithful files stay under (worst measured: 2.82 mean, 23 max; worst samples "
            f"{list(result.worst)}). Nothing was written. Calibrate the QAT model on representative data "
            "(qx.calibrate) or train it longer, find the layer where they part with qx.debug_tflite, keep that "
            "layer float by policy ({'<layer>': {'quantize': False}}), or pass verify=False to keep it anyway."
        )


def _check_one(result: Verification, min_agreement: float, where: str) -> None:
    if result.classifier and result.agreement < min_agreement:
        raise ExportError(
            f"{where}the TFLite model disagrees with the Keras model: top-1 agreement {result.agreement:.1%} "
            f"< {min_agreement:.0%} where the Keras model's top-2 margin exceeds the measured error "
            f"({result.decisive:.0%} of positions, {result.samples} samples; disagreeing samples "
            f"{list(result.disagreeing)}; error mean {result.mean_error_steps:.1f} / p99 "
            f"{result.p99_error_steps:.1f} output steps). Nothing was written. Train the QAT model longer, "
            "check the representative data matches training data, find the layer where they part with "
            "qx.debug_tflite, or pass verify=False to keep it anyway."
        )
