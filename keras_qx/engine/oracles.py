"""Oracles for bit-width search: keras-tuner's own, made to respect a hard size budget.

An over-budget proposal is never turned into a trial (redrawn, then repaired); for bit
assignments the Bayesian oracle maximises its acquisition over the within-budget untried
assignments directly. Used by :mod:`.search`.
"""
from __future__ import annotations

import random
import warnings

from keras_qx._compat import keras_tuner as _keras_tuner
from keras_qx.engine.search_space import assignment_latency

__all__ = ["BudgetGuard", "budgeted", "bits_bayesian_class", "fresh_stats", "POOL_LIMIT", "REDRAWS"]

REDRAWS = 8  # oracle redraws of an over-budget proposal before it is repaired


# ---- the budget guard on the oracle -------------------------------------------------------
class BudgetGuard:
    """Checks, redraws and repairs the oracle's proposals; injects the warm start."""

    def __init__(self, cost_fn, budget, seed, redraws=REDRAWS, latency_cap=None):
        self.cost_fn = cost_fn  # values -> (kernel bytes, units) or (None, None) if unbuildable
        self.budget = budget
        self.latency_cap = latency_cap  # µs the layers may take (the latency budget less base_us), or None
        self.redraws = redraws
        self.rng = random.Random(seed)
        self.warm = None  # {hp: value}

    def _excess(self, total, units, values) -> float:
        """How far ``values`` are over the caps (0: within both), each cap's excess relative to it."""
        excess = 0.0
        if self.budget is not None and total > self.budget:
            excess += (total - self.budget) / max(self.budget, 1)
        if self.latency_cap is not None:
            us = assignment_latency(units, values)
            if us > self.latency_cap:
                excess += (us - self.latency_cap) / max(self.latency_cap, 1e-9)
        return excess

    def over_latency(self, values) -> bool:
        total, units = self.cost_fn(values)
        if total is None or self.latency_cap is None:
            return False
        return assignment_latency(units, values) > self.latency_cap

    def fits(self, values) -> bool:
        total, units = self.cost_fn(values)
        return total is not None and self._excess(total, units, values) == 0

    def lower(self, values):
        """Move random groups one choice cheaper until ``values`` fit; None if they cannot.

        "Cheaper": a choice that brings the assignment nearer the caps (bytes, and with a latency
        budget time), the nearest such step of each group; with a bytes budget alone, the next
        smaller choice."""
        values = dict(values)
        for _ in range(10_000):
            total, units = self.cost_fn(values)
            if total is None:
                return None
            excess = self._excess(total, units, values)
            if excess == 0:
                return values
            movable = []
            for u in units:
                now_choice = values.get(u.hp, max(u.costs))
                now = u.costs[now_choice]
                if self.latency_cap is None:
                    cheaper = [c for c in u.choices if u.costs[c] < now]
                    if cheaper:
                        movable.append((u.hp, max(cheaper, key=lambda c: u.costs[c])))
                    continue
                steps = []
                for c in u.choices:
                    if c != now_choice:
                        after = self._excess(total - now + u.costs[c], units, {**values, u.hp: c})
                        if after < excess:
                            steps.append((excess - after, c))
                if steps:
                    movable.append((u.hp, min(steps)[1]))
            if not movable:
                return None
            hp, choice = self.rng.choice(movable)
            values[hp] = choice
        return None

    def filter(self, oracle, trial_id, response, redraw):
        stats = oracle._qx_stats
        if response.get("status") != "RUNNING" or not response.get("values"):
            return response
        values = dict(response["values"])
        fresh = "tuner/trial_id" not in values  # Hyperband's later rounds reuse trained values
        if fresh and self.warm and stats.get("warm_trial_id") is None:
            candidate = {**values, **self.warm}
            if self.fits(candidate):
                stats["warm_trial_id"] = trial_id
                return {**response, "values": candidate}
        # Redraw only where a draw is cheap and differs: a random oracle. A model-based oracle
        # (Bayesian: a GP fit + 50 optimizer restarts a call) would propose the same point
        # again at full cost, and Hyperband has already booked the trial in a bracket.
        plain = not any(k.startswith("tuner/") for k in values)  # not booked by Hyperband
        can_redraw = self.redraws > 0 and plain
        for attempt in range(self.redraws + 1):
            if self.fits(values):
                if not (plain and oracle._duplicate(values)):
                    return {**response, "values": values}
                # a model-based oracle may propose a point already trained: replace it
                stats["duplicates"] = stats.get("duplicates", 0) + 1
                break
            stats["rejected"] += 1
            if self.latency_cap is not None and self.over_latency(values):
                stats["rejected_latency"] = stats.get("rejected_latency", 0) + 1
            if not can_redraw or attempt == self.redraws:
                break
            response = redraw()
            if response.get("status") != "RUNNING" or not response.get("values"):
                return response
            values = dict(response["values"])
        repaired = self.lower(values)
        for _ in range(50):
            if repaired is not None and (not fresh or not oracle._duplicate(repaired)):
                stats["repaired"] += repaired != values
                return {**response, "values": repaired}
            sample = oracle._random_values() if fresh else None  # the bits only; Hyperband's keys stay
            if sample is None:
                break
            repaired = self.lower({**values, **sample})
        return {"status": "STOPPED", "values": None}  # nothing untried fits the budget


