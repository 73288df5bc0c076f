"""What a recorded run went through: the Guard's own columns read back as a story, and findings.

A Guard's history (``guard.history``, or the JSONL a :class:`gradguard.JSONLSink` wrote) holds,
per step, the loss, the gradient norm and what the Guard did: ``skipped``, ``clipped``,
``threshold``, ``lr_scale`` and ``lr``; a rollback shows as the ``step`` column going back. This
module turns that into:

* **incidents**: each stretch of trouble (loss spikes, non-finite steps, skipped steps,
  rollbacks) with what the Guard did about it and whether the loss came back to its level from
  before ("steps 100-104: loss x3, 2 steps skipped, LR x0.5 for 100 steps, rolled back twice;
  back to the pre-spike level by step 140", or "not recovered");
* **level shifts**: a loss or gradient norm that rises and stays up (a divergence), found by the
  shared :func:`gradguard._series.level_shifts` primitive;
* **clipped on every step**: a threshold that binds on (almost) every step means the step size,
  not an outlier, is the problem;
* the per-layer detectors of the doctor (:func:`gradguard.doctor.findings_from_history`), with
  advice that accounts for what the run already did: no "clip" for a run that clipped, no "skip
  non-finite steps" for a run that skipped them.

A history shorter than :data:`MIN_STEPS` rows is not judged: :func:`findings` returns a single
``too_few_steps`` finding, and ``gradguard report`` exits with status 2.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gradguard._series import level_shifts
from gradguard.findings import Finding, Report, Severity
from gradguard.history import SCALAR_FIELDS, History

__all__ = ["MIN_STEPS", "Incident", "findings", "incidents", "read_jsonl", "report", "verdict"]

#: fewer rows than this and the run is not judged ("too few steps to judge")
MIN_STEPS = 20
#: trailing rows whose median is a loss's "level"
LEVEL_WINDOW = 20
#: a loss above this multiple of its level is a spike
SPIKE_FACTOR = 1.5
#: a running median this many times its best level before is a level shift worth telling
SHIFT_FACTOR = 1.3
#: ... and this many times is a divergence (an error when it never comes back)
DIVERGE_FACTOR = 2.0
#: the gradient norm drifts up in healthy runs (as the LR decays); a lasting rise this large is not
DIVERGE_NORM_FACTOR = 10.0
#: a rise still up when the record ends must have lasted this many rows to count
MIN_SHIFT_ROWS = 15
#: trouble rows closer than this belong to one incident
GAP = 10
#: the loss is "back" when its 5-row median is within this share above the level before
BACK_TOL = 0.05
#: the loop's LR above this multiple of its earlier maximum (after the warm-up) is a jump
LR_JUMP = 1.5
#: share of steps clipped from which "clipped on every step" is told
ALWAYS_CLIPPED = 0.95


@dataclass
class Incident:
    """One stretch of trouble and what was done about it (row indices are into the history).

    Attributes:
        first, last: the first and last trouble rows.
        start_step, end_step: the first row's ``step`` and the highest ``step`` in the stretch
            (a rollback sends the ``step`` column back).
        level: the loss's median over the rows before (NaN without a recorded loss).
        loss_factor: the highest loss in the stretch over ``level`` (NaN when not finite).
        skipped, nonfinite: steps skipped / with non-finite gradients or loss in the stretch.
        first_bad_layer: the first tensor, in module order, with a non-finite gradient.
        backoff: the smallest LR multiplier applied from the stretch on (1.0: none).
        backoff_steps: steps run with that back-off.
        rollbacks: rollbacks in the stretch; ``rolled_back_to`` their target steps.
        recovered_at: the step by which the loss was back to ``level``; None if it never was.
        shift: True when the stretch is a level shift (the loss rose and stayed up).
    """

    first: int
    last: int
    start_step: int
    end_step: int
    level: float = math.nan
    loss_factor: float = math.nan
    skipped: int = 0
    nonfinite: int = 0
    first_bad_layer: str = ""
    backoff: float = 1.0
    backoff_steps: int = 0
    rollbacks: int = 0
    rolled_back_to: list[int] = field(default_factory=list)
    recovered_at: int | None = None
    shift: bool = False
    lr_jump: float = 1.0

    @property
    def recovered(self) -> bool:
        return self.recovered_at is not None

    def evidence(self) -> dict[str, Any]:
        return {
            "start_step": self.start_step, "end_step": self.end_step,
            "level": _sig(self.level), "loss_factor": _sig(self.loss_factor),
            "skipped": self.skipped, "nonfinite": self.nonfinite,
            "first_bad_layer": self.first_bad_layer, "backoff": _sig(self.backoff),
            "backoff_steps": self.backoff_steps, "rollbacks": self.rollbacks,
            "rolled_back_to": list(self.rolled_back_to),
            "recovered_at": -1 if self.recovered_at is None else self.recovered_at,
            "recovered": self.recovered, "shift": self.shift, "lr_jump": _sig(self.lr_jump),
            "unaffected": self.recovered_at == self.start_step and not self.skipped,
        }


def _sig(x: float, digits: int = 3) -> float:
    if not math.isfinite(x) or x == 0:
        return x
    return round(x, digits - 1 - int(math.floor(math.log10(abs(x)))))


def _finite(xs: list[float]) -> list[float]:
    return [x for x in xs if math.isfinite(x)]


def _rel_noise(loss: list[float]) -> float:
    """The loss's typical step-to-step scatter relative to its level: the median, over the run,
    of ``|loss - median of its 5-row neighbourhood| / that median`` (robust to spikes)."""
    y = _finite(loss)
    devs = []
    for i in range(2, len(y) - 2):
        m = statistics.median(y[i - 2:i + 3])
        if m > 0:
            devs.append(abs(y[i] - m) / m)
    return statistics.median(devs) if devs else 0.0


def _nonfinite_row(h: History, i: int, loss_recorded: bool) -> bool:
    if not math.isfinite(h.global_norm[i]):
        return True
    return loss_recorded and not math.isnan(h.loss[i]) and not math.isfinite(h.loss[i])


# -- incidents ---------------------------------------------------------------------------------------
def incidents(history: History) -> list[Incident]:
    """Every stretch of trouble in ``history``, in order (see the module docstring)."""
    h = history
    n = len(h)
    if n == 0:
        return []
    loss = list(h.loss)
    recorded = any(not math.isnan(v) for v in loss)
    nonfinite = [_nonfinite_row(h, i, recorded) for i in range(n)]
    rollback = [i > 0 and h.step[i] <= h.step[i - 1] for i in range(n)]
    lr_scale = [v if math.isfinite(v) else 1.0 for v in h.lr_scale]

    def level_before(i: int) -> float:
        prev = _finite([loss[j] for j in range(max(0, i - LEVEL_WINDOW), i)
                        if not h.skipped[j] and not nonfinite[j]])
        return statistics.median(prev) if len(prev) >= 3 else math.nan

    # the factors scale with the loss's own scatter: a noisy loss needs a larger rise to count
    noise = _rel_noise(loss) if recorded else 0.0
    spike_factor = max(SPIKE_FACTOR, 1.0 + 8.0 * noise)
    shift_factor = max(SHIFT_FACTOR, 1.0 + 6.0 * noise)
    back_tol = max(BACK_TOL, 2.0 * noise)
    trouble = [False] * n
    spike = [False] * n
    for i in range(n):
        if h.skipped[i] or nonfinite[i] or rollback[i]:
            trouble[i] = True
        if recorded and math.isfinite(loss[i]):
            lvl = level_before(i)
            spike[i] = math.isfinite(lvl) and lvl > 0 and loss[i] > spike_factor * lvl
    # a high batch or two is the data's tail, not an incident: spikes count three in a row
    # (the ladder's default trigger)
    for i in range(n - 2):
        if spike[i] and spike[i + 1] and spike[i + 2]:
            trouble[i] = trouble[i + 1] = trouble[i + 2] = True
    shifts = _lasting(level_shifts(loss, min_factor=shift_factor, window=5), n) if recorded else []
    shift_rows: set[int] = set()
    for s in shifts:
        stop = s.end if s.end is not None else n - 1
        for i in range(s.start, stop + 1):
            trouble[i] = True
            shift_rows.add(i)

    lr_jumps = _lr_jumps(list(h.lr))
    for a, b, _ in lr_jumps:
        for i in range(a, b + 1):
            trouble[i] = True

    # clusters of trouble rows
    clusters: list[tuple[int, int]] = []
    for i in range(n):
        if not trouble[i]:
            continue
        if clusters and i - clusters[-1][1] <= GAP:
            clusters[-1] = (clusters[-1][0], i)
        else:
            clusters.append((i, i))

    out = []
    for first, last in clusters:
        inc = Incident(first, last, h.step[first], max(h.step[first:last + 1]))
        inc.level = level_before(first)
        peak = max(_finite(loss[first:last + 1]), default=math.nan)
        if math.isfinite(inc.level) and inc.level > 0:
            inc.loss_factor = peak / inc.level
        rows = range(first, last + 1)
        inc.skipped = sum(1 for i in rows if h.skipped[i])
        inc.nonfinite = sum(1 for i in rows if nonfinite[i])
        bad = next((i for i in rows if nonfinite[i]), None)
        if bad is not None and h.layer_norm and h.layer_norm[bad]:
            inc.first_bad_layer = next(
                (name for name, v in zip(h.names, h.layer_norm[bad]) if not math.isfinite(v)), "")
        inc.rollbacks = sum(1 for i in rows if rollback[i])
        inc.rolled_back_to = [h.step[i] for i in rows if rollback[i]]
        # the back-off: from the stretch on, while the multiplier stays below 1
        j = first
        while j < n and (j <= last or lr_scale[j] < 1.0):
            if lr_scale[j] < 1.0:
                inc.backoff = min(inc.backoff, lr_scale[j])
                inc.backoff_steps += 1
            j += 1
        inc.shift = any(i in shift_rows for i in rows)
        inc.lr_jump = max((f for a, b, f in lr_jumps if first <= a <= last), default=1.0)
        if inc.loss_factor <= 1 + back_tol and not inc.skipped and not inc.nonfinite:
            inc.recovered_at = inc.start_step  # the loss never rose: nothing to recover from
        else:
            inc.recovered_at = _recovered_at(h, loss, last, inc.level, nonfinite, recorded, back_tol)
        out.append(inc)
    return out


def _lasting(shifts: list[Any], n: int) -> list[Any]:
    """Drop a rise that is still up at the end of the record but began too recently to judge."""
    return [s for s in shifts if s.end is not None or n - s.start >= MIN_SHIFT_ROWS]


def _lr_jumps(lr: list[float]) -> list[tuple[int, int, float]]:
    """``(first row, last row, factor)`` of each stretch where the recorded LR exceeds ``LR_JUMP``
    times its peak at the end of the warm-up (the opening stretch where it rises every step).
    The peak is not updated afterwards, so a slow creep is caught as surely as a burst."""
    n = len(lr)
    if not any(math.isfinite(v) for v in lr):
        return []
    w = 1
    while w < n and lr[w] > lr[w - 1]:
        w += 1
    top = max(_finite(lr[:w + 1]), default=0.0)
    out = []
    j = w
    while j < n:
        v = lr[j]
        if top > 0 and math.isfinite(v) and v > LR_JUMP * top:
            start = j
            while start - 1 > w and lr[start - 2] < lr[start - 1]:
                start -= 1  # where the rise began (a creep starts well before it crosses)
            base = lr[start - 1] if start > 0 and lr[start - 1] > 0 else top
            end = j
            while end + 1 < n and lr[end + 1] > LR_JUMP * top:
                end += 1
            out.append((start, end, max(_finite(lr[start:end + 1])) / base))
            j = end + 1
            continue
        j += 1
    return out


def _recovered_at(h: History, loss: list[float], last: int, level: float,
                  nonfinite: list[bool], recorded: bool, tol: float) -> int | None:
    """The step from which the loss's 5-row median is back near ``level`` (None: never)."""
    n = len(h)
    if not recorded or not math.isfinite(level):
        # no loss to judge by: back once a finite, applied step follows
        nxt = next((i for i in range(last + 1, n) if not nonfinite[i] and not h.skipped[i]), None)
        return h.step[nxt] if nxt is not None else None
    for i in range(last + 1, n):
        win = _finite(loss[i:i + 5])
        if len(win) >= min(3, n - i) and win and statistics.median(win) <= level * (1 + tol):
            return h.step[i]
    return None


