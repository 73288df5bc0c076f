"""Result types of the lab: a claim is split into checks, and the verdict is computed from them.

A :class:`Check` is one measurable part of a claim ("a 30-layer ReLU net with He init ends with a
lower training loss than with Xavier init") together with the numbers that decided it. The verdict
of an experiment is never written by hand: :func:`verdict_from` derives it from the checks.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

__all__ = ["VERDICTS", "Check", "ExperimentResult", "Verdict", "verdict_from"]

Verdict = Literal["holds", "partly holds", "does not hold"]
VERDICTS: tuple[Verdict, ...] = ("holds", "partly holds", "does not hold")


@dataclass(frozen=True)
class Check:
    """One part of a claim, tested against the numbers.

    Attributes:
        key: a stable identifier, e.g. ``"he_beats_xavier"``.
        passed: whether the numbers support this part of the claim.
        statement_en, statement_ko: the part of the claim that is tested.
        evidence_en, evidence_ko: what was measured, with the numbers.
        brief: the deciding numbers in a few symbols, e.g. ``"loss He 0.07 < Xavier 2.30"``.
        figures: the deciding numbers by name (finite floats, or None where a run gave NaN).
    """

    key: str
    passed: bool
    statement_en: str
    statement_ko: str
    evidence_en: str
    evidence_ko: str
    brief: str
    figures: dict[str, float | None] = field(default_factory=dict)


def verdict_from(checks: list[Check]) -> Verdict:
    """``holds`` if every check passed, ``does not hold`` if none did, else ``partly holds``."""
    if not checks:
        raise ValueError("`checks` is empty: an experiment must test at least one part of its claim.")
    passed = sum(c.passed for c in checks)
    if passed == len(checks):
        return "holds"
    if passed == 0:
        return "does not hold"
    return "partly holds"


def _clean(value: Any) -> Any:
    """Make ``value`` strict JSON: NaN/Inf become None, tuples become lists, numpy scalars floats."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return value
    if hasattr(value, "item") and not isinstance(value, (dict, list)):  # numpy / torch scalars
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    return value


@dataclass
class ExperimentResult:
    """What one lab experiment returns; it round-trips through JSON.

    Attributes:
        name: the experiment's registered name.
        verdict: ``holds`` / ``partly holds`` / ``does not hold``, from :func:`verdict_from`.
        checks: the parts of the claim and the numbers that decided each.
        config: the configuration that ran (a dict of the experiment's config dataclass).
        data: the measured series and tables that the plots and the report show (JSON values).
        seconds: wall time of the run.
        quick: whether the quick configuration was used.
    """

    name: str
    verdict: Verdict
    checks: list[Check]
    config: dict[str, Any]
    data: dict[str, Any]
    seconds: float
    quick: bool

    @property
    def figures(self) -> dict[str, float | None]:
        """The deciding numbers of every check, by name."""
        out: dict[str, float | None] = {}
        for c in self.checks:
            out.update(c.figures)
        return out

    @property
    def headline(self) -> str:
        """The deciding numbers in one line: ``ok``/``x`` per check, then its brief."""
        return "; ".join(("ok " if c.passed else "x ") + c.brief for c in self.checks)

    def to_dict(self) -> dict[str, Any]:
        """A strict-JSON dict (NaN and Inf become None)."""
        return _clean(asdict(self))

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, ensure_ascii=False, allow_nan=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ExperimentResult:
        """Rebuild a result from :meth:`to_dict`'s output."""
        missing = {"name", "verdict", "checks", "config", "data", "seconds", "quick"} - set(d)
        if missing:
            raise ValueError(
                f"not an ExperimentResult dict: missing {sorted(missing)}; pass the output of "
                "ExperimentResult.to_dict() (one entry of results.json's 'results')."
            )
        if d["verdict"] not in VERDICTS:
            raise ValueError(f"`verdict` must be one of {VERDICTS}, got {d['verdict']!r}.")
        checks = [Check(**c) for c in d["checks"]]
        return cls(
            name=d["name"], verdict=d["verdict"], checks=checks, config=dict(d["config"]),
            data=dict(d["data"]), seconds=float(d["seconds"]), quick=bool(d["quick"]),
        )

    @classmethod
    def from_json(cls, text: str) -> ExperimentResult:
        return cls.from_dict(json.loads(text))
