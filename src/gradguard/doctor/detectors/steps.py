"""The run over steps: gradient norms that explode, a loss that climbs and stays up, loss spikes."""

from __future__ import annotations

import math
import statistics

from gradguard.doctor.detectors._common import (
    DIVERGE_FACTOR, EXPLODE_GROWTH, EXPLODE_SUSTAIN, MIN_ROWS, SPIKE_NORM_RATIO, SPIKE_RATIO, SPIKE_WINDOW,
    SPIKE_Z, _Ctx, _loss_trend, _median, _sig,
)
from gradguard._series import level_shifts
from gradguard.findings import Finding, Severity


def _exploding_over_steps(ctx: _Ctx) -> Finding | None:
    gn = ctx.hist.global_norm
    idx = [i for i, v in enumerate(gn) if math.isfinite(v) and v > 0]
    if len(idx) < MIN_ROWS:
        return None
    k = max(3, len(idx) // 5)
    early = _median([gn[i] for i in idx[:k]])
    late = _median([gn[i] for i in idx[-k:]])
    peak = max(gn[i] for i in idx)
    went_bad = ctx.first_bad_row is not None
    if early <= 0:
        return None
    growth = peak / early
    sustained = late / early
    if not (growth > EXPLODE_GROWTH and (sustained > EXPLODE_SUSTAIN or went_bad)):
        return None
    # the layers whose norm grew most
    view = ctx.view
    grew = []
    for j, layer in enumerate(view.layers):
        col = [view.norms[i][j] for i in idx]
        e = _median(col[:k])
        if e > 0 and max(col) / e > EXPLODE_SUSTAIN:
            grew.append(layer)
    named = [layer for layer in grew if layer in view.weight_layers] or grew
    ev = {
        "axis": "steps",
        "ratio": _sig(growth),
        "growth": _sig(growth),
        "sustained": _sig(sustained),
        "early_norm": _sig(early),
        "peak_norm": _sig(peak),
        "rows": ctx.n,
        "n_layers": len(named),
        "went_nonfinite": went_bad,
    }
    causes = ["high_learning_rate", "numerical_overflow"] if ctx.trained else ["large_init"]
    return Finding("exploding_gradients", Severity.ERROR, view.in_module_order(named), causes,
                   ["gradient_clipping", "lower_learning_rate", "lr_schedule",
                    "adaptive_optimizer"], ev)


def detect_loss_spike(ctx: _Ctx) -> Finding | None:
    loss = ctx.hist.loss
    gn = ctx.hist.global_norm
    n = ctx.n
    if n < MIN_ROWS or ctx.first_bad_row is not None:
        return None  # a run that went non-finite diverged; that is not a transient spike
    trend = _loss_trend(ctx)
    if trend is not None and trend.first > 0 and trend.last > 2 * trend.first:
        return None  # the loss ends far above where it started: divergence, not a spike
    spikes: list[tuple[int, float, float, str]] = []  # (row, z, ratio, series)
    for series_name, series, min_ratio in (("loss", loss, SPIKE_RATIO),
                                           ("grad_norm", gn, SPIKE_NORM_RATIO)):
        for i in range(5, n):
            v = series[i]
            if not math.isfinite(v):
                continue
            win = [x for x in series[max(0, i - SPIKE_WINDOW):i] if math.isfinite(x)]
            if len(win) < 5:
                continue
            med = statistics.median(win)
            mad = statistics.median(abs(x - med) for x in win) * 1.4826
            scale = max(mad, 1e-3 * abs(med), 1e-12)
            z = (v - med) / scale
            ratio = v / med if med > 0 else math.inf
            if z > SPIKE_Z and ratio > min_ratio:
                # a spike comes back down; a level that stays up is divergence, not a spike
                after = [x for x in series[i + 1:i + 6] if math.isfinite(x)]
                if i + 1 < n and (not after or _median(after) > med + 0.5 * (v - med)):
                    continue
                spikes.append((i, z, ratio, series_name))
    if not spikes:
        return None
    rows = sorted({s[0] for s in spikes})
    if len(rows) > max(2, n // 5):
        return None  # spikes everywhere: an unstable run (learning rate), not sudden spikes
    worst = max(spikes, key=lambda s: s[2])
    view = ctx.view
    r = worst[0]
    jumps = []
    for j, layer in enumerate(view.layers):
        col = view.norms
        prev = _median([col[i][j] for i in range(max(0, r - SPIKE_WINDOW), r)])
        cur = col[r][j]
        if prev > 0 and math.isfinite(cur):
            jumps.append((cur / prev, layer))
    top = max((j for j, _ in jumps), default=math.nan)
    named = [layer for j, layer in jumps if j >= 0.5 * top and j > 2] if jumps else []
    causes = ["outlier_batch", "high_learning_rate"] if len(rows) <= 2 else [
        "high_learning_rate", "outlier_batch"]
    ev = {
        "steps": [ctx.hist.step[i] for i in rows],
        "count": len(rows),
        "first_step": ctx.hist.step[rows[0]],
        "z": _sig(worst[1]),
        "ratio": _sig(worst[2]),
        "series": worst[3],
        "layer_jump": _sig(top),
        "n_layers": len(named),
    }
    return Finding("loss_spike", Severity.WARNING, view.in_module_order(named), causes,
                   ["gradient_clipping", "spike_skipping", "lr_schedule", "lower_learning_rate"],
                   ev)


def _spike_shaped(ctx: _Ctx, onset: int) -> bool:
    """Whether a new level starts with one outlier step: the loss (or the gradient norm) at the
    onset, or one step either side, jumps far above its trailing median and the next steps fall
    well back (the level that follows is the damage of that batch, not a climb)."""
    for series, ratio in ((ctx.hist.loss, SPIKE_RATIO), (ctx.hist.global_norm, SPIKE_NORM_RATIO)):
        for j in range(max(1, onset - 1), min(ctx.n, onset + 2)):
            v = series[j]
            win = [x for x in series[max(0, j - SPIKE_WINDOW):j] if math.isfinite(x)]
            after = [x for x in series[j + 1:j + 6] if math.isfinite(x)]
            if not (math.isfinite(v) and len(win) >= 3 and after):
                continue
            med = statistics.median(win)
            if med > 0 and v > 2 * ratio * med and _median(after) < med + 0.5 * (v - med):
                return True
    return False


def detect_loss_divergence(ctx: _Ctx) -> Finding | None:
    """The loss rose to a new level above its start and stayed there to the end (a level shift of
    the shared :func:`gradguard._series.level_shifts`), or its running median climbed far above
    its start
    (even if it came back down later). A run that went non-finite is left to the non-finite
    detectors. Scale-free: every test is a ratio of loss levels."""
    loss = ctx.hist.loss
    if ctx.n < MIN_ROWS or ctx.first_bad_row is not None:
        return None
    idx = [i for i, v in enumerate(loss) if math.isfinite(v)]
    trend = _loss_trend(ctx)
    if len(idx) < MIN_ROWS or trend is None or not trend.start > 0:
        return None
    window = max(3, min(5, len(idx) // 6))
    # a new level that lasts to the end counts when it is above where the run started (a setback
    # after a one-off outlier batch, still below the start, is left to the spike detector)
    open_shift = next((s for s in level_shifts(loss, min_factor=DIVERGE_FACTOR, window=window)
                       if s.end is None and math.isfinite(s.factor) and s.after > trend.start),
                      None)
    vals = [loss[i] for i in idx]
    # running medians over full windows: one outlier batch never makes a level
    rm = [statistics.median(vals[k - window + 1:k + 1]) for k in range(window - 1, len(vals))]
    start = trend.start
    up = [k + window - 1 for k, v in enumerate(rm) if v > DIVERGE_FACTOR * start]
    if open_shift is not None and _spike_shaped(ctx, open_shift.start):
        open_shift = None  # one outlier batch knocked the run back: the spike detector's case
    if open_shift is not None:
        before, after, factor = open_shift.before, open_shift.after, open_shift.factor
        first, recovered, length = open_shift.start, False, ctx.n - open_shift.start
    elif up:
        after = max(rm)
        before, factor, first = start, after / start, idx[up[0]]
        recovered = rm[-1] <= DIVERGE_FACTOR * start
        length = len(up)
    else:
        return None
    ev = {
        "before": _sig(before),
        "after": _sig(after),
        "factor": _sig(factor),
        "first_step": ctx.hist.step[first],
        "recovered": recovered,
        "length": length,
        "rows": ctx.n,
        "update_ratio": _sig(_median([_median([u for u in row if math.isfinite(u)])
                                      for row in ctx.view.update])),
    }
    causes = ["high_learning_rate", "numerical_overflow"]
    remedies = ["lower_learning_rate", "gradient_clipping", "lr_schedule"]
    sev = Severity.WARNING if recovered else Severity.ERROR
    return Finding("loss_divergence", sev, [], causes, remedies, ev)