# -- findings ----------------------------------------------------------------------------------------
def findings(history: History, probes: Any = None) -> list[Finding]:
    """Findings for a recorded run: incidents, level shifts, clipping on every step, and the
    doctor's per-layer findings with advice that accounts for what the run did.

    A history with fewer than :data:`MIN_STEPS` rows gives one ``too_few_steps`` finding.
    """
    if not isinstance(history, History):
        raise TypeError(
            f"`history` must be a gradguard History (guard.history or "
            f"gradguard.recorded.read_jsonl(path)), got {type(history).__name__}."
        )
    n = len(history)
    if n < MIN_STEPS:
        return [Finding("too_few_steps", Severity.WARNING, [], [], [],
                        {"steps": n, "needed": MIN_STEPS})]
    from gradguard.doctor import findings_from_history

    out: list[Finding] = []
    incs = incidents(history)
    for inc in incs:
        sev = Severity.INFO if inc.recovered else Severity.ERROR
        remedies = [] if inc.recovered else _next_step_remedies(history)
        layers = [inc.first_bad_layer] if inc.first_bad_layer else []
        out.append(Finding("incident", sev, layers, [], remedies, inc.evidence()))
    out.extend(_level_shift_findings(history))
    clip = _clipped_every_step(history)
    if clip is not None:
        out.append(clip)
    out.extend(_accounted(findings_from_history(history, probes).findings, history, incs))
    out.sort(key=lambda f: -f.severity.rank)
    return out


