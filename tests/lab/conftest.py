"""Shared fixtures for the lab's tests: each experiment's quick result is computed once per
session (per xdist worker) and reused by the tests that read it."""

from __future__ import annotations

from collections.abc import Callable

import pytest

import gradguard.lab as lab

_CACHE: dict[str, lab.ExperimentResult] = {}


@pytest.fixture(scope="session")
def quick_result() -> Callable[[str], lab.ExperimentResult]:
    """``quick_result(name)``: the experiment's quick run with seed 0, cached for the session."""

    def get(name: str) -> lab.ExperimentResult:
        if name not in _CACHE:
            _CACHE[name] = lab.run(name, quick=True, seed=0)
        return _CACHE[name]

    return get
