"""The registry: every experiment module is registered, with a claim in English and Korean, a
source, typed configs and expected run times; lookups and overrides fail with helpful errors."""

from __future__ import annotations

import dataclasses
import pkgutil
import re

import pytest
import torch

import gradguard.lab as lab
import gradguard.lab.experiments as experiments_pkg
from gradguard.lab.registry import ORDER

_HANGUL = re.compile(r"[\uac00-\ud7a3]")

ISSUE_EXPERIMENTS = {
    "sigmoid_derivative", "activations_depth", "init_schemes", "orthogonal_init", "batchnorm",
    "residual", "clipping_rnn", "clipping_methods", "learning_rate", "optimizers",
    "regularization", "dropout_early_stopping", "gated_recurrence", "pretraining",
}


def test_every_module_is_registered() -> None:
    modules = {m.name for m in pkgutil.iter_modules(experiments_pkg.__path__) if not m.name.startswith("_")}
    names = [info.name for info in lab.list_experiments()]
    assert set(names) == modules
    assert names == list(ORDER)
    assert set(names) == ISSUE_EXPERIMENTS


@pytest.mark.parametrize("info", lab.list_experiments(), ids=lambda i: i.name)
def test_info_is_complete(info: lab.ExperimentInfo) -> None:
    for text in (info.title_en, info.claim_en, info.setup_en):
        assert text.strip() and not _HANGUL.search(text)
    for text in (info.title_ko, info.claim_ko, info.setup_ko):
        assert _HANGUL.search(text), f"{info.name}: Korean text expected, got {text!r}"
    assert info.year is not None and 1960 <= info.year <= 2030, info.source
    assert dataclasses.is_dataclass(info.config) and dataclasses.is_dataclass(info.quick_config)
    assert type(info.config) is type(info.quick_config)
    assert type(info.config).__dataclass_params__.frozen
    assert 0 < info.seconds_quick <= info.seconds_full
    assert info.claim("ko") == info.claim_ko and info.claim("en") == info.claim_en
    # The runner and plotter are the module's own functions, documented with a reference.
    module = __import__(f"gradguard.lab.experiments.{info.name}", fromlist=["run"])
    assert module.__doc__ and re.search(r"\b(19|20)\d\d\b", module.__doc__)
    assert info.runner is module.run and info.plotter is module.plot


def test_unknown_name_lists_known_ones() -> None:
    with pytest.raises(ValueError) as exc:
        lab.run("sigmoid_derivatives", quick=True)
    msg = str(exc.value)
    assert "sigmoid_derivatives" in msg and "Did you mean 'sigmoid_derivative'" in msg
    for name in ORDER:
        assert name in msg


def test_overrides_are_checked() -> None:
    cfg = lab.make_config("batchnorm", quick=True, seed=3, steps=50)
    assert cfg.steps == 50 and cfg.seed == 3
    with pytest.raises(ValueError, match="no config field 'stepz'.*steps"):
        lab.make_config("batchnorm", stepz=50)
    with pytest.raises(TypeError, match="`steps`.*int"):
        lab.make_config("batchnorm", steps="50")
    with pytest.raises(ValueError, match="n_seeds"):
        lab.make_config("batchnorm", n_seeds=0)
    with pytest.raises(ValueError, match="seed"):
        lab.make_config("batchnorm", seed=-1)
    assert lab.make_config("orthogonal_init", depths=[2, 4]).depths == (2, 4)


def test_run_restores_threads_and_rng() -> None:
    threads = torch.get_num_threads()
    state = torch.random.get_rng_state()
    lab.run("sigmoid_derivative", quick=True, depths=(2, 4), profile_depth=4, n_seeds=1)
    assert torch.get_num_threads() == threads
    assert torch.equal(torch.random.get_rng_state(), state)
    with pytest.raises(ValueError, match="threads"):
        lab.run("sigmoid_derivative", quick=True, threads=0)


def test_run_is_deterministic() -> None:
    kw = dict(quick=True, seed=1, steps=120, records=6)
    a, b = lab.run("batchnorm", **kw), lab.run("batchnorm", **kw)
    assert a.to_dict() | {"seconds": 0} == b.to_dict() | {"seconds": 0}
