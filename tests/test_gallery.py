"""The gallery corpus (tests/gallery.py), each model the way a user takes it to a file: train the
float model briefly -> ``qx.quantize`` (default policy) -> ``qx.calibrate`` -> one QAT epoch ->
``qx.export_tflite`` (verified) -> the file run on the test split in the TFLite runtime.

What is asserted, and why these tolerances:
- the float model learnt its task (beats the majority class / the mean by a wide margin), else
  the comparison says nothing;
- accuracies: the file within ``ACC_POINTS`` (5 points) of the float model. The test splits hold
  256 samples (one sample is 0.4 points); the QAT epoch (at 0.3x the float learning rate) moves
  the model by a point or two either way, and int8 rounding flips only near-tied decisions. A
  broken file (e.g. the issue's Embedding->LSTM at 95 mean steps) loses tens of points;
- mse: the file keeps at least ``MSE_GAIN`` (90%) of the float model's improvement over
  predicting the mean: int8 outputs add about step^2/12 of error, far below that;
- the export's own check of the file against its QAT model: mean error at most ``MEAN_STEPS``
  and max at most ``MAX_STEPS`` output quantization steps. Faithful files measure 0-0.5 mean /
  2-5 max (bench/results/gallery.md, bench/coverage.py); the worst known faithful case (held-out
  EfficientNetV2B1, issue 18) is 3.5 / 12, a broken one 95 / 191.

Models whose file is exported and verified but measures over these tighter bounds are
``xfail(strict=False)`` with the figures seen (``bench/results/gallery.md``).
"""
from __future__ import annotations

import contextlib

import numpy as np
import pytest

from gallery import GALLERY, baseline, higher_is_better, predict, run_keras_qx, scores, take, train_float

ACC_POINTS = 0.05
MSE_GAIN = 0.9
MEAN_STEPS = 1.0
MAX_STEPS = 12
LEARNT_POINTS = 0.2  # accuracy above the majority class the float model must reach
LEARNT_MSE = 0.5  # fraction of the mean-predictor's mse the float model must stay under

# name -> the figures over the bounds above (the file is exported and verified); see the module docstring.
XFAIL: dict[str, str] = {
    "siamese": "file vs QAT model 1.06 mean / 4 max output steps, 1.20 / 9 in a rerun (> MEAN_STEPS) on the "
               "distance -> sigmoid head; the file scores 91.0-91.4% against the float model's 87.1-90.2% (2026-12-06)",
    "tabular": "file vs QAT model 1.02 mean / 9 max output steps (> MEAN_STEPS); the file scores 96.1%, float 95.7% "
               "(2026-12-06)",
    "unet_small": "file vs QAT model 0.45 mean / 23 max output steps (> MAX_STEPS) on the per-pixel softmax map "
                  "(2026-12-06)",
    "mlp_mixer": "file vs QAT model 2.29 mean / 14 max output steps (> MEAN_STEPS, > MAX_STEPS; 1.42 / 8 before "
                 "LayerNormalization was simulated as its int8 ops, b3b7be4); the file scores 89.5%, QAT 90.6%, "
                 "float 94.9% (2026-12-06)",
}

# name -> the keras_qx warnings the model meets on its way to the file, as regexes (the suite runs
# keras_qx warnings as errors: each is asserted, and a model meeting any other one fails).
_KEPT_FLOAT = r"keras_qx keeps these layers float, their outputs quantized .*{}.*recurrent layer's loop"
EXPECTED_WARNINGS: dict[str, list[str]] = {  # bilstm_text: both Bidirectional LSTMs are integer now
    # (export_tflite's int8_io=None gives float edges without a warning where a layer stays float)
    "gru_text": [_KEPT_FLOAT.format(r"'gru \(GRU\)'")],
    "vae_encoder": [r"keras_qx keeps custom layer 'sampling' \(Sampling\) whole and float"],
}


def _param(name):
    marks = [pytest.mark.slow]
    if name in XFAIL:
        marks.append(pytest.mark.xfail(strict=False, reason=XFAIL[name]))
    return pytest.param(name, marks=marks, id=name)


def test_corpus_size_and_shapes():
    """At least 20 models; each builder gives a built model whose outputs fit its targets."""
    assert len(GALLERY) >= 20
    for name, builder in GALLERY.items():
        task = builder()
        assert task.model.built, name
        outputs = predict(task.model, take(task.x_test, 2))
        targets = task.targets_test
        assert len(outputs) == len(targets) == len(task.metrics), name
        for out, y, kind in zip(outputs, targets, task.metrics):
            y = np.asarray(y)[:2]
            if kind == "accuracy":
                assert out.shape[:-1] == y.shape, (name, out.shape, y.shape)
            else:
                assert out.size == y.size, (name, out.shape, y.shape)


@pytest.mark.parametrize("name", [_param(n) for n in GALLERY])
def test_gallery_model_to_file(name):
    task = train_float(GALLERY[name]())
    float_scores = scores(task, predict(task.model, task.x_test))
    y_trains = task.y_train if isinstance(task.metric, (list, tuple)) else [task.y_train]
    for kind, value, y_tr, y_te in zip(task.metrics, float_scores, y_trains, task.targets_test):
        base = baseline(kind, y_tr, y_te)
        if higher_is_better(kind):
            assert value >= base + LEARNT_POINTS, f"the float model did not learn its task: {kind} {value:.3f} vs {base:.3f}"
        else:
            assert value <= LEARNT_MSE * base, f"the float model did not learn its task: mse {value:.4f} vs {base:.4f}"

    with contextlib.ExitStack() as expected:
        for pattern in EXPECTED_WARNINGS.get(name, ()):
            expected.enter_context(pytest.warns(UserWarning, match=pattern))
        result = run_keras_qx(task)

    report = result["report"]
    assert report.mean_error_steps <= MEAN_STEPS and report.max_error_steps <= MAX_STEPS, \
        f"file vs QAT model: {report.mean_error_steps:.2f} mean / {report.max_error_steps:.0f} max steps"
    for kind, f, q, y_tr, y_te in zip(task.metrics, result["float"], result["file"], y_trains, task.targets_test):
        if higher_is_better(kind):
            assert q >= f - ACC_POINTS, f"{kind}: float {f:.3f}, file {q:.3f} (QAT model {result['qat']})"
        else:
            base = baseline(kind, y_tr, y_te)
            assert base - q >= MSE_GAIN * (base - f), \
                f"mse: float {f:.4f}, file {q:.4f}, mean predictor {base:.4f} (QAT model {result['qat']})"