def _level_shift_findings(h: History) -> list[Finding]:
    out = []
    for series, values, factor in (("loss", h.loss, DIVERGE_FACTOR),
                                   ("grad_norm", h.global_norm, DIVERGE_NORM_FACTOR)):
        for s in _lasting(level_shifts(values, min_factor=factor, window=5), len(values)):
            if s.end is not None:
                continue  # it came back: the incident tells it
            ev = {"series": series, "start_step": h.step[s.start], "before": _sig(s.before),
                  "after": _sig(s.after), "factor": _sig(s.factor)}
            sev = Severity.ERROR if series == "loss" else Severity.WARNING
            out.append(Finding("level_shift", sev, [], ["high_learning_rate"],
                               _next_step_remedies(h), ev))
    return out


def _did(h: History) -> dict[str, bool]:
    n = len(h)
    recorded = any(not math.isnan(v) for v in h.loss)
    nonfinite = [_nonfinite_row(h, i, recorded) for i in range(n)]
    return {
        "clipped": any(h.clipped) or any(math.isfinite(t) for t in h.threshold),
        "skipped_nonfinite": any(s and b for s, b in zip(h.skipped, nonfinite)),
        "nonfinite_applied": any(b and not s for s, b in zip(h.skipped, nonfinite)),
        "skipped_spikes": any(s and not b for s, b in zip(h.skipped, nonfinite)),
        "backed_off": any(v < 1.0 for v in h.lr_scale if math.isfinite(v)),
    }


