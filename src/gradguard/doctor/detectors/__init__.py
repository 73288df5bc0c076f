"""Detectors: flushed :class:`~gradguard.history.History` (+ optional probe summary) → findings.

One detector per finding code. Every test is scale-free: ratios across depth (and the per-layer
decay factor fitted through them), ratios across time, robust z-scores against a running median,
update/weight ratios, and fractions from the forward probes. No detector fires on an absolute
gradient norm alone, and a healthy network gets no finding (a false alarm is a bug).

The thresholds are module constants, named and documented below; ``docs/doctor.md`` lists them
with the reasoning behind each.

Entry point: Families, one module each: ``numerics`` (non-finite loss and gradients), ``depth`` (flow across
depth), ``time`` (flow through time in recurrent layers), ``steps`` (the run over steps: explosion,
spikes), ``activations`` (saturation, dead units, scale drift) and ``optimisation`` (learning
rate, stalls). ``_common`` holds the thresholds and the per-layer view they share.

:func:`run_detectors`, which :func:`gradguard.diagnose` and ``Guard.findings()`` call.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from gradguard.doctor.detectors._common import CAUSES, CODES, REMEDIES, LayerView, _Ctx, layer_view
from gradguard.doctor.detectors.activations import (
    detect_activation_scale_drift, detect_dead_units, detect_saturated_activations,
)
from gradguard.doctor.detectors.depth import _exploding_depth, _vanishing_depth
from gradguard.doctor.detectors.numerics import (
    detect_nonfinite_gradients, detect_nonfinite_loss, loss_scale_finding,
)
from gradguard.doctor.detectors.optimisation import (
    detect_learning_rate_too_high, detect_training_stalled,
)
from gradguard.doctor.detectors.steps import (
    _exploding_over_steps, detect_loss_divergence, detect_loss_spike,
)
from gradguard.doctor.detectors.time import _exploding_time_rnn, _vanishing_time
from gradguard.doctor.probes import ProbeSummary
from gradguard.findings import Finding
from gradguard.history import History
__all__ = ["CAUSES", "CODES", "DETECTORS", "REMEDIES", "LayerView", "layer_view", "run_detectors"]


def detect_vanishing_gradients(ctx: _Ctx) -> Finding | None:
    found = _vanishing_depth(ctx) or _vanishing_time(ctx)
    return found


def detect_exploding_gradients(ctx: _Ctx) -> Finding | None:
    return _exploding_time_rnn(ctx) or _exploding_over_steps(ctx) or _exploding_depth(ctx)


DETECTORS: dict[str, Callable[[_Ctx], Finding | None]] = {
    "nonfinite_loss": detect_nonfinite_loss,
    "nonfinite_gradients": detect_nonfinite_gradients,
    "exploding_gradients": detect_exploding_gradients,
    "vanishing_gradients": detect_vanishing_gradients,
    "saturated_activations": detect_saturated_activations,
    "dead_units": detect_dead_units,
    "activation_scale_drift": detect_activation_scale_drift,
    "learning_rate_too_high": detect_learning_rate_too_high,
    "loss_divergence": detect_loss_divergence,
    "loss_spike": detect_loss_spike,
    "training_stalled": detect_training_stalled,
}


def run_detectors(history: History, probes: ProbeSummary | None = None) -> list[Finding]:
    """Every detector on a flushed history (and the forward probes' summary when available).

    Args:
        history (History): per-step gradient norms (per tensor), losses and, when an optimizer
            ran, update/weight ratios; e.g. ``HistoryBuffer.flush()`` or ``History.from_jsonl``.
        probes (ProbeSummary, optional): what :class:`gradguard.doctor.probes.Probe` saw (saturation, dead
            units, activation scale, parameter norms, recurrent time profiles). Without it the
            detectors that need the forward pass stay silent and the others work on the history.

    Returns:
        list[Finding]: most severe first; empty when nothing is wrong.

    Example:
        >>> from gradguard.history import History
        >>> from gradguard.doctor.detectors import run_detectors
        >>> run_detectors(History(["w"]))
        []
    """
    if not isinstance(history, History):
        raise TypeError(
            f"`history` must be a gradguard History (HistoryBuffer.flush() or "
            f"History.from_jsonl(path)), got {type(history).__name__}."
        )
    if probes is not None and not isinstance(probes, ProbeSummary):
        raise TypeError(
            f"`probes` must be a ProbeSummary (Probe(model).summary()) or None, got "
            f"{type(probes).__name__}."
        )
    view = layer_view(history, probes)
    finite_rows, first_bad = [], None
    recorded = any(not math.isnan(v) for v in history.loss) or (
        probes is not None and probes.loss_recorded)
    for i, row in enumerate(view.norms):
        ok = all(math.isfinite(v) for v in row) and (
            not recorded or math.isfinite(history.loss[i]))
        if ok:
            finite_rows.append(i)
        elif first_bad is None:
            first_bad = i
    ctx = _Ctx(history, probes, view, finite_rows, first_bad)
    findings = []
    for det in DETECTORS.values():
        f = det(ctx)
        if f is not None:
            findings.append(f)
    codes = {f.code for f in findings}
    if "learning_rate_too_high" in codes:  # the same climb, already explained with its cause
        findings = [f for f in findings if f.code != "loss_divergence"]
    elif "loss_divergence" in codes:  # a climb is neither a stall nor a passing spike
        findings = [f for f in findings if f.code not in ("training_stalled", "loss_spike")]
    summed = loss_scale_finding(ctx, findings)
    if summed is not None:
        findings.append(summed)
    order = {c: k for k, c in enumerate(CODES)}
    findings.sort(key=lambda f: (-f.severity.rank, order.get(f.code, 99)))
    return findings
