"""``qx.BitWidthTuner``: a KerasTuner search over per-layer weight bits, under a size budget.

Each trial quantizes the model with one bit width per layer (or per group of layers), runs
quantization-aware training and scores the result. The search runs on keras-tuner's own
machinery: its oracles (``"bayesian"``, ``"random"``, ``"hyperband"`` or any
``keras_tuner.Oracle``), its trial storage (``directory/project_name/trial_*``), its resume
and its distributed chief/worker mode. keras-tuner's default ``run_trial`` only takes
Keras 3 models, so the tuner here builds, trains and scores the tf_keras QAT model itself.

* **Hard budget.** With ``budget``, an assignment whose kernel bytes (the shared cost
  model, :func:`keras_qx.quant.cost.kernel_bytes`) exceed the budget is never trained and does not
  use up ``max_trials``: the oracle's proposal is checked before the trial is created; an
  over-budget proposal is redrawn (a random oracle, up to 8 times), then repaired (random
  groups moved one candidate cheaper until it fits; a repaired point that was already tried
  is replaced by a random within-budget one). Rejections are counted in ``tuner.stats``.
* **Latency budget.** ``budget="2ms"`` (or ``["0.6x", "2ms"]``, both caps) bounds the
  predicted time of the file, ``base_us`` plus each layer's time at its width in a
  :class:`~keras_qx.engine.latency.LatencyTable` (``latency=``, or measured once by
  ``latency_table``); the same rule holds: an assignment over it is never trained.
  ``tuner.stats["rejected_latency"]`` counts the proposals the latency cap rejected.
* **Warm start.** The first trial is ``qx.auto_policy``'s allocation at the same budget, so
  the search can only improve on the engine.
* **Soft objective** (``size_penalty``, AutoQKeras's "forgiving factor"): the score is

      score = metric * (1 + delta),
      delta = d * ln(reference_bytes / kernel_bytes) / ln(rate),
      d = delta_p / 100 if kernel_bytes < reference_bytes else delta_n / 100

  with ``reference_bytes`` the uniform-int8 kernel bytes: each halving of the kernels
  (``rate=2``) is worth ``delta_p`` percent of the metric.

Example:
    >>> tuner = qx.BitWidthTuner(model, budget="0.6x", max_trials=10, directory="search")  # doctest: +SKIP
    >>> tuner.search(x, y, validation_data=(xv, yv), epochs=2)                          # doctest: +SKIP
    >>> policy = tuner.get_best_policies()[0]; qat = tuner.get_best_models()[0]         # doctest: +SKIP
"""
from __future__ import annotations

import copy
import json
import math
import os
import random
import time
from typing import Callable

from keras_qx._compat import keras
from keras_qx._graph import check_model
from keras_qx.rewrite.keras3 import as_tf_keras
from keras_qx._compat import keras_tuner as _keras_tuner
from keras_qx._io import check_inputs, count_samples, head_samples, is_stream, model_input_specs
from keras_qx._deprecation import check_verbose, say, warn_renamed
from keras_qx.engine.allocate import (InfeasibleBudget, auto_policy, budget_from, check_latency_table, join_budget,
                                      legacy_budget, measured_latency, split_budget)
from keras_qx.engine.sensitivity import check_targets, infer_loss, quantizable_layers
from keras_qx.qat.quantize import quantize
from keras_qx.quant.cost import SIZE_UNITS, check_size, layer_size, total_size
from keras_qx.quant.policy import Policy
from keras_qx.engine.oracles import POOL_LIMIT, REDRAWS, BudgetGuard, bits_bayesian_class, budgeted, fresh_stats
from keras_qx.engine.search_space import (FLOAT, HP_PREFIX, SearchSpace, SizePenalty, TrainOptions, assignment_cost,
                                          assignment_latency, assignment_policy, digest, is_worker, make_objective,
                                          with_latency)
from keras_qx.engine.search_results import format_results, trial_row
from keras_qx.engine.trials import WEIGHTS_FILE, load_trial_policy, read_trials, tuner_class