class _BudgetedOracle:
    """Mixed in front of the user's oracle class: checks every proposal against the budget."""

    _qx_guard = None

    def populate_space(self, trial_id):
        with warnings.catch_warnings():  # the Bayesian oracle's GP fit warns on flat scores
            warnings.filterwarnings("ignore", message=".*close to the specified (upper|lower) bound")
            response = super().populate_space(trial_id)
            if self._qx_guard is None:
                return response
            return self._qx_guard.filter(self, trial_id, response,
                                         lambda: super(_BudgetedOracle, self).populate_space(trial_id))

    def get_state(self):
        return {**super().get_state(), "keras_qx": dict(self._qx_stats)}

    def set_state(self, state):
        super().set_state(state)
        self._qx_stats = {**fresh_stats(), **(state.get("keras_qx") or {})}


def fresh_stats():
    return {"rejected": 0, "rejected_latency": 0, "repaired": 0, "duplicates": 0, "warm_trial_id": None}


_BUDGETED_CLASSES = {}


def budgeted(oracle, guard, own: bool = True):
    """``oracle`` checking every proposal against ``guard``'s budget.

    An oracle keras_qx made (``own``) gets the budgeted class; a user's oracle keeps its class
    and gets the three methods bound on the instance, so ``type(oracle)`` and every other
    instance of its class are untouched."""
    cls = type(oracle)
    if own:
        if not isinstance(oracle, _BudgetedOracle):
            if cls not in _BUDGETED_CLASSES:
                _BUDGETED_CLASSES[cls] = type(f"Budgeted{cls.__name__}", (_BudgetedOracle, cls), {})
            oracle.__class__ = _BUDGETED_CLASSES[cls]
    elif "populate_space" not in vars(oracle):
        base = {name: getattr(oracle, name) for name in ("populate_space", "get_state", "set_state")}

        def populate_space(trial_id):
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*close to the specified (upper|lower) bound")
                response = base["populate_space"](trial_id)
                if oracle._qx_guard is None:
                    return response
                return oracle._qx_guard.filter(oracle, trial_id, response, lambda: base["populate_space"](trial_id))

        def get_state():
            return {**base["get_state"](), "keras_qx": dict(oracle._qx_stats)}

        def set_state(state):
            base["set_state"](state)
            oracle._qx_stats = {**fresh_stats(), **(state.get("keras_qx") or {})}

        oracle.populate_space, oracle.get_state, oracle.set_state = populate_space, get_state, set_state
    oracle._qx_guard = guard
    if not hasattr(oracle, "_qx_stats"):
        oracle._qx_stats = fresh_stats()
    return oracle


# ---- a Bayesian oracle for bit assignments --------------------------------------------------
POOL_LIMIT = 20_000  # assignments enumerated; beyond, a random within-budget sample
_BAYES_CLASS = None


def bits_bayesian_class():
    """keras-tuner's Gaussian process + UCB, with the acquisition maximised over the
    within-budget, untried assignments instead of 50 L-BFGS restarts on the continuous
    relaxation: the bits space is small and discrete, so this is exact, far cheaper (seconds
    a trial saved), and never proposes an over-budget point."""
    global _BAYES_CLASS
    if _BAYES_CLASS is None:
        import numpy as np

        base = _keras_tuner().oracles.BayesianOptimizationOracle

        class BitsBayesianOracle(base):
            _qx_pool = None  # () -> list of within-budget assignments (set by BitWidthTuner)

            def _make_gpr(self):
                gpr = super()._make_gpr()
                gpr.n_restarts_optimizer = 3  # kernel fits on tens of points: 20 restarts cost 7x more
                return gpr

            def populate_space(self, trial_id):
                completed = [t for t in self.trials.values() if t.status == "COMPLETED"]
                first = self.num_initial_points or max(3 * len(self.hyperparameters.space), 3)
                if self._qx_pool is None or len(completed) < first:
                    return super().populate_space(trial_id)
                pool = [v for v in self._qx_pool() if not self._duplicate(v)]
                if not pool:
                    return {"status": "STOPPED", "values": None}
                x, y = self._vectorize_trials()
                self.gpr.fit(np.nan_to_num(x, posinf=0, neginf=0), np.nan_to_num(y, posinf=0, neginf=0))
                space = self._nonfixed_space()
                grid = np.array([[hp.value_to_prob(v.get(hp.name, hp.default)) for hp in space] for v in pool])
                mu, sigma = self.gpr.predict(grid, return_std=True)
                best = int(np.argmin(np.asarray(mu).ravel() - self.beta * np.asarray(sigma).ravel()))
                return {"status": "RUNNING", "values": dict(pool[best])}

        _BAYES_CLASS = BitsBayesianOracle
    return _BAYES_CLASS

