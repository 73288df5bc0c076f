"""Result types: the verdict follows from the checks, and results round-trip through strict JSON."""

from __future__ import annotations

import json
import math

import pytest

from gradguard.lab import Check, ExperimentResult, verdict_from


def _check(passed: bool, value: float = 1.0) -> Check:
    return Check("k", passed, "s", "s_ko", "e", "e_ko", "b", {"x": value})


@pytest.mark.parametrize(
    ("passes", "verdict"),
    [((True,), "holds"), ((True, True), "holds"), ((False,), "does not hold"),
     ((False, False), "does not hold"), ((True, False), "partly holds"), ((False, True, True), "partly holds")],
)
def test_verdict_from_checks(passes: tuple[bool, ...], verdict: str) -> None:
    assert verdict_from([_check(p) for p in passes]) == verdict


def test_verdict_needs_checks() -> None:
    with pytest.raises(ValueError, match="checks"):
        verdict_from([])


def test_round_trip_with_nan() -> None:
    r = ExperimentResult("batchnorm", "partly holds", [_check(True, math.nan), _check(False)],
                         {"steps": 3, "depths": (1, 2)}, {"curve": [1.0, math.inf, 0.5]}, 1.5, True)
    text = r.to_json()
    json.loads(text)  # strict JSON: NaN and Inf became null
    assert "NaN" not in text and "Infinity" not in text
    back = ExperimentResult.from_json(text)
    assert back.to_dict() == r.to_dict()
    assert back.checks[0].figures["x"] is None
    assert back.headline == "ok b; x b"


def test_from_dict_names_what_is_missing() -> None:
    with pytest.raises(ValueError, match="missing.*verdict"):
        ExperimentResult.from_dict({"name": "x"})
