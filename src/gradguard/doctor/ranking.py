"""How remedy trials are measured against the untreated run, and ranked."""

from __future__ import annotations

import math

from gradguard.doctor.detectors import layer_view
from gradguard.doctor.run import _Run
from gradguard.findings import Trial



# -- metrics for trials --------------------------------------------------------------------------
def _flow(run: _Run) -> float:
    """Median first/last weight-layer gradient ratio (or first/last time step for an RNN)."""
    view = layer_view(run.history, run.probes)
    layers = view.weight_layers
    if len(layers) < 2:
        return math.nan
    j0, j1 = view.layers.index(layers[0]), view.layers.index(layers[-1])
    vals = [r[j0] / r[j1] for r in view.norms
            if math.isfinite(r[j0]) and math.isfinite(r[j1]) and r[j1] > 0]
    return sorted(vals)[len(vals) // 2] if vals else math.nan


def _time_flow(run: _Run) -> float:
    """Gradient at the first time step over the last's, read where the detectors read it."""
    src = run.probes.initial if run.probes.initial is not None and run.probes.initial.temporal \
        else run.probes
    for t in src.temporal:
        g = t.grad_norm
        if len(g) >= 2 and g[-1] > 0 and all(math.isfinite(v) for v in g):
            return g[0] / g[-1]
    return math.nan


def _final_loss(run: _Run) -> float:
    loss = run.history.loss
    if not loss:
        return math.nan
    k = max(3, len(loss) // 10)
    tail = loss[-k:]
    if any(not math.isfinite(v) for v in tail):
        return math.nan
    return sum(tail) / len(tail)


def _decades(x: float) -> float:
    return abs(math.log10(x)) if math.isfinite(x) and x > 0 else math.inf


def _flow_gain(base: float, trial: float) -> float:
    """Decades of the baseline's imbalance that the trial removed (toward a ratio of 1).

    A ratio above 1 (gradients growing toward the input) must come down, one below 1 must come
    up; moving past 1 earns nothing more (a problem on the other side shows up as a finding).
    """
    lb, lt = math.log10(base), math.log10(trial)
    return lb - max(lt, 0.0) if lb > 0 else min(lt, 0.0) - lb


# -- the public entry point ----------------------------------------------------------------------


def _score_trial(base: _Run, trial: Trial, time_axis: bool) -> tuple[float, bool]:
    """Ranking key and "measurably better" flag for one trial against the baseline run.

    Score: +2 per baseline finding resolved, -2 per finding introduced, + the decades of
    imbalance the first/last gradient ratio lost (:func:`_flow_gain`, clipped to ±3), + 3·log(baseline loss / trial loss)
    (clipped to ±3; ±3 when only one of them stayed finite). Without an optimizer the losses are
    those at the starting weights. "Improved" means a half-decade better gradient flow (from at
    least a decade off), a loss at least 5% lower, a run that stays finite where the baseline did
    not, or a baseline finding resolved without a new one.
    """
    score = 2.0 * len(trial.resolved) - 2.0 * len(trial.introduced)
    improved = False
    bf, tf = (_time_flow(base), trial.time_ratio) if time_axis else (_flow(base), trial.flow_ratio)
    bd, td = _decades(bf), _decades(tf)
    if math.isfinite(bd) and math.isfinite(td):
        gain = max(-3.0, min(3.0, _flow_gain(bf, tf)))
        score += gain
        improved = bd >= 1.0 and gain >= 0.5
    elif not math.isfinite(bd) and math.isfinite(td):
        score += 3.0
        improved = True
    bl, tl = _final_loss(base), trial.final_loss
    if math.isfinite(bl) and math.isfinite(tl) and bl > 0 and tl > 0:
        score += 3.0 * max(-1.0, min(1.0, math.log(bl / tl)))
        improved = improved or tl < 0.95 * bl
    elif not math.isfinite(bl) and math.isfinite(tl):
        score += 3.0
        improved = True
    elif math.isfinite(bl) and not math.isfinite(tl):
        score -= 3.0
    if trial.resolved and not trial.introduced:
        improved = True
    return score, improved
