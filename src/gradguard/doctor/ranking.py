"""How a remedy trial is measured against the untreated run, and how trials are ranked.

The verdict is the **loss**'s. A trial *helps* when the mean loss over the last quarter of its
steps is at least 10 % below the untreated run's over the same steps (the same batches, in the
same order: a paired comparison) *and* the gap is more than two standard errors of the per-step
differences. It is *worse* when the same holds the other way round, or when it diverged or was
stopped for losing where the untreated run did not. Where the untreated run itself diverged (a
non-finite loss, or a loss that ended far above its start), a trial helps only if it stays
finite and *learns*: its last quarter at least 10 % below its own start. Gradient flow (the
first/last gradient ratio) is recorded beside the verdict as supporting evidence, never enough
alone.

Without an optimizer nothing is trained, so the losses are those at the starting weights; there
the old evidence stands: a trial helps when a finding disappears without a new one, or the
gradient flow moves half a decade toward balance.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

from gradguard.doctor.detectors import layer_view
from gradguard.doctor.run import _Run
from gradguard.findings import Trial

__all__ = ["HELP_MARGIN", "final_loss", "flow", "rank", "time_flow", "verdict"]

#: a trial's loss must be this share below the untreated run's (and beyond two standard errors)
HELP_MARGIN = 0.10
#: an untreated run "diverged" when its last quarter ends this many times above its start
DIVERGED_FACTOR = 2.0

_ORDER = {"helps": 0, "no_gain": 1, "worse": 2}


def flow(run: _Run) -> float:
    """Median first/last weight-layer gradient ratio (or first/last time step for an RNN)."""
    view = layer_view(run.history, run.probes)
    layers = view.weight_layers
    if len(layers) < 2:
        return math.nan
    j0, j1 = view.layers.index(layers[0]), view.layers.index(layers[-1])
    vals = [r[j0] / r[j1] for r in view.norms
            if math.isfinite(r[j0]) and math.isfinite(r[j1]) and r[j1] > 0]
    return sorted(vals)[len(vals) // 2] if vals else math.nan


def time_flow(run: _Run) -> float:
    """Gradient at the first time step over the last's, read where the detectors read it."""
    src = run.probes.initial if run.probes.initial is not None and run.probes.initial.temporal \
        else run.probes
    for t in src.temporal:
        g = t.grad_norm
        if len(g) >= 2 and g[-1] > 0 and all(math.isfinite(v) for v in g):
            return g[0] / g[-1]
    return math.nan


def _tail(loss: Sequence[float]) -> list[float]:
    return list(loss[-max(2, len(loss) // 4):])


def final_loss(run: _Run) -> float:
    """Mean loss over the last quarter of the steps (NaN when any of them is not finite)."""
    loss = run.history.loss
    if not loss:
        return math.nan
    tail = _tail(loss)
    if any(not math.isfinite(v) for v in tail):
        return math.nan
    return sum(tail) / len(tail)


def diverged(loss: Sequence[float]) -> bool:
    """A loss that went non-finite, or whose last quarter ends far above its start."""
    if not loss or any(not math.isfinite(v) for v in loss):
        return bool(loss)
    tail = _tail(loss)
    start = min(loss[:3])
    return start > 0 and sum(tail) / len(tail) > DIVERGED_FACTOR * start


def _learns(loss: Sequence[float]) -> bool:
    if not loss or any(not math.isfinite(v) for v in loss) or len(loss) < 4:
        return False
    tail = _tail(loss)
    start = statistics.mean(loss[:2])
    return sum(tail) / len(tail) < (1 - HELP_MARGIN) * start if start > 0 else False


def verdict(base: Sequence[float], trial: Sequence[float], stopped: str = "") -> tuple[str, float]:
    """``("helps" | "no_gain" | "worse", relative loss)`` of a trial's loss curve against the
    untreated run's (same steps, same batches). The relative loss is the trial's last-quarter
    mean over the baseline's on the same steps (its last quarter over its start where the
    baseline diverged)."""
    if not trial:
        return "no_gain", math.nan
    if diverged(base):
        if _learns(trial) and not stopped:
            tail = _tail(trial)
            return "helps", (sum(tail) / len(tail)) / statistics.mean(trial[:2])
        return "no_gain", math.nan
    if stopped or any(not math.isfinite(v) for v in trial):
        return "worse", math.inf
    k = len(trial)
    tail_idx = range(k - max(2, k // 4), k)
    b = [base[i] for i in tail_idx]
    t = [trial[i] for i in tail_idx]
    mb, mt = statistics.mean(b), statistics.mean(t)
    d = [y - x for x, y in zip(b, t)]
    se = statistics.stdev(d) / math.sqrt(len(d)) if len(d) >= 2 else 0.0
    rel = mt / mb if mb > 0 else math.nan
    margin = HELP_MARGIN * abs(mb)
    if mb - mt >= margin and mb - mt > 2 * se:
        return "helps", rel
    if mt - mb >= margin and mt - mb > 2 * se:
        return "worse", rel
    return "no_gain", rel


def _decades(x: float) -> float:
    return abs(math.log10(x)) if math.isfinite(x) and x > 0 else math.inf


def flow_gain(base: float, trial: float) -> float:
    """Decades of the baseline's imbalance that the trial removed (toward a ratio of 1).

    A ratio above 1 (gradients growing toward the input) must come down, one below 1 must come
    up; moving past 1 earns nothing more (a problem on the other side shows up as a finding).
    """
    lb, lt = math.log10(base), math.log10(trial)
    return lb - max(lt, 0.0) if lb > 0 else min(lt, 0.0) - lb


def examine_verdict(base: _Run, trial: Trial, time_axis: bool) -> str:
    """Without training: a finding resolved without a new one, or half a decade of flow."""
    if trial.resolved and not trial.introduced:
        return "helps"
    bf, tf = (time_flow(base), trial.time_ratio) if time_axis else (flow(base), trial.flow_ratio)
    bd, td = _decades(bf), _decades(tf)
    if math.isfinite(bd) and math.isfinite(td) and bd >= 1.0 and flow_gain(bf, tf) >= 0.5:
        return "helps"
    if trial.introduced and not trial.resolved:
        return "worse"
    return "no_gain"


def score(t: Trial) -> float:
    """Ranking key, higher is better: the verdict first, then the relative loss (lower better),
    then findings resolved."""
    rel = t.relative_loss if math.isfinite(t.relative_loss) and t.relative_loss > 0 else 1e6
    return -10.0 * _ORDER.get(t.verdict, 1) - math.log10(rel) + 0.1 * (
        len(t.resolved) - len(t.introduced))


def rank(trials: Sequence[Trial]) -> list[Trial]:
    """Applied trials best first (across every finding), then those not applied."""
    applied = sorted([t for t in trials if t.applied], key=lambda t: -t.score)
    return applied + [t for t in trials if not t.applied]
