"""The trials of ``qx.BitWidthTuner``: the keras-tuner ``Tuner`` it runs on, one trial's QAT run,
and what a trial leaves in its directory (the QAT weights and the policy, written atomically).

keras-tuner's default ``run_trial`` only takes Keras 3 models, so the trial here builds, trains
and scores the tf_keras QAT model itself; ``BitWidthTuner`` (engine/search.py) owns the set-up
and the results.
"""
from __future__ import annotations

import copy
import os
import time

from keras_qx._compat import keras
from keras_qx._seed import seeded
from keras_qx._compat import keras_tuner as _keras_tuner
from keras_qx._io import write_atomic
from keras_qx.qat.quantize import quantize
from keras_qx.quant.policy import Policy
from keras_qx.engine.search_space import assignment_cost, assignment_policy, digest

__all__ = ["WEIGHTS_FILE", "POLICY_FILE", "tuner_class", "run_trial", "save_trial", "load_trial_policy",
           "trial_seed", "trial_callbacks", "read_trials"]

WEIGHTS_FILE = "qat_weights.h5"  # legacy h5 (the ".weights.h5" suffix switches format)
POLICY_FILE = "policy.json"


# ---- the keras-tuner Tuner, made on first use (keras_tuner imports Keras 3) ---------------
_TUNER_CLASS = None


def tuner_class():
    """keras_tuner.Tuner whose trials call back into their BitWidthTuner (made on first use:
    keras_tuner imports Keras 3)."""
    global _TUNER_CLASS
    if _TUNER_CLASS is None:
        kt = _keras_tuner()

        class QXTuner(kt.Tuner):
            """keras_tuner.Tuner whose trials are tf_keras QAT runs (see BitWidthTuner)."""

            def __init__(self, owner, **kwargs):
                self._qx = owner
                super().__init__(**kwargs)

            def run_trial(self, trial, *args, **kwargs):
                return run_trial(self._qx, self, trial)

            def on_trial_end(self, trial):
                super().on_trial_end(trial)
                self._qx._report(self, trial)

            def load_model(self, trial):
                return self._qx._load_trial_model(trial)

        _TUNER_CLASS = QXTuner
    return _TUNER_CLASS


def run_trial(search, tuner, trial) -> dict:
    """One trial of ``search`` (a BitWidthTuner): build (hypermodel), check the budget, quantize,
    QAT, save the weights and the policy, and return the metrics keras-tuner records."""
    kt = _keras_tuner()
    fit = search._fit
    hp = trial.hyperparameters
    values = dict(hp.values)
    start = time.perf_counter()
    if search.hypermodel is not None:
        float_model = search._build(hp)
        if fit["float_epochs"]:
            if not getattr(float_model, "_is_compiled", False):
                float_model.compile(keras.optimizers.Adam(1e-3), fit["loss"], metrics=search._metrics())
            with trial_seed(search.seed, trial):
                float_model.fit(fit["x"], fit["y"], epochs=fit["float_epochs"], batch_size=fit["batch_size"],
                                verbose=0)
        units = search.space.units(float_model)
    else:
        keras.backend.clear_session()
        float_model, units = search.model, search.units
    size = assignment_cost(units, values)
    if search.budget_bytes is not None and size > search.budget_bytes:  # never train over budget
        raise kt.errors.FailedTrialError(f"assignment takes {size:,} {search.unit}, over the budget "
                                         f"{search.budget_bytes:,}; not trained.")
    us = search.predicted_us(values)
    if search.budget_us is not None and us > search.budget_us:  # nor over the latency budget
        raise kt.errors.FailedTrialError(f"assignment takes a predicted {us:,.1f} µs, over the latency budget "
                                         f"{search.budget_us:,.1f} µs; not trained.")
    policy = assignment_policy(units, values)
    qat_start = time.perf_counter()
    qat = quantize(float_model, policy)
    qat.compile(search.training.optimizer(), fit["loss"], metrics=search._metrics())
    epochs, initial = fit["epochs"], 0
    if "tuner/epochs" in values:  # Hyperband
        epochs, initial = int(values["tuner/epochs"]), int(values.get("tuner/initial_epoch", 0))
        if values.get("tuner/trial_id") is not None:
            qat.load_weights(os.path.join(tuner.get_trial_dir(values["tuner/trial_id"]), WEIGHTS_FILE))
    with trial_seed(search.seed, trial):
        history = qat.fit(fit["x"], fit["y"], epochs=epochs, initial_epoch=initial, batch_size=fit["batch_size"],
                          validation_data=fit["validation_data"], validation_split=fit["validation_split"],
                          callbacks=trial_callbacks(fit["callbacks"], trial), verbose=0, **fit["fit_kwargs"])
    qat_seconds = time.perf_counter() - qat_start  # quantize + compile + fit, as a plain user would
    logs = history.history
    if search.metric.name not in logs:
        raise kt.errors.FatalValueError(
            f"objective {search.metric.name!r} is not among the training logs {sorted(logs)}; pass metrics=... "
            "that produce it, or another objective.")
    metric = float(logs[search.metric.name][-1])
    save_trial(tuner.get_trial_dir(trial.trial_id), qat, policy)
    results = {search.metric.name: metric, "kernel_bytes": float(size), "qat_seconds": qat_seconds,
               "trial_seconds": time.perf_counter() - start}
    if us is not None:
        results["predicted_us"] = float(us)
    if search.penalty is not None:
        results["score"] = search.penalty.score(metric, size, search.reference_bytes)
    search._last = {"trial_id": trial.trial_id, "digest": digest(units, values), "bytes": size,
                  "metric": metric, "seconds": time.perf_counter() - start, "us": us}
    return results


def save_trial(trial_dir: str, qat, policy: Policy) -> None:
    """The trial's QAT weights and policy, each written to a temporary file and renamed."""
    tmp = os.path.join(trial_dir, f".tmp-{os.getpid()}-{WEIGHTS_FILE}")
    qat.save_weights(tmp)
    os.replace(tmp, os.path.join(trial_dir, WEIGHTS_FILE))
    write_atomic(os.path.join(trial_dir, POLICY_FILE), policy.to_json().encode())


def load_trial_policy(trial_dir: str) -> Policy | None:
    """The policy a trial saved, or None (a trial from before policies were saved)."""
    path = os.path.join(trial_dir, POLICY_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return Policy.from_json(f.read())


def trial_seed(seed, trial):
    """The trial's training seeded (``seed + trial id``); the caller's random state is kept."""
    return seeded(None if seed is None else int(seed) + int(trial.trial_id))

def trial_callbacks(callbacks, trial):
    """A deep copy of the search's callbacks for one trial, TensorBoard logging to ``trial_<id>``."""
    callbacks = copy.deepcopy(callbacks)
    for cb in callbacks:
        if isinstance(cb, keras.callbacks.TensorBoard) or type(cb).__name__ == "TensorBoard":
            cb.log_dir = os.path.join(str(cb.log_dir), f"trial_{trial.trial_id}")
    return callbacks


def read_trials(tuner) -> dict:
    """``{trial_id: Trial}``: the oracle's, or on a worker the shared trial files."""
    trials = getattr(tuner.oracle, "trials", None)
    if isinstance(trials, dict):
        return dict(trials)
    trial_module = _keras_tuner().engine.trial  # a worker: read the shared trial files

    out = {}
    for name in sorted(os.listdir(tuner.project_dir)):
        path = os.path.join(tuner.project_dir, name, "trial.json")
        if name.startswith("trial_") and os.path.exists(path):
            t = trial_module.Trial.load(path)
            out[t.trial_id] = t
    return out
