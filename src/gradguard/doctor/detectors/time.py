"""Gradient flow through time, inside recurrent layers (from the temporal probe)."""

from __future__ import annotations

import math

from gradguard.doctor.detectors._common import (
    CLOSED_GATE_BIAS, TIME_EXPLODE, TIME_MIN_STEPS, TIME_VANISH, VANISH_ERROR, _Ctx, _sig,
)
from gradguard.doctor.detectors.steps import _exploding_over_steps
from gradguard.findings import Finding, Severity


def _vanishing_time(ctx: _Ctx) -> Finding | None:
    if ctx.probes is None:
        return None
    for t in ctx.temporal():
        g = t.grad_norm
        # Gated cells (LSTM, GRU) decay at init too and learn to keep memory: only a plain RNN
        # is judged here, and an LSTM whose forget gate starts closed (it cannot learn to keep).
        closed = t.op == "LSTM" and math.isfinite(t.forget_bias) and \
            t.forget_bias < CLOSED_GATE_BIAS
        if (t.op != "RNN" and not closed) or len(g) < TIME_MIN_STEPS or not all(
                math.isfinite(v) for v in g):
            continue
        top = max(g)
        if top <= 0 or g[-1] <= 0:
            continue
        ratio = g[0] / g[-1]
        if ratio < TIME_VANISH and g[-1] >= 0.5 * top:
            decay = ratio ** (1 / (len(g) - 1))
            ev = {
                "axis": "time",
                "first_layer": t.module,
                "last_layer": t.module,
                "ratio": _sig(ratio),
                "first_last_ratio": _sig(ratio),
                "decay_per_layer": _sig(decay),
                "decay_per_step": _sig(decay),
                "time_steps": len(g),
                "depth": len(g),
                "n_layers": 1,
                "activation": "saturating",
            }
            sev = Severity.ERROR if ratio < VANISH_ERROR * 1e-2 else Severity.WARNING
            if closed:
                ev["forget_bias"] = _sig(t.forget_bias)
                return Finding("vanishing_gradients", sev, [t.module],
                               ["closed_forget_gate", "recurrence"],
                               ["forget_gate_bias", "orthogonal_init", "adaptive_optimizer"], ev)
            # An orthogonal recurrent matrix restores the flow from the first step; gates let it
            # be learned (and need training to show).
            return Finding("vanishing_gradients", sev, [t.module], ["recurrence", "depth"],
                           ["orthogonal_init", "gated_recurrence", "adaptive_optimizer"], ev)
    return None


def _exploding_time_rnn(ctx: _Ctx) -> Finding | None:
    if ctx.probes is None:
        return None
    for t in ctx.temporal():
        g = t.grad_norm
        if len(g) < TIME_MIN_STEPS or g[-1] <= 0:
            continue
        finite = all(math.isfinite(v) for v in g)
        ratio = g[0] / g[-1] if finite else math.inf
        if ratio > TIME_EXPLODE:
            growth = ratio ** (1 / (len(g) - 1)) if finite else math.inf
            ev = {
                "axis": "time",
                "first_layer": t.module,
                "ratio": _sig(ratio),
                "growth_per_step": _sig(growth),
                "growth_per_layer": _sig(growth),
                "time_steps": len(g),
                "depth": len(g),
                "n_layers": 1,
            }
            # A run that diverged needs its steps bounded first (clipping); otherwise the
            # recurrent matrix itself is the fix.
            diverged = ctx.first_bad_row is not None or _exploding_over_steps(ctx) is not None
            remedies = (["gradient_clipping", "orthogonal_init"] if diverged
                        else ["orthogonal_init", "gradient_clipping"])
            ev["diverged"] = diverged
            return Finding("exploding_gradients", Severity.ERROR, [t.module],
                           ["recurrence", "large_init"],
                           [*remedies, "gated_recurrence", "lower_learning_rate"], ev)
    return None