def _next_step_remedies(h: History) -> list[str]:
    """What to try next, given what the run already did (never what it already does)."""
    did = _did(h)
    out = ["lower_learning_rate"]
    if not did["clipped"]:
        out.append("gradient_clipping")
    out.append("lr_schedule")
    if not did["skipped_nonfinite"] and did["nonfinite_applied"]:
        out.append("skip_nonfinite_steps")
    return out


def _clipped_every_step(h: History) -> Finding | None:
    rows = [i for i in range(len(h)) if math.isfinite(h.global_norm[i]) and not h.skipped[i]]
    if len(rows) < MIN_STEPS:
        return None
    clipped = [i for i in rows if h.clipped[i]]
    share = len(clipped) / len(rows)
    if share < ALWAYS_CLIPPED:
        return None
    thr = _finite([h.threshold[i] for i in clipped])
    norms = _finite([h.global_norm[i] for i in clipped])
    ev = {"share": _sig(share), "threshold": _sig(statistics.median(thr)) if thr else math.nan,
          "median_norm": _sig(statistics.median(norms)) if norms else math.nan,
          "steps": len(rows)}
    return Finding("clipped_every_step", Severity.WARNING, [], ["high_learning_rate"],
                   ["lower_learning_rate", "lr_schedule"], ev)