__all__ = ["BitWidthTuner", "SearchSpace", "TrainOptions", "SizePenalty", "FLOAT", "format_results"]

ORACLES = ("bayesian", "random", "hyperband")


# ---- the public class ---------------------------------------------------------------------
class BitWidthTuner:
    """Search per-layer weight bits (and, with ``hypermodel``, model hyperparameters) with
    QAT trials on keras-tuner's oracles, under a hard kernel-byte budget or a soft size score.

    Args:
        model: a trained float tf_keras Sequential/Functional model, or a Keras 3 one of
            standard layers (rebuilt as tf_keras, as ``qx.quantize`` does); or give ``hypermodel``.
        hypermodel: ``build(hp) -> float tf_keras (or Keras 3) model``; each trial builds, trains float
            ``float_epochs`` (compiled by ``build`` or with Adam 1e-3), then quantizes.
        candidates: weight bit widths to choose from per layer/group.
        budget: keras_qx's one budget syntax: bytes (an int), ``"0.6x"`` of the uniform-int8
            kernel bytes (with ``hypermodel``: of the model built with default hyperparameters),
            or ``"4.5bits"`` on average; or a predicted latency (``"2ms"``, ``"500us"``), or a
            list of one size and one latency budget (``["0.6x", "2ms"]``; model mode).
        latency: the :class:`~keras_qx.engine.latency.LatencyTable` a latency budget is planned
            against; None measures one (``latency_table(model, candidates)``) when the budget
            has a latency part. Given without a latency budget, trials still show their
            predicted time.
        size: what the budget and the size penalty count: ``"kernel"`` (kernel bytes as
            stored) or ``"gzip"`` (their predicted gzip'd bytes, what a download costs).
        objective: metric name (``"val_accuracy"``) or a ``keras_tuner.Objective``.
        oracle: ``"bayesian"``, ``"random"``, ``"hyperband"`` or a ``keras_tuner.Oracle``
            (its own ``max_trials`` then counts).
        max_trials: trained trials (over-budget proposals are not counted).
        directory, project_name, overwrite: keras-tuner's trial storage; an existing project
            is resumed unless ``overwrite``.
        seed: oracle seed (default 0, as everywhere in keras_qx); also seeds each trial's
            weights (``seed + trial number``).
        groups, allow_float: see :class:`SearchSpace`.
        size_penalty: None, a percentage, a dict or :class:`SizePenalty`: the objective
            becomes ``score`` (module docstring); needs an objective to maximise.
        warm_start: make the first trial ``auto_policy``'s allocation at the budget (model
            mode with a budget; a hypermodel has no trained float model to analyse).
        qat_lr: Adam learning rate, or a factory returning an optimizer; loss: None infers
            it from the model/labels; metrics: None compiles the objective's metric.
        verbose: 0 silent, 1 or 2 one line per trial.
        budget_bytes, print_fn: deprecated names of ``budget`` and ``verbose``.
    """

    def __init__(self, model=None, *, hypermodel=None, candidates=(2, 4, 8), budget=None,
                 objective="val_accuracy", oracle="bayesian", max_trials: int = 10, directory=None,
                 project_name: str = "bitwidth_search", overwrite: bool = False, seed: int | None = 0,
                 groups=None, allow_float=(), size_penalty=None, warm_start: bool = True,
                 qat_lr: float | Callable = 1e-4, loss=None, metrics=None, verbose: int = 1, size: str = "kernel",
                 latency=None, budget_bytes=None, print_fn=None):
        budget = legacy_budget("BitWidthTuner()", budget, budget_bytes)
        size_budget, self.budget_us = (None, None) if budget is None else split_budget(budget)
        check_latency_table(latency, "BitWidthTuner()")
        if print_fn is not None:
            warn_renamed("BitWidthTuner()", "print_fn=", "verbose=")
        self.verbose = check_verbose(verbose, "BitWidthTuner()")
        self.size = check_size(size)
        self.unit = SIZE_UNITS[self.size]
        kt = _keras_tuner()
        if (model is None) == (hypermodel is None):
            raise ValueError("give exactly one of model (a trained float model) or hypermodel (build(hp) -> model).")
        if model is not None:
            model = as_tf_keras(model)  # a Keras 3 model of standard layers is rebuilt (and checked)
            check_model(model, "BitWidthTuner model")
        if hypermodel is not None and (self.budget_us is not None or latency is not None):
            raise ValueError("a latency budget (or latency=) needs model=...: each hypermodel build is another model, "
                             "with its own latency table; search a hypermodel under a size budget.")
        if hypermodel is not None:
            if hasattr(hypermodel, "build") and callable(hypermodel.build):
                hypermodel = hypermodel.build
            if not callable(hypermodel):
                raise TypeError(f"hypermodel must be a function build(hp) -> tf_keras model, got {hypermodel!r}.")
        if isinstance(max_trials, bool) or not isinstance(max_trials, int) or max_trials < 1:
            raise ValueError(f"max_trials must be a positive integer, got {max_trials!r}.")
        if not isinstance(project_name, str) or not project_name:
            raise ValueError(f"project_name must be a non-empty string, got {project_name!r}.")
        if isinstance(qat_lr, bool) or not (callable(qat_lr) or (isinstance(qat_lr, (int, float)) and qat_lr > 0)):
            raise ValueError(f"qat_lr must be a positive learning rate or a factory returning an optimizer, got {qat_lr!r}.")
        self.space = SearchSpace(tuple(candidates) if isinstance(candidates, list) else candidates,
                                 tuple(groups or ()), allow_float, self.size)
        self.training = TrainOptions(qat_lr, loss, metrics, bool(warm_start), seed)
        self.metric = make_objective(objective, kt)  # what trials measure
        self.penalty = SizePenalty.coerce(size_penalty)
        if self.penalty is not None and self.metric.direction != "max":
            raise ValueError(f"size_penalty scales a metric to maximise; objective {self.metric.name!r} is "
                             "minimised. Use e.g. objective='val_accuracy', or drop size_penalty.")
        # what the oracle ranks: the metric, or the size-penalised score
        self.objective = kt.Objective("score", "max") if self.penalty is not None else self.metric
        if isinstance(oracle, str):
            if oracle not in ORACLES:
                raise ValueError(f"oracle {oracle!r} is unknown; use one of {ORACLES} or a keras_tuner.Oracle instance.")
        elif isinstance(oracle, type):
            raise TypeError(f"oracle must be an instance (e.g. {oracle.__name__}(...)), not the class.")
        elif not isinstance(oracle, kt.Oracle):
            raise TypeError(f"oracle must be one of {ORACLES} or a keras_tuner.Oracle, got {type(oracle).__name__}.")
        elif getattr(oracle.objective, "name", None) != self.objective.name:
            raise ValueError(f"the oracle's objective {getattr(oracle.objective, 'name', None)!r} differs from the "
                             f"search's {self.objective.name!r}; create the oracle with "
                             f"objective=keras_tuner.Objective({self.objective.name!r}, {self.objective.direction!r}).")
        self.model, self.hypermodel = model, hypermodel
        self.oracle_spec, self.max_trials, self.seed = oracle, max_trials, seed
        self.directory = str(directory) if directory is not None else "."
        self.project_name, self.overwrite = project_name, bool(overwrite)
        self.print_fn = say(self.verbose, print_fn)
        self._tuner = None
        self._fit = {}  # search() arguments, for run_trial
        self._units_cache = {}
        self._pool_cache = None
        self._elapsed0 = None
        self._last = None

        reference = self.model if model is not None else self._build_default()
        self.int8_bytes = total_size(quantizable_layers(reference), 8, self.size)
        self.budget_bytes = None if size_budget is None else budget_from(quantizable_layers(reference), size_budget,
                                                                         self.size)
        self.latency = None
        if model is not None:
            self.units = self.space.units(model)
            minimum = sum(min(u.costs.values()) for u in self.units)
            if self.budget_bytes is not None and minimum > self.budget_bytes:
                raise InfeasibleBudget(
                    f"budget {self.budget_bytes:,} {self.unit}: the smallest assignment of candidates "
                    f"{self.space.candidates} takes {minimum:,} {self.unit}. Raise the budget or add "
                    "smaller candidates.", self.budget_bytes, minimum)
            if self.budget_us is not None or latency is not None:
                # a search adds times as it adds bytes: the table's bound for files within the byte budget
                self.latency = measured_latency(model, self.space.candidates, latency, "BitWidthTuner()").additive(
                    self.budget_bytes if self.size == "kernel" else None)
                self.units = with_latency(self.units, self.latency)
                fastest = self.latency.base_us + sum(min(u.us.values()) for u in self.units)
                if self.budget_us is not None and fastest > self.budget_us:
                    raise InfeasibleBudget(
                        f"latency budget {self.budget_us:,.1f} µs: the fastest assignment of candidates "
                        f"{self.space.candidates} takes {fastest:,.1f} µs ({self.latency.base_us:,.1f} µs of it in ops "
                        "no quantizable layer owns). Raise the latency budget or offer the widths that run fastest "
                        "on this runtime.", self.budget_bytes, minimum, self.budget_us, fastest)
        else:
            self.units = None
        self.reference_bytes = (self.penalty.reference_bytes or self.int8_bytes) if self.penalty else None

    # ---- set-up -------------------------------------------------------------------------
    def _build(self, hp, clear: bool = True):
        """The hypermodel's float model, with one bits hyperparameter per searched group."""
        if clear:  # in a trial (search() owns the session): stable auto layer names, no graph build-up
            keras.backend.clear_session()
        model = as_tf_keras(self.hypermodel(hp))
        check_model(model, "the model hypermodel returned")
        for u in self.space.units(model):
            hp.Choice(u.hp, list(u.choices), default=max(c for c in u.choices if c != FLOAT))
        return model

    def _build_default(self):
        """The hypermodel at default hyperparameters, for the budget's reference: the user's
        Keras session is left as it is (no clear_session outside search())."""
        kt = _keras_tuner()
        return self._build(kt.HyperParameters(), clear=False)

    def _units_for(self, values):
        """(kernel bytes, units) of the assignment ``values``."""
        if self.units is not None:
            return assignment_cost(self.units, values), self.units
        key = json.dumps({k: v for k, v in sorted(values.items()) if not k.startswith(("tuner/", HP_PREFIX))})
        if key not in self._units_cache:
            kt = _keras_tuner()
            hp = kt.HyperParameters()
            hp.values.update({k: v for k, v in values.items() if not k.startswith(HP_PREFIX)})
            try:
                units = self.space.units(self._build(hp))
            except Exception:  # noqa: BLE001 - an unbuildable combination cannot be costed
                units = None
            self._units_cache[key] = units
        units = self._units_cache[key]
        return (None, None) if units is None else (assignment_cost(units, values), units)

    def _make_oracle(self, epochs):
        kt = _keras_tuner()
        spec = self.oracle_spec
        if not isinstance(spec, str):
            return spec
        if spec == "random":
            return kt.oracles.RandomSearchOracle(self.objective, max_trials=self.max_trials, seed=self.seed)
        if spec == "bayesian":
            cls = bits_bayesian_class() if self.units is not None else kt.oracles.BayesianOptimizationOracle
            oracle = cls(self.objective, max_trials=self.max_trials, seed=self.seed,
                         num_initial_points=max(2, self.max_trials // 3))
            if self.units is not None:
                oracle._qx_pool = self._pool
            return oracle
        return kt.oracles.HyperbandOracle(self.objective, max_epochs=max(1, epochs or 3), factor=3,
                                          hyperband_iterations=1, seed=self.seed)

    def _pool(self):
        """Every within-budget assignment (or a random sample of them, for big spaces)."""
        if self._pool_cache is None:
            import itertools

            units = self.units
            fits = (lambda v: (self.budget_bytes is None or assignment_cost(units, v) <= self.budget_bytes)
                    and (self.budget_us is None or assignment_latency(units, v) <= self._latency_cap))
            if math.prod(len(u.choices) for u in units) <= POOL_LIMIT:
                pool = [dict(zip((u.hp for u in units), combo)) for combo in itertools.product(*(u.choices for u in units))]
                pool = [v for v in pool if fits(v)]
            else:
                rng, seen, pool = random.Random(self.seed), set(), []
                guard = BudgetGuard(self._units_for, self.budget_bytes, self.seed, latency_cap=self._latency_cap)
                budgeted_space = self.budget_bytes is not None or self.budget_us is not None
                for _ in range(4 * POOL_LIMIT // 10):
                    v = guard.lower({u.hp: rng.choice(u.choices) for u in units}) if budgeted_space else \
                        {u.hp: rng.choice(u.choices) for u in units}
                    key = tuple(sorted(v.items())) if v else None
                    if v and key not in seen:
                        seen.add(key)
                        pool.append(v)
            self._pool_cache = pool
        return self._pool_cache

    @property
    def _latency_cap(self):
        """The µs the quantizable layers may take: the latency budget less the table's base_us."""
        return None if self.budget_us is None else self.budget_us - self.latency.base_us

    def predicted_us(self, values) -> float | None:
        """The predicted latency of an assignment (base_us + its layers'), with a latency table."""
        if self.latency is None or self.units is None:
            return None
        return self.latency.base_us + assignment_latency(self.units, values)

    @property
    def tuner(self):
        """The keras-tuner ``Tuner`` doing the work (created on first use)."""
        return self._ensure_tuner()

    def _ensure_tuner(self, epochs=None):
        if self._tuner is not None:
            return self._tuner
        kt = _keras_tuner()
        oracle = self._make_oracle(epochs)
        redraws = REDRAWS if isinstance(oracle, kt.oracles.RandomSearchOracle) else 0
        guard = BudgetGuard(self._units_for, self.budget_bytes, self.seed, redraws, latency_cap=self._latency_cap)
        budgeted(oracle, guard, own=isinstance(self.oracle_spec, str))
        self._guard = guard
        if self.units is not None:  # declare the space up front (hypermodel mode builds it)
            hp = kt.HyperParameters()
            for u in self.units:
                hp.Choice(u.hp, list(u.choices), default=max(c for c in u.choices if c != FLOAT))
            oracle.update_space(hp)
        oracle.verbose = 0  # our one line per trial replaces keras-tuner's display
        self._tuner = tuner_class()(
            self, oracle=oracle, hypermodel=self._build if self.hypermodel is not None else None,
            directory=self.directory, project_name=self.project_name,
            overwrite=self.overwrite and not is_worker())  # a worker never wipes the shared project
        return self._tuner

    # ---- search -------------------------------------------------------------------------
    def search(self, x, y=None, *, validation_data=None, validation_split: float = 0.0, epochs: int = 1,
               batch_size: int | None = 32, callbacks=None, float_epochs: int = 0, **fit_kwargs):
        """Run trials until ``max_trials`` have trained (resuming a stored project).

        Args:
            x, y, validation_data, validation_split, batch_size, fit_kwargs: as for ``fit``.
            epochs: QAT epochs per trial. callbacks: tf_keras callbacks for each trial's QAT
                fit (not the float fit), deep-copied per trial (a TensorBoard callback gets a
                ``trial_<id>`` log subdirectory per trial).
            float_epochs: float training before quantizing (hypermodel mode).

        Returns:
            self.
        """
        for name, value in (("epochs", epochs), ("float_epochs", float_epochs)):
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "float_epochs" else 1):
                raise ValueError(f"{name} must be an integer >= {0 if name == 'float_epochs' else 1}, got {value!r}.")
        if self.metric.name.startswith("val_") and validation_data is None and not validation_split:
            raise ValueError(f"objective {self.metric.name!r} needs validation_data (or validation_split); "
                             f"or use objective={self.metric.name[4:]!r}.")
        if float_epochs and self.hypermodel is None:
            raise ValueError("float_epochs trains a hypermodel's float model; with model=... train it before the search.")
        callbacks = list(callbacks or [])
        try:
            copy.deepcopy(callbacks)
        except Exception as err:  # noqa: BLE001
            raise TypeError(f"callbacks are copied for each trial and must be deep-copyable ({err}).") from None
        loss = self._checked_loss(x, y, validation_data)
        self._fit = dict(x=x, y=y, validation_data=validation_data, validation_split=validation_split,
                         epochs=epochs, batch_size=batch_size, callbacks=callbacks, float_epochs=float_epochs,
                         loss=loss, fit_kwargs=fit_kwargs)
        tuner = self._ensure_tuner(epochs)
        if not is_worker():
            done = [t for t in tuner.oracle.trials.values() if t.status == "COMPLETED"]
            if done:
                self._say(f"resuming {tuner.project_dir}: {len(done)} trial(s) done, not rerun")
            if self._warm_needed(tuner.oracle):
                self._guard.warm = self._warm_values(x, y)
        self._elapsed0 = time.perf_counter()
        tuner.search()
        if not is_worker():
            stats = self.stats
            best = self._best_trial(required=False)
            latency = f" ({stats['rejected_latency']} over the latency budget)" if self.budget_us is not None else ""
            self._say(f"search done: {len(self.results())} trial(s); {stats['rejected']} over-budget proposal(s) "
                      f"rejected{latency}, {stats['repaired']} repaired"
                      + (f"; best trial {best.trial_id}: {self.objective.name}={best.score:.4f}" if best else ""))
        return self

    def _checked_loss(self, x, y, validation_data):
        """The trials' loss, with the targets (and the validation targets) checked against it and
        the model's output before any trial (:func:`~keras_qx.engine.sensitivity.check_targets`);
        data given as a tf.data.Dataset or a generator is left to ``fit``."""
        reference = self.model if self.model is not None else self._build_default()
        if y is None or is_stream(x):
            return self.training.loss or infer_loss(reference, y)
        specs = model_input_specs(reference)

        def first(samples, what):  # two checked samples for the loss probe
            head = check_inputs(head_samples(samples, 2), specs, what)
            return head[0] if len(head) == 1 else head

        loss_fn, _ = check_targets(reference, first(x, "x"), y, self.training.loss, "y", n=count_samples(x))
        if isinstance(validation_data, (tuple, list)) and len(validation_data) >= 2 and not is_stream(validation_data[0]):
            vx, vy = validation_data[0], validation_data[1]
            check_targets(reference, first(vx, "validation_data x"), vy, loss_fn, "validation_data y", n=count_samples(vx))
        return self.training.loss or loss_fn

    def _warm_needed(self, oracle) -> bool:
        return (self.training.warm_start and self.model is not None
                and (self.budget_bytes is not None or self.budget_us is not None)
                and oracle._qx_stats.get("warm_trial_id") is None and len(oracle.trials) == 0)

    def _warm_values(self, x, y):
        """auto_policy's allocation at the budget, as values of the search's hyperparameters."""
        ties = [list(u.layers) for u in self.units if len(u.layers) > 1]
        start = time.perf_counter()
        try:
            policy = auto_policy(self.model, x, y, budget=join_budget(self.budget_bytes, self.budget_us),
                                 candidates=self.space.candidates, ties=ties, verbose=False, size=self.size,
                                 latency=self.latency)
        except InfeasibleBudget as err:
            self._say(f"warm start skipped: {err}")
            return None
        layers = {l.name: l for l in quantizable_layers(self.model)}
        values = {}
        for u in self.units:
            bits = policy.layers[u.layers[0]].get("weight_bits", 8)
            if bits not in u.choices:  # auto_policy always has 8; map to a candidate costing no more
                cost = sum(layer_size(layers[n], bits, self.size) for n in u.layers)
                fitting = [c for c in u.choices if c != FLOAT and u.costs[c] <= cost]
                if u.us is not None:  # with a latency budget: no slower either
                    us = sum(self.latency.layers[n][bits] for n in u.layers)
                    fitting = [c for c in fitting if u.us[c] <= us]
                if not fitting:
                    self._say(f"warm start skipped: auto_policy chose {bits} bits for {u.layers}, not a candidate")
                    return None
                bits = max(fitting)
            values[u.hp] = bits
        caps = [f"{assignment_cost(self.units, values):,}"
                + (f" of {self.budget_bytes:,}" if self.budget_bytes is not None else "") + f" {self.unit}"]
        if self.budget_us is not None:
            caps.append(f"{self.predicted_us(values):,.1f} of {self.budget_us:,.1f} µs")
        self._say(f"warm start (auto_policy, {time.perf_counter() - start:.1f}s): bits {digest(self.units, values)}, "
                  + ", ".join(caps))
        return values

    def _metrics(self):
        if self.training.metrics is not None:
            return self.training.metrics
        base = self.metric.name[4:] if self.metric.name.startswith("val_") else self.metric.name
        return [] if base == "loss" else [base]

    def _report(self, tuner, trial):
        last, self._last = self._last, None
        n = int(trial.trial_id) + 1
        total = getattr(tuner.oracle, "max_trials", None) or ("?" if self.oracle_spec == "hyperband" else self.max_trials)
        elapsed = time.perf_counter() - (self._elapsed0 or time.perf_counter())
        if last is None or last["trial_id"] != trial.trial_id or trial.status != "COMPLETED":
            reason = (trial.message or "").strip().splitlines()[-1:] or [""]
            self._say(f"[{n}/{total}] trial {trial.trial_id} {trial.status}: {reason[0][:200]}")
            return
        best = self._best_trial(required=False)
        best_text = f"{best.score:.4f}" if best is not None and best.score is not None else "-"
        warm = " (warm start: auto_policy)" if self._guard.warm and dict(
            (k, v) for k, v in trial.hyperparameters.values.items() if k in self._guard.warm) == self._guard.warm else ""
        us = f"{last['us']:,.1f} µs " if last.get("us") is not None else ""
        self._say(f"[{n}/{total}] trial {trial.trial_id} bits {last['digest']} {last['bytes']:,} B {us}"
                  f"{self.metric.name}={last['metric']:.4f} best {self.objective.name}={best_text} "
                  f"{last['seconds']:.1f}s (elapsed {elapsed:.0f}s){warm}")

    def _say(self, text):
        if self.print_fn is not None:
            self.print_fn(text)

    # ---- results ------------------------------------------------------------------------
    @property
    def stats(self) -> dict:
        """``{"rejected", "rejected_latency", "repaired", "duplicates", "warm_trial_id"}``:
        over-budget proposals the oracle made (never trained; ``rejected_latency`` of them over the
        latency budget), those repaired into a budget-fitting trial, and the warm start's trial
        (the chief's / local oracle only)."""
        oracle = self._ensure_tuner().oracle
        return dict(getattr(oracle, "_qx_stats", None) or fresh_stats())

    def _ranked(self, n: int | None = None, what: str = "n") -> list:
        """Completed trials, best first; ties (common on small validation sets) go to the smaller
        model, then the earlier trial."""
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise ValueError(f"{what} must be a positive int, got {n!r}.")
        completed = [t for t in read_trials(self._ensure_tuner()).values() if t.status == "COMPLETED" and t.score is not None]
        if not completed:
            raise RuntimeError("no trial has completed yet; run search() first.")
        sign = 1 if self.objective.direction == "max" else -1

        def size(t):
            return t.metrics.get_last_value("kernel_bytes") if t.metrics.exists("kernel_bytes") else 0

        return sorted(completed, key=lambda t: (-sign * t.score, size(t), int(t.trial_id)))[:n]

    def _best_trial(self, required=True):
        try:
            return self._ranked(1)[0]
        except RuntimeError:
            if required:
                raise
            return None

    def _trial_policy(self, trial) -> Policy:
        saved = load_trial_policy(self._ensure_tuner().get_trial_dir(trial.trial_id))
        if saved is not None:
            return saved
        values = trial.hyperparameters.values
        units = self.units if self.units is not None else self._units_for(values)[1]
        return assignment_policy(units, values)

    def best_policy(self) -> Policy:
        """``get_best_policies()[0]``: the best trial's bits as a :class:`Policy`."""
        return self._policy_with_meta(self._best_trial())

    def _policy_with_meta(self, trial) -> Policy:
        """A trial's :class:`Policy`; ``meta["search"]`` says trial id, metric, score and
        predicted kernel bytes."""
        policy = self._trial_policy(trial)
        row = trial_row(trial, self.metric.name, self.units, latency=self.latency)
        policy.meta = {**policy.meta, "search": {
            "trial_id": trial.trial_id, "objective": self.objective.name, "metric": self.metric.name,
            "value": None if row["metric"] is None else float(row["metric"]),
            "score": None if trial.score is None else float(trial.score), "predicted_kernel_bytes": row["kernel_bytes"], "budget_bytes": self.budget_bytes,
            **({} if self.latency is None else {"predicted_latency_us": row.get("predicted_us"),
                                                 "latency_budget_us": self.budget_us}),
            "int8_kernel_bytes": self.int8_bytes,
            "hyperparameters": {k: v for k, v in trial.hyperparameters.values.items()
                                if not k.startswith((HP_PREFIX, "tuner/"))}}}
        return policy

    def _load_trial_model(self, trial):
        hp = trial.hyperparameters
        float_model = self._build(hp.copy()) if self.hypermodel is not None else self.model
        qat = quantize(float_model, self._trial_policy(trial))
        qat.load_weights(os.path.join(self._ensure_tuner().get_trial_dir(trial.trial_id), WEIGHTS_FILE))
        if self._fit.get("loss") is not None:
            qat.compile(self.training.optimizer(), self._fit["loss"], metrics=self._metrics())
        return qat

    def trial_model(self, trial_id):
        """The trained QAT model of trial ``trial_id`` (a completed one)."""
        trial = read_trials(self._ensure_tuner()).get(str(trial_id))
        if trial is None or trial.status != "COMPLETED":
            raise ValueError(f"trial {trial_id!r} has not completed; completed trials: "
                             f"{[t for t, tr in read_trials(self._ensure_tuner()).items() if tr.status == 'COMPLETED']}.")
        return self._load_trial_model(trial)

    def best_model(self):
        """``get_best_models()[0]``: the best trial's trained QAT model (rebuilt with its policy, its weights loaded;
        compiled like the trials when search() ran in this process)."""
        return self._load_trial_model(self._best_trial())

    def results(self) -> list[dict]:
        """One row per trial, in trial order: trial_id, status, bits ({group: bits or
        "float"}), kernel_bytes (predicted by the cost model), metric, score, warm_start,
        hyperparameters (the non-bits ones), and for trained trials trial_seconds and
        qat_seconds (the quantize + compile + fit part)."""
        warm = self.stats.get("warm_trial_id")
        return [trial_row(t, self.metric.name, self.units, warm, self.latency) for _, t in sorted(read_trials(self._ensure_tuner()).items(), key=lambda kv: int(kv[0]))]

    def results_summary(self, num_trials: int = 10, print_fn=None) -> str:
        """Print (as keras-tuner's does) and return a Markdown table of the best ``num_trials``
        trials of :meth:`results`, best first."""
        rows = self.results()
        if isinstance(num_trials, bool) or not isinstance(num_trials, int) or num_trials < 1:
            raise ValueError(f"num_trials must be a positive int, got {num_trials!r}.")
        text = format_results(rows, self.metric.name, self.objective.direction,
                              budget_bytes=self.budget_bytes, stats=self.stats, limit=num_trials,
                              budget_us=self.budget_us)
        if print_fn is not None:
            warn_renamed("BitWidthTuner.results_summary()", "print_fn=", "the returned text")
        (print_fn or print)(text)
        return text

    def get_best_policies(self, num_policies: int = 1) -> list[Policy]:
        """The policies of the best ``num_policies`` completed trials, best first (keras-tuner's
        ``get_best_hyperparameters`` for bits)."""
        return [self._policy_with_meta(t) for t in self._ranked(num_policies, "num_policies")]

    def get_best_models(self, num_models: int = 1) -> list:
        """The trained QAT models of the best ``num_models`` completed trials, best first."""
        return [self._load_trial_model(t) for t in self._ranked(num_models, "num_models")]
