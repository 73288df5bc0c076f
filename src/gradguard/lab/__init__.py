"""The lab: small, honest experiments that reproduce the textbook claims about vanishing and
exploding gradients, each with a verdict computed from its own numbers.

Example:
    >>> import gradguard.lab as lab
    >>> [info.name for info in lab.list_experiments()][:2]
    ['sigmoid_derivative', 'activations_depth']
    >>> result = lab.run("sigmoid_derivative", quick=True)   # doctest: +SKIP
    >>> result.verdict, result.headline                       # doctest: +SKIP

Every experiment has a typed config (a frozen dataclass), a quick mode (seconds) and a full mode
(for the report); :func:`run` accepts any config field as a keyword override. Results round-trip
through JSON (:meth:`ExperimentResult.to_json`, :func:`load_results`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from gradguard.lab._result import VERDICTS, Check, ExperimentResult, Verdict, verdict_from
from gradguard.lab.registry import ExperimentInfo, get, registered

__all__ = [
    "VERDICTS",
    "Check",
    "ExperimentInfo",
    "ExperimentResult",
    "Verdict",
    "get_experiment",
    "list_experiments",
    "load_results",
    "make_config",
    "run",
    "run_all",
    "verdict_from",
]

log = logging.getLogger(__name__)


def list_experiments() -> list[ExperimentInfo]:
    """Every registered experiment, in the report's order."""
    return list(registered().values())


def get_experiment(name: str) -> ExperimentInfo:
    """The :class:`ExperimentInfo` registered as ``name`` (``ValueError`` lists the known names)."""
    return get(name)


def _coerce(name: str, field: dataclasses.Field, default: Any, value: Any, exp: str) -> Any:
    """Check an override against the type of the field's current value."""
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, tuple):
        ok = isinstance(value, (list, tuple))
        value = tuple(value) if ok else value
    elif isinstance(default, str):
        ok = isinstance(value, str)
    else:
        ok = True
    if not ok:
        raise TypeError(
            f"override `{name}` of experiment {exp!r} must be a {type(default).__name__} like its "
            f"default {default!r}, got {type(value).__name__}: {value!r:.80}."
        )
    return value


def make_config(name: str, quick: bool = False, seed: int = 0, **overrides: Any) -> Any:
    """The configuration :func:`run` would use: the full or quick config with ``seed`` and overrides."""
    info = get(name)
    base = info.quick_config if quick else info.config
    fields = {f.name: f for f in dataclasses.fields(base)}
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"`seed` must be an int >= 0, got {seed!r}.")
    changes: dict[str, Any] = {"seed": seed}
    for key, value in overrides.items():
        if key not in fields:
            raise ValueError(
                f"experiment {name!r} has no config field {key!r}; its fields are "
                f"{', '.join(fields)}."
            )
        changes[key] = _coerce(key, fields[key], getattr(base, key), value, name)
    if "n_seeds" in changes and changes["n_seeds"] < 1:
        raise ValueError(f"`n_seeds` must be >= 1, got {changes['n_seeds']}.")
    return dataclasses.replace(base, **changes)


def run(name: str, quick: bool = False, seed: int = 0, *, threads: int | None = 1,
        **overrides: Any) -> ExperimentResult:
    """Run one experiment and return its result, with a verdict computed from the numbers.

    Deterministic given ``seed``: the run uses its own torch RNG state (the caller's is restored
    afterwards) and, by default, one CPU thread (restored afterwards too). The lab's models are
    tiny, so one thread is also the fastest: with more, the threads' start-up and synchronisation
    cost more than the arithmetic they share.

    Args:
        name: a registered experiment (see :func:`list_experiments`).
        quick: use the quick configuration (seconds) instead of the full one.
        seed: the base seed; experiments with ``n_seeds`` use ``seed, seed+1, ...``.
        threads: torch's intra-op threads during the run; None leaves the setting alone.
        **overrides: any field of the experiment's config, e.g. ``n_seeds=3`` or ``steps=400``.

    Returns:
        ExperimentResult: verdict, checks with the deciding numbers, config, data and timing.

    Raises:
        ValueError: an unknown experiment name (the message lists the known ones) or config field.
    """
    info = get(name)
    cfg = make_config(name, quick, seed, **overrides)
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"`threads` must be an int >= 1 or None, got {threads!r}.")
    log.info("lab: running %s (%s)", name, "quick" if quick else "full")
    previous_threads = torch.get_num_threads()
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            t0 = time.perf_counter()
            outcome = info.runner(cfg)
            seconds = time.perf_counter() - t0
    finally:
        torch.set_num_threads(previous_threads)
    return ExperimentResult(
        name=name, verdict=verdict_from(outcome.checks), checks=list(outcome.checks),
        config=dataclasses.asdict(cfg), data=outcome.data, seconds=seconds, quick=quick,
    )


def run_all(
    names: Sequence[str] | None = None, quick: bool = False, seed: int = 0,
    n_seeds: int | None = None, threads: int | None = 1,
    on_start: Callable[[ExperimentInfo], None] | None = None,
    on_result: Callable[[ExperimentResult], None] | None = None,
) -> list[ExperimentResult]:
    """Run several experiments (all of them by default) in the registry's order.

    Args:
        names: the experiments to run; None runs every registered one.
        quick: use the quick configurations.
        seed: base seed for every experiment.
        n_seeds: override the number of seeds of the experiments that repeat over seeds.
        threads: torch's intra-op threads during each run (see :func:`run`).
        on_start, on_result: callbacks around each experiment (the CLI's progress bar uses them).
    """
    infos = list_experiments() if names is None else [get(n) for n in names]
    results = []
    for info in infos:
        if on_start is not None:
            on_start(info)
        extra: dict[str, Any] = {}
        cfg = info.quick_config if quick else info.config
        if n_seeds is not None and hasattr(cfg, "n_seeds"):
            extra["n_seeds"] = n_seeds
        result = run(info.name, quick=quick, seed=seed, threads=threads, **extra)
        results.append(result)
        if on_result is not None:
            on_result(result)
    return results


def load_results(path: str | Path) -> list[ExperimentResult]:
    """Read the ``results.json`` written by ``gradguard lab`` back into results."""
    doc = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(doc, dict) or "results" not in doc:
        raise ValueError(f"{path} is not a gradguard lab results.json (no 'results' list).")
    return [ExperimentResult.from_dict(d) for d in doc["results"]]