def _accounted(found: list[Finding], h: History, incs: list[Incident]) -> list[Finding]:
    """The doctor's findings, minus what the incidents already tell, with remedies the run does
    not already apply."""
    did = _did(h)
    out = []
    for f in found:
        if f.code == "loss_spike":
            continue  # incidents tell spikes (with what the Guard did); a lone high batch is none
        if f.code in ("nonfinite_gradients", "nonfinite_loss") and not did["nonfinite_applied"] \
                and did["skipped_nonfinite"]:
            continue  # every non-finite step was skipped: the incident tells it
        rem = list(f.remedies)
        if did["clipped"] and "gradient_clipping" in rem:
            rem.remove("gradient_clipping")
            if "lower_learning_rate" not in rem:
                rem.insert(0, "lower_learning_rate")
        if did["skipped_nonfinite"] and "skip_nonfinite_steps" in rem:
            rem.remove("skip_nonfinite_steps")
        if did["skipped_spikes"] and "spike_skipping" in rem:
            rem.remove("spike_skipping")
        f.remedies = rem
        out.append(f)
    return out


def report(history: History, probes: Any = None, **metadata: Any) -> Report:
    """A :class:`~gradguard.findings.Report` of :func:`findings` (what ``gradguard report`` and
    the HTML report show)."""
    fs = findings(history, probes)
    md = {"mode": "history", "steps": len(history), "tensors": len(history.names)}
    md.update(metadata)
    if any(f.code == "too_few_steps" for f in fs):
        md["too_few_steps"] = True
    return Report(findings=fs, metadata=md)


def verdict(history: History, lang: str = "en") -> str:
    """One line: every incident and level shift, or that there is nothing to report."""
    from gradguard import messages as M

    fs = findings(history)
    told = [f for f in fs if f.code in ("too_few_steps", "incident", "level_shift",
                                        "clipped_every_step")]
    if not fs:
        return M.story_ui("nothing", lang)
    if not told:
        return "; ".join(f.code for f in fs)
    return " | ".join(M.finding_text(f, lang) for f in told)


# -- reading a JSONL file as a stream ------------------------------------------------------------------
def read_jsonl(path: str | Path) -> History:
    """Read a :class:`gradguard.JSONLSink` file line by line (memory: the kept columns only).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: a line is not a JSON object with ``step`` (the message names the line).
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(
            f"`path` {str(p)!r} does not exist; pass the JSONL file a JSONLSink wrote."
        )

    def records() -> Iterator[dict[str, Any]]:
        with open(p, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(
                        f"{p}:{lineno}: not JSON ({e.msg} at column {e.colno}); a gradguard "
                        "history has one JSON object per line (what JSONLSink writes)."
                    ) from None
                if not isinstance(rec, dict) or "step" not in rec:
                    raise ValueError(
                        f"{p}:{lineno}: not a gradguard history record (a JSON object with "
                        f"'step', {', '.join(repr(f) for f in SCALAR_FIELDS[:2])} and "
                        "'layer_norm'); pass the file a JSONLSink wrote."
                    )
                yield rec

    try:
        return History.from_records(records())
    except (TypeError, KeyError) as e:
        raise ValueError(f"{p}: not a gradguard history: {e}") from None
