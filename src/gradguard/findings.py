"""What the doctor found: :class:`Finding`, :class:`Trial` and the :class:`Report` that holds them.

Everything here is plain data (codes, layer names, numbers) that round-trips through JSON. The
words a person reads come from :mod:`gradguard.messages` by code, in English or Korean, when a
report is rendered; nothing in this module holds user-facing text of its own.

Rendering depends on findings, never the reverse: this module imports neither
:mod:`gradguard.messages` nor :mod:`gradguard.report`. Those install their renderers here
(:func:`set_renderer`) when they are imported, which ``import gradguard`` does; the convenience
methods (``Finding.title``, ``Report.render``, ``Report.to_html``, ...) call them.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["Finding", "HistorySummary", "Report", "Severity", "Trial", "set_renderer"]

REPORT_FORMAT = "gradguard.report/1"

#: the renderers the rendering layers installed: "title", "explain", "text", "html"
_RENDERERS: dict[str, Callable[..., str]] = {}


def set_renderer(kind: str, fn: Callable[..., str]) -> None:
    """Install the function behind ``Finding.title`` (``"title"``: ``fn(code, lang)``),
    ``Finding.explain`` (``"explain"``: ``fn(finding, lang)``), ``Report.render`` (``"text"``:
    ``fn(report, lang)``) or ``Report.to_html`` (``"html"``: ``fn(report, lang=lang)``).
    :mod:`gradguard.messages` and :mod:`gradguard.report.plots` call it when imported."""
    if kind not in ("title", "explain", "text", "html"):
        raise ValueError(f"`kind` must be 'title', 'explain', 'text' or 'html', got {kind!r}.")
    _RENDERERS[kind] = fn


def _renderer(kind: str) -> Callable[..., str]:
    fn = _RENDERERS.get(kind)
    if fn is None:  # pragma: no cover - `import gradguard` installs every renderer
        raise RuntimeError(f"no {kind!r} renderer installed: import gradguard first.")
    return fn


class Severity(str, Enum):
    """How bad a finding is: ``info`` (worth knowing), ``warning`` (hurts training), ``error``
    (training cannot work as it is)."""

    INFO = "info"
    WARNING = "warning"
    ERROR = "error"

    @property
    def rank(self) -> int:
        return {"info": 0, "warning": 1, "error": 2}[self.value]


_T = TypeVar("_T", bound="_FlatFields")


class _FlatFields:
    """``to_dict``/``from_dict`` for a dataclass whose fields all hold plain values (numbers,
    strings, lists): each field through JSON's stand-ins for NaN and infinity, unknown keys
    ignored on the way back."""

    def to_dict(self) -> dict[str, Any]:
        return {k: _jsonable(v) for k, v in self.__dict__.items()}

    @classmethod
    def from_dict(cls: type[_T], d: dict[str, Any]) -> _T:
        fields = cls.__dataclass_fields__  # type: ignore[attr-defined]
        kw = {k: _unjson(v) for k, v in d.items() if k in fields}
        return cls(**kw)


@dataclass
class Trial(_FlatFields):
    """The measured effect of one remedy tried on a fresh copy of the model.

    Attributes:
        remedy: the remedy code (see :mod:`gradguard.messages`).
        applied: False when the remedy could not be applied to this model; ``note`` says why.
        note: a message code explaining a remedy that was not applied (``""`` otherwise).
        changed: what the treatment changed (e.g. the layers re-initialised), for the reader.
        flow_ratio: median gradient norm of the first weight layer over the last's.
        time_ratio: for a recurrent layer, the gradient reaching its first time step over the
            last's (NaN without one).
        final_loss: mean loss over the last few steps (NaN when not trained or diverged).
        findings: codes of the findings that remain after the remedy.
        resolved: codes of the baseline findings this remedy made disappear.
        introduced: codes of findings that appeared with the remedy and not before.
        improved: whether the remedy helped (``verdict == "helps"``).
        score: the ranking key (higher is better); trials are sorted by it.
        loss_curve: the loss at each step of the trial run.
        verdict: ``"helps"`` (the loss ended at least 10 % and two standard errors below the
            untreated run's), ``"worse"`` (the same the other way, or it diverged), ``"no_gain"``;
            ``""`` when not applied.
        relative_loss: the trial's loss over the untreated run's, on the last quarter of the
            same steps (NaN when not comparable).
        factor: the learning-rate factor chosen by a learning-rate search (NaN otherwise).
    """

    remedy: str
    applied: bool = True
    note: str = ""
    changed: list[str] = field(default_factory=list)
    flow_ratio: float = math.nan
    time_ratio: float = math.nan
    final_loss: float = math.nan
    findings: list[str] = field(default_factory=list)
    resolved: list[str] = field(default_factory=list)
    introduced: list[str] = field(default_factory=list)
    improved: bool = False
    score: float = -math.inf
    loss_curve: list[float] = field(default_factory=list)
    verdict: str = ""
    relative_loss: float = math.nan
    factor: float = math.nan


@dataclass
class Finding:
    """One named problem.

    Attributes:
        code: a finding code (``"vanishing_gradients"``, ...; see DESIGN.md).
        severity: :class:`Severity`.
        layers: qualified names of the layers concerned, in module order.
        causes: cause codes, most likely first.
        remedies: remedy codes, most promising first (re-ranked by measurement when tried).
        evidence: the numbers that triggered it (floats, ints, strings, lists of them).
        trials: remedy trials that bear on this finding (filled by ``diagnose(try_remedies=True)``).
    """

    code: str
    severity: Severity
    layers: list[str] = field(default_factory=list)
    causes: list[str] = field(default_factory=list)
    remedies: list[str] = field(default_factory=list)
    evidence: dict[str, Any] = field(default_factory=dict)
    trials: list[Trial] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.severity = Severity(self.severity)

    def title(self, lang: str = "en") -> str:
        """The finding's title in ``lang`` (``"en"`` or ``"ko"``)."""
        return _renderer("title")(self.code, lang)

    def explain(self, lang: str = "en") -> str:
        """The explanation with this finding's evidence filled in."""
        return _renderer("explain")(self, lang)

    def to_dict(self) -> dict[str, Any]:
        return {
            "code": self.code,
            "severity": self.severity.value,
            "layers": list(self.layers),
            "causes": list(self.causes),
            "remedies": list(self.remedies),
            "evidence": _jsonable(self.evidence),
            "trials": [t.to_dict() for t in self.trials],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Finding:
        return cls(
            code=d["code"],
            severity=Severity(d["severity"]),
            layers=list(d.get("layers", [])),
            causes=list(d.get("causes", [])),
            remedies=list(d.get("remedies", [])),
            evidence=_unjson(d.get("evidence", {})),
            trials=[Trial.from_dict(t) for t in d.get("trials", [])],
        )


@dataclass
class HistorySummary(_FlatFields):
    """The part of a run's history that a report shows, aggregated per layer.

    Attributes:
        layers: layer names (modules owning parameters), in depth order.
        step: the step of each row.
        loss: the loss at each row (NaN where not recorded).
        global_norm: the global gradient norm at each row.
        layer_norm: per row, the gradient norm of each layer (``len(layers)`` floats).
        update_ratio: per row, the median update/weight ratio over tensors (NaN if unmeasured).
    """

    layers: list[str] = field(default_factory=list)
    step: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    global_norm: list[float] = field(default_factory=list)
    layer_norm: list[list[float]] = field(default_factory=list)
    update_ratio: list[float] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.step)

    def layer_median(self) -> list[float]:
        """Per layer, the median finite gradient norm over rows (NaN where none is finite)."""
        out = []
        for j in range(len(self.layers)):
            vals = sorted(r[j] for r in self.layer_norm if math.isfinite(r[j]))
            out.append(vals[len(vals) // 2] if vals else math.nan)
        return out


@dataclass
class Report:
    """The doctor's report: findings, the run they came from, remedy trials, and metadata.

    An empty ``findings`` list means the network looks healthy.

    Attributes:
        findings: :class:`Finding` objects, most severe first.
        history: :class:`HistorySummary` of the instrumented run (per-layer norms, loss).
        trials: every remedy tried, best first (empty unless ``try_remedies=True``).
        metadata: facts about the run (model class, parameter count, steps, optimizer, ...).

    Example:
        >>> from gradguard.findings import Report
        >>> r = Report(findings=[])
        >>> Report.from_json(r.to_json()).findings
        []
    """

    findings: list[Finding] = field(default_factory=list)
    history: HistorySummary = field(default_factory=HistorySummary)
    trials: list[Trial] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def healthy(self) -> bool:
        """True when there is no finding."""
        return not self.findings

    @property
    def codes(self) -> list[str]:
        """The finding codes, in report order."""
        return [f.code for f in self.findings]

    @property
    def prescription(self) -> Trial | None:
        """The remedy trial that helped most, whichever finding proposed it (None when no trial
        helped)."""
        return next((t for t in self.trials if t.applied and t.verdict == "helps"), None)

    def finding(self, code: str) -> Finding | None:
        """The first finding with ``code``, or None."""
        return next((f for f in self.findings if f.code == code), None)

    # -- text -----------------------------------------------------------------------------------
    def render(self, lang: str | None = None) -> str:
        """The report as plain text for a terminal, in ``lang`` (``"en"`` or ``"ko"``; default:
        the language given to ``diagnose``, else English).

        The library never prints: print the returned string yourself (the CLI does).
        """
        return _renderer("text")(self, lang)

    # -- JSON -----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": REPORT_FORMAT,
            "findings": [f.to_dict() for f in self.findings],
            "history": self.history.to_dict(),
            "trials": [t.to_dict() for t in self.trials],
            "metadata": _jsonable(self.metadata),
        }

    def to_json(self, path: str | Path | None = None, *, indent: int | None = 2) -> str:
        """The report as JSON (non-finite floats as the strings ``"nan"``, ``"inf"``, ``"-inf"``).

        Args:
            path: also write the JSON to this file when given.
            indent: JSON indentation. Default: 2.
        """
        s = json.dumps(self.to_dict(), indent=indent, ensure_ascii=False)
        if path is not None:
            Path(path).write_text(s, encoding="utf-8")
        return s

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Report:
        fmt = d.get("format")
        if fmt != REPORT_FORMAT:
            raise ValueError(
                f"not a gradguard report: 'format' is {fmt!r}, expected {REPORT_FORMAT!r}. "
                "Pass the text that Report.to_json() wrote."
            )
        return cls(
            findings=[Finding.from_dict(f) for f in d.get("findings", [])],
            history=HistorySummary.from_dict(d.get("history", {})),
            trials=[Trial.from_dict(t) for t in d.get("trials", [])],
            metadata=_unjson(d.get("metadata", {})),
        )

    @classmethod
    def from_json(cls, s: str | bytes) -> Report:
        """Rebuild a report from :meth:`to_json` output (a JSON string, not a path)."""
        if isinstance(s, (bytes, bytearray)):
            s = s.decode("utf-8")
        if not isinstance(s, str):
            raise TypeError(f"`s` must be a JSON string, got {type(s).__name__}.")
        try:
            d = json.loads(s)
        except json.JSONDecodeError as e:
            hint = " It looks like a path: pass Path(p).read_text()." if len(s) < 260 else ""
            raise ValueError(f"`s` is not valid JSON ({e}).{hint}") from None
        if not isinstance(d, dict):
            raise ValueError("`s` must hold a JSON object written by Report.to_json().")
        return cls.from_dict(d)

    # -- HTML -----------------------------------------------------------------------------------
    def to_html(self, path: str | Path | None = None, *, lang: str | None = None) -> str:
        """One self-contained HTML page (inline CSS, PNG data URIs): findings, trials and plots.

        Args:
            path: write the page to this file when given.
            lang: ``"en"`` or ``"ko"`` (default: the language given to ``diagnose``, else English).

        Returns:
            The HTML text.
        """
        text = _renderer("html")(self, lang=lang)
        if path is not None:
            Path(path).write_text(text, encoding="utf-8")
        return text


def _jsonable(v: Any) -> Any:
    if isinstance(v, bool) or v is None or isinstance(v, (int, str)):
        return v
    if isinstance(v, float):
        if math.isfinite(v):
            return v
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
    if isinstance(v, Enum):
        return v.value
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if hasattr(v, "item"):  # numpy / torch scalars
        return _jsonable(v.item())
    return str(v)


_NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def _unjson(v: Any) -> Any:
    if isinstance(v, str) and v in _NONFINITE:
        return _NONFINITE[v]
    if isinstance(v, dict):
        return {k: _unjson(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_unjson(x) for x in v]
    return v
