"""The lab's registry: one :class:`ExperimentInfo` per claim, in the order the report shows them.

Each module in ``gradguard.lab.experiments`` defines ``INFO``; this module imports them in
:data:`ORDER` and checks that names are unique and that every module is listed.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

from gradguard.lab._result import Check, ExperimentResult

__all__ = ["ORDER", "ExperimentInfo", "Outcome", "get", "registered"]


class Outcome(NamedTuple):
    """What an experiment's runner returns: the checks of its claim and the measured data."""

    checks: list[Check]
    data: dict[str, Any]


@dataclass(frozen=True)
class ExperimentInfo:
    """Everything the lab knows about one experiment before running it.

    Attributes:
        name: the registered name (``gradguard lab NAME``).
        title_en, title_ko: a short title.
        claim_en, claim_ko: the textbook claim that the experiment tests.
        source: the paper (authors, year, title, venue, the figure or table reproduced).
        setup_en, setup_ko: what is run, in one or two sentences.
        config: the full-run configuration (a frozen dataclass instance).
        quick_config: the quick configuration (seconds; used by the tests).
        seconds_quick, seconds_full: expected wall time on one CPU core (measured on a shared
            2-core machine).
        runner: ``runner(config) -> Outcome``.
        plotter: ``plotter(result) -> list[matplotlib Figure]``.
    """

    name: str
    title_en: str
    title_ko: str
    claim_en: str
    claim_ko: str
    source: str
    setup_en: str
    setup_ko: str
    config: Any
    quick_config: Any
    seconds_quick: float
    seconds_full: float
    runner: Callable[[Any], Outcome]
    plotter: Callable[[ExperimentResult], list[Any]]

    def __post_init__(self) -> None:
        for label, cfg in (("config", self.config), ("quick_config", self.quick_config)):
            if not dataclasses.is_dataclass(cfg) or isinstance(cfg, type):
                raise TypeError(f"`{label}` of experiment {self.name!r} must be a dataclass instance.")
            if "seed" not in {f.name for f in dataclasses.fields(cfg)}:
                raise TypeError(f"`{label}` of experiment {self.name!r} needs a `seed` field.")

    @property
    def year(self) -> int | None:
        """The first four-digit year in :attr:`source`."""
        import re

        m = re.search(r"\b(19|20)\d\d\b", self.source)
        return int(m.group(0)) if m else None

    def claim(self, lang: str = "en") -> str:
        return self.claim_ko if lang == "ko" else self.claim_en

    def title(self, lang: str = "en") -> str:
        return self.title_ko if lang == "ko" else self.title_en

    def setup(self, lang: str = "en") -> str:
        return self.setup_ko if lang == "ko" else self.setup_en


ORDER: tuple[str, ...] = (
    "sigmoid_derivative",
    "activations_depth",
    "init_schemes",
    "orthogonal_init",
    "batchnorm",
    "residual",
    "clipping_rnn",
    "clipping_methods",
    "learning_rate",
    "optimizers",
    "regularization",
    "dropout_early_stopping",
    "gated_recurrence",
    "pretraining",
)

_REGISTRY: dict[str, ExperimentInfo] | None = None


def registered() -> dict[str, ExperimentInfo]:
    """Every registered experiment by name, in :data:`ORDER` (modules are imported on first use)."""
    global _REGISTRY
    if _REGISTRY is None:
        reg: dict[str, ExperimentInfo] = {}
        for name in ORDER:
            info = importlib.import_module(f"gradguard.lab.experiments.{name}").INFO
            if info.name != name:
                raise RuntimeError(f"experiments/{name}.py registers the name {info.name!r}.")
            reg[name] = info
        _REGISTRY = reg
    return _REGISTRY


def get(name: str) -> ExperimentInfo:
    """The experiment called ``name``; an unknown name raises ``ValueError`` listing the known ones."""
    reg = registered()
    if not isinstance(name, str) or name not in reg:
        import difflib

        close = difflib.get_close_matches(str(name), list(reg), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(
            f"unknown experiment {name!r}.{hint} Known experiments: {', '.join(reg)}. "
            "(`gradguard lab --list` shows them with their claims.)"
        )
    return reg[name]
