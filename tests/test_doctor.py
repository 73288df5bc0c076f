"""diagnose(): the gallery of sick and healthy networks, the no-side-effects contract, remedies."""

from __future__ import annotations

import copy
import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradguard as gg
from gradguard.doctor.detectors import CAUSES, REMEDIES
from gradguard.doctor import activation_map, prescribe

from tests.gallery import Case, cases, digit_batches, mlp

torch.set_num_threads(1)

CASES = cases()
SICK = [c for c in CASES if c.code is not None]
HEALTHY = [c for c in CASES if c.code is None]


def _diagnose(case: Case, **kw: object) -> gg.Report:
    model, loss_fn, data, opt = case.build()
    return gg.diagnose(model, loss_fn, data, opt, steps=case.steps, **kw)


@pytest.mark.parametrize("case", SICK, ids=lambda c: c.name)
def test_sick_network_is_named(case: Case) -> None:
    report = _diagnose(case)
    f = report.finding(case.code)
    assert f is not None, f"{case.name}: expected {case.code}, got {report.codes}"
    for layer in case.include:
        assert layer in f.layers, f"{case.name}: {layer} not in {f.layers}"
    for layer in case.exclude:
        assert layer not in f.layers, f"{case.name}: {layer} wrongly in {f.layers}"
    assert set(case.remedy) & set(f.remedies[:3]), (
        f"{case.name}: none of {case.remedy} in the top remedies {f.remedies[:3]}")
    assert f.causes, "every finding names at least one cause"
    for g in report.findings:
        assert set(g.causes) <= set(CAUSES) and set(g.remedies) <= set(REMEDIES), g.code
    # layers are reported in module order
    order = {n: i for i, n in enumerate(n for n, _ in case.build()[0].named_modules())}
    ranks = [order[n] for n in f.layers if n in order]
    assert ranks == sorted(ranks)


@pytest.mark.parametrize("case", HEALTHY, ids=lambda c: c.name)
def test_healthy_network_has_no_finding(case: Case) -> None:
    report = _diagnose(case)
    assert report.findings == [], f"false alarm on {case.name}: {report.render()}"
    assert report.healthy


def _state(model: nn.Module, opt: torch.optim.Optimizer) -> tuple[object, ...]:
    return (copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()),
            [p.grad.clone() if p.grad is not None else None for p in model.parameters()])


def _same(a: object, b: object) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))  # type: ignore[arg-type]
    return a == b


def test_caller_model_optimizer_and_rng_untouched() -> None:
    torch.manual_seed(0)
    model = mlp(4, 32, nn.Sigmoid, "old")
    model.append(nn.Dropout(0.1))  # consumes RNG in the forward pass
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    data = digit_batches(5, seed=0)
    # give the optimizer real state and the model real grads first
    F.cross_entropy(model(data[0][0]), data[0][1]).backward()
    opt.step()
    F.cross_entropy(model(data[1][0]), data[1][1]).backward()
    before = _state(model, opt)
    rng = (torch.get_rng_state(), random.getstate(), np.random.get_state())
    training = model.training
    report = gg.diagnose(model, F.cross_entropy, data, opt, steps=12, try_remedies=True)
    assert report.trials  # remedies were tried too
    after = _state(model, opt)
    assert _same(before, after)
    assert torch.equal(rng[0], torch.get_rng_state())
    assert rng[1] == random.getstate()
    assert all(_same(torch.as_tensor(a), torch.as_tensor(b)) if isinstance(a, np.ndarray) else a == b
               for a, b in zip(rng[2], np.random.get_state()))
    assert model.training == training
    assert not model._forward_hooks and not model._forward_pre_hooks
    assert all(not m._forward_hooks for m in model.modules())


def test_diagnose_is_reproducible() -> None:
    case = next(c for c in SICK if c.name.startswith("mlp_sigmoid_old_d6"))
    a, b = _diagnose(case), _diagnose(case)
    assert a.to_dict()["findings"] == b.to_dict()["findings"]


def test_one_batch_is_reused_and_examine_mode_without_optimizer() -> None:
    torch.manual_seed(1)
    model = mlp(8, 32, nn.Sigmoid, "old")
    x, y = digit_batches(1, seed=1)[0]
    report = gg.diagnose(model, F.cross_entropy, (x, y))
    assert report.codes == ["vanishing_gradients"]
    assert report.metadata["mode"] == "examine"
    assert report.metadata["steps"] <= 4  # a few forward/backward passes, no training
    assert all(math.isnan(u) for u in report.history.update_ratio)


def test_dataloader_is_accepted_and_cycled() -> None:
    from torch.utils.data import DataLoader, TensorDataset

    x, y = digit_batches(1, bs=96, seed=5)[0]
    loader = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True)
    torch.manual_seed(5)
    model = mlp(8, 32, nn.Sigmoid, "old")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rng = torch.get_rng_state()
    report = gg.diagnose(model, F.cross_entropy, loader, opt, steps=10)
    assert torch.equal(rng, torch.get_rng_state())  # the shuffle drew inside the doctor's fork
    assert report.metadata["steps"] == 10  # three batches, cycled
    assert "vanishing_gradients" in report.codes


def test_lang_sets_the_default_language_of_the_report() -> None:
    case = next(c for c in SICK if c.name.startswith("mlp_sigmoid_old_d6"))
    report = _diagnose(case, lang="ko")
    assert "기울기 소실" in report.render() and "기울기 소실" in report.to_html()
    assert "Vanishing gradients" in report.render("en")


