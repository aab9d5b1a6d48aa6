"""Verification: run the TFLite file and the Keras model on the same samples and compare.

Errors are measured in output quantization steps (the int8 output's scale), so one figure
means the same on every model.

Example:
    >>> result = verify(qat, tflite_bytes, x[:256])          # doctest: +SKIP
    >>> result.mean_error_steps, result.agreement             # doctest: +SKIP
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from keras_qx.lite.convert import ExportError
from keras_qx._runtime import RuntimeCrash, run

__all__ = ["Verification", "verify", "check_agreement"]


@dataclass(frozen=True)
class Verification:
    agreement: float  # top-1 agreement of argmax over the flattened output
    max_error_steps: float
    mean_error_steps: float
    samples: int
    classifier: bool  # more than one output unit: agreement is meaningful


def verify(model, tflite_bytes: bytes, x) -> Verification:
    """Compare ``model`` (Keras) with the TFLite file on samples ``x``; the file runs in a child
    process, so a runtime abort becomes an :class:`ExportError` instead of ending the caller."""
    try:
        result = run(tflite_bytes, x)
    except RuntimeCrash as err:
        raise ExportError(f"{err}. Nothing was written. Train or calibrate the QAT model first (its "
                          "activation ranges are still tfmot's initial ones if it never trained), or "
                          "keep the failing layer float by policy.") from None
    ours = result.outputs
    ref = model.predict(x, verbose=0, batch_size=256)
    step = result.output_step or float(np.ptp(ref) / 255 or 1.0)
    err = np.abs(ours - ref.reshape(ours.shape)) / step
    flat_ours, flat_ref = ours.reshape(len(x), -1), ref.reshape(len(x), -1)
    agreement = float((flat_ours.argmax(1) == flat_ref.argmax(1)).mean())
    return Verification(agreement, float(err.max()), float(err.mean()), len(x), flat_ref.shape[1] > 1)


def check_agreement(result: Verification, min_agreement: float) -> None:
    """Raise :class:`ExportError` when a classifier's top-1 agreement is below ``min_agreement``."""
    if result.classifier and result.agreement < min_agreement:
        raise ExportError(
            f"the TFLite model disagrees with the Keras model: top-1 agreement {result.agreement:.1%} "
            f"< {min_agreement:.0%} on {result.samples} samples (mean error {result.mean_error_steps:.1f} "
            "output steps). Nothing was written. Train the QAT model longer, check the "
            "representative data matches training data, or pass verify=False to keep it anyway."
        )
