"""Numerics: a non-finite loss, non-finite gradients, a loss summed over the batch."""

from __future__ import annotations

import math

from gradguard.doctor.detectors._common import (
    EXPLODE_SUSTAIN, SUM_RATIO, _Ctx, _growth_before, _loss_recorded, _sig,
)
from gradguard.findings import Finding, Severity


def detect_nonfinite_loss(ctx: _Ctx) -> Finding | None:
    if not _loss_recorded(ctx):
        return None
    bad = [i for i, v in enumerate(ctx.hist.loss) if not math.isfinite(v)]
    if not bad:
        return None
    first = bad[0]
    layers: list[str] = []
    origin = ""
    if ctx.probes is not None:
        sites = [s for s in ctx.probes.sites if s.nonfinite]
        if sites:
            origin = sites[0].module
            layers = [origin] if origin else []
    at_start = first == 0
    grew = _growth_before(ctx, first)
    if at_start:
        causes = ["numerical_overflow"]
        remedies = ["stable_loss", "lower_learning_rate", "skip_nonfinite_steps"]
    else:
        causes = ["high_learning_rate", "numerical_overflow"]
        remedies = ["lower_learning_rate", "gradient_clipping", "skip_nonfinite_steps"]
    ev = {
        "first_step": ctx.hist.step[first],
        "at_start": at_start,
        "steps": len(bad),
        "rows": ctx.n,
        "origin": origin,
        "growth_before": _sig(grew),
        "last_finite_loss": _sig(ctx.hist.loss[first - 1]) if first > 0 else math.nan,
    }
    return Finding("nonfinite_loss", Severity.ERROR, ctx.view.in_module_order(layers), causes,
                   remedies, ev)


def detect_nonfinite_gradients(ctx: _Ctx) -> Finding | None:
    view = ctx.view
    bad_rows = []
    for i, row in enumerate(view.norms):
        loss = ctx.hist.loss[i] if i < len(ctx.hist.loss) else math.nan
        loss_bad = _loss_recorded(ctx) and not math.isfinite(loss)
        if any(not math.isfinite(v) for v in row) and not loss_bad:
            bad_rows.append(i)
    gn_bad = [i for i, v in enumerate(ctx.hist.global_norm)
              if not math.isfinite(v) and not math.isnan(v)]
    bad_rows = sorted(set(bad_rows) | {i for i in gn_bad if _loss_recorded(ctx)
                                       and math.isfinite(ctx.hist.loss[i])})
    if not bad_rows:
        return None
    first = bad_rows[0]
    carried = [layer for j, layer in enumerate(view.layers) if not math.isfinite(view.norms[first][j])]
    # backward meets the problem first nearest the output: the deepest layer that carried it
    depth_order = [layer for layer in view.layers if layer in carried]
    origin = depth_order[-1] if depth_order else ""
    grew = _growth_before(ctx, first)
    causes = ["numerical_overflow"]
    if math.isfinite(grew) and grew > EXPLODE_SUSTAIN:
        causes = ["high_learning_rate", "numerical_overflow"]
    ev = {
        "first_step": ctx.hist.step[first],
        "steps": len(bad_rows),
        "rows": ctx.n,
        "origin": origin,
        "n_layers": len(carried),
        "growth_before": _sig(grew),
        "skipped": sum(1 for s in ctx.hist.skipped if s),
    }
    return Finding("nonfinite_gradients", Severity.ERROR, view.in_module_order(carried), causes,
                   ["skip_nonfinite_steps", "gradient_clipping", "lower_learning_rate"], ev)


#: findings that a summed loss can cause (its gradient grows with the batch)
_UNSTABLE = ("nonfinite_loss", "nonfinite_gradients", "exploding_gradients",
             "learning_rate_too_high", "loss_divergence")


def loss_scale_finding(ctx: _Ctx, others: list[Finding]) -> Finding | None:
    """The loss is summed over the batch (a whole batch gives about twice the loss of half of
    it) *and* the run is unstable: a finding of its own, ahead of what it caused. A healthy run
    with a summed loss (and a learning rate tuned to it) gets nothing."""
    r = ctx.probes.loss_batch_ratio if ctx.probes is not None else math.nan
    if not (math.isfinite(r) and SUM_RATIO[0] <= r <= SUM_RATIO[1]):
        return None
    caused = [f for f in others if f.code in _UNSTABLE]
    if not caused:
        return None
    for f in caused:
        f.causes = ["summed_loss", *[c for c in f.causes if c != "summed_loss"]]
        f.remedies = ["mean_reduction", *[m for m in f.remedies if m != "mean_reduction"]]
    ev = {"batch_ratio": _sig(r), "caused": ", ".join(f.code for f in caused)}
    return Finding("loss_scale", Severity.ERROR, [], ["summed_loss"],
                   ["mean_reduction", "lower_learning_rate"], ev)