def test_try_remedies_measures_and_ranks() -> None:
    case = next(c for c in SICK if c.name.startswith("mlp_sigmoid_old_d6"))
    report = _diagnose(case, try_remedies=True)
    applied = [t for t in report.trials if t.applied]
    assert applied, "remedies were tried"
    assert [t.score for t in applied] == sorted((t.score for t in applied), reverse=True)
    best = applied[0]
    assert best.improved and "vanishing_gradients" in best.resolved
    assert best.final_loss < report.metadata["baseline_loss"]
    assert abs(math.log10(best.flow_ratio)) < abs(math.log10(report.metadata["baseline_flow"]))
    f = report.finding("vanishing_gradients")
    assert f is not None and f.remedies[0] == best.remedy  # re-ranked by measurement
    assert {t.remedy for t in f.trials} <= set(f.remedies)
    manual = [t for t in report.trials if not t.applied]
    assert all(t.note for t in manual)


def test_try_remedies_without_optimizer_skips_training_remedies() -> None:
    from tests.gallery import SeqModel, adding_batches

    torch.manual_seed(2)
    model = SeqModel(nn.RNN, 24)
    report = gg.diagnose(model, F.mse_loss, adding_batches(4, T=40, seed=2), try_remedies=True)
    assert report.codes[0] == "vanishing_gradients"
    by = {t.remedy: t for t in report.trials}
    assert by["gated_recurrence"].applied and by["gated_recurrence"].changed == ["rnn"]
    # an orthogonal recurrent matrix keeps the gradient alive through time from the start
    assert by["orthogonal_init"].time_ratio > 1e3 * report.metadata["baseline_time"]
    assert by["orthogonal_init"].improved
    assert not by["adaptive_optimizer"].applied and by["adaptive_optimizer"].note == "needs_optimizer"


def test_prescribe_returns_treated_copy() -> None:
    torch.manual_seed(3)
    model = mlp(4, 16, nn.Sigmoid, "old")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = digit_batches(1)[0]
    ref = copy.deepcopy(model.state_dict())
    p = prescribe(model, "relu_family", (x, y), opt)
    assert sum(isinstance(m, nn.ReLU) for m in p.model.modules()) == 4
    assert not any(isinstance(m, nn.ReLU) for m in model.modules())
    assert _same(ref, model.state_dict())
    assert p.optimizer is not None and p.optimizer.param_groups[0]["params"][0] is next(p.model.parameters())
    with pytest.raises(ValueError, match="residual_connections"):
        prescribe(model, "residual_connections", (x, y))
    with pytest.raises(ValueError, match="optimizer"):
        prescribe(model, "lower_learning_rate", (x, y))


def test_activation_map_traces_functional_calls() -> None:
    from tests.gallery import FunctionalSigmoidMLP
    from gradguard.doctor.probes import Probe

    net = FunctionalSigmoidMLP(3, 8)
    with Probe(net) as p:
        net(torch.randn(4, 64))
        follow, site, outputs = activation_map(p.summary())
    assert follow == {"hidden.0": "sigmoid", "hidden.1": "sigmoid", "hidden.2": "sigmoid",
                      "out": None}
    assert site["hidden.0"] == ""  # the root module's forward calls torch.sigmoid
    assert outputs == set()


# -- errors ---------------------------------------------------------------------------------------
@pytest.fixture()
def setup() -> tuple[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]]:
    torch.manual_seed(4)
    return mlp(2, 8, nn.ReLU, "he"), digit_batches(2)


def test_non_scalar_loss_is_explained(setup: tuple) -> None:  # type: ignore[type-arg]
    model, data = setup
    with pytest.raises(ValueError, match="scalar.*reduction='mean'"):
        gg.diagnose(model, lambda o, t: F.cross_entropy(o, t, reduction="none"), data)


def test_loss_without_grad_is_explained(setup: tuple) -> None:  # type: ignore[type-arg]
    model, data = setup
    with pytest.raises(ValueError, match="does not require grad"):
        gg.diagnose(model, lambda o, t: F.cross_entropy(o.detach(), t), data)


@pytest.mark.parametrize("kw, match", [
    ({"lang": "fr"}, "`lang` must be one of"),
    ({"steps": 0}, "`steps` must be >= 1"),
    ({"steps": 2.5}, "`steps` must be an int"),
    ({"try_remedies": "yes"}, "`try_remedies` must be a bool"),
])
def test_bad_arguments(setup: tuple, kw: dict, match: str) -> None:  # type: ignore[type-arg]
    model, data = setup
    with pytest.raises((TypeError, ValueError), match=match):
        gg.diagnose(model, F.cross_entropy, data, **kw)


def test_bad_data_and_model(setup: tuple) -> None:  # type: ignore[type-arg]
    model, data = setup
    with pytest.raises(TypeError, match="`model` must be a torch.nn.Module"):
        gg.diagnose(lambda x: x, F.cross_entropy, data)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"`data` must yield \(inputs, targets\) pairs"):
        gg.diagnose(model, F.cross_entropy, [data[0][0], data[1][0], data[0][0]])
    with pytest.raises(ValueError, match="`data` is empty"):
        gg.diagnose(model, F.cross_entropy, [])
    with pytest.raises(TypeError, match="`data` must be one"):
        gg.diagnose(model, F.cross_entropy, 3)
    with pytest.raises(TypeError, match="`loss_fn` must be callable"):
        gg.diagnose(model, "cross_entropy", data)  # type: ignore[arg-type]


def test_optimizer_of_another_model_is_refused(setup: tuple) -> None:  # type: ignore[type-arg]
    model, data = setup
    other = torch.optim.SGD(nn.Linear(3, 3).parameters(), lr=0.1)
    with pytest.raises(ValueError, match="not a parameter of `model`"):
        gg.diagnose(model, F.cross_entropy, data, other)
