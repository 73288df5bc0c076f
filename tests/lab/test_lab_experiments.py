"""Each experiment, run in quick mode, shows the direction its claim predicts, read from the
numbers it measured (never from the verdict string it computed)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable

import pytest

import gradguard.lab as lab
from gradguard.lab.experiments.gated_recurrence import BASELINE

Get = Callable[[str], lab.ExperimentResult]


def _sigmoid_derivative(r: lab.ExperimentResult) -> None:
    d = r.data
    assert abs(max(d["sigmoid_derivative"]) - 0.25) < 1e-6
    assert abs(max(d["tanh_derivative"]) - 1.0) < 1e-6
    i10 = d["depths"].index(10)
    sig = d["ratio"]["sigmoid+xavier"]
    assert sig[i10] < 0.5 ** 10                   # the gradient reaching layer 1 at depth 10
    assert all(b < a for a, b in zip(sig, sig[1:]))  # shrinks with every added layer
    for key in d["ratio"]:                          # ... like the product of the per-layer gains
        assert abs(math.log10(d["ratio"][key][i10] / d["predicted"][key][i10])) < math.log10(2)
    assert d["ratio"]["tanh+xavier"][i10] > 100 * sig[i10]


def _activations_depth(r: lab.ExperimentResult) -> None:
    d = r.data
    for depth, losses in d["final_loss"].items():
        assert losses["sigmoid"] > 2.0
        for act in ("relu", "leaky_relu", "elu", "gelu", "prelu"):
            assert losses[act] < losses["sigmoid"] / 4
            assert d["grad_ratio"][depth][act] > 1000 * d["grad_ratio"][depth]["sigmoid"]


def _init_schemes(r: lab.ExperimentResult) -> None:
    d = r.data
    assert d["he_final"]["he"] < d["he_final"]["xavier"]  # He trains a 30-layer ReLU net, Xavier stalls
    assert d["he_final"]["xavier"] > 2.0
    big, small = d["sweep_std"]["1"], d["sweep_std"]["0.01"]
    assert big[-1] / big[0] > 1e3 and small[-1] / small[0] < 1e-3
    assert d["match"]["relu+xavier"]["std"][-1] < d["match"]["relu+he"]["std"][-1] / 100
    top = [m[-1] for m in d["glorot_means"]]
    assert top[-1] < top[0] / 2                    # the top sigmoid layer saturates towards 0
    assert all(0.4 < m[0] < 0.6 for m in d["glorot_means"])


def _orthogonal_init(r: lab.ExperimentResult) -> None:
    t = r.data["steps_to_target"]
    orth, gauss = t["scaled"]["orthogonal"], t["scaled"]["normal"]
    assert max(orth) <= 1.5 * min(orth)           # learning time independent of depth
    assert gauss[-1] > 2 * gauss[0] and gauss[-1] > 2 * orth[-1]
    assert t["fixed"]["orthogonal"][-1] <= t["fixed"]["orthogonal"][0]


def _batchnorm(r: lab.ExperimentResult) -> None:
    d = r.data
    acc = d["test_acc"]
    assert acc["bn"][-1] > acc["plain"][-1] + 0.3
    assert acc["bn"][2] > acc["plain"][2]           # faster, early on
    assert d["drift"]["bn"] < d["drift"]["plain"] / 2


def _residual(r: lab.ExperimentResult) -> None:
    loss = r.data["final_loss"]
    assert loss["plain"][-1] > 5 * loss["plain"][0]   # degradation in the plain nets
    assert loss["residual"][-1] < loss["plain"][-1] / 5


def _clipping_rnn(r: lab.ExperimentResult) -> None:
    d = r.data
    _safe, unclipped, clipped = d["val_loss"]     # safe lr, high lr, high lr + clipping
    v = d["val_loss"]
    assert v[unclipped] is None or v[unclipped] > v[clipped]  # None: the unclipped run hit NaN
    assert v[clipped] < d["unigram_loss"]
    assert d["max_grad_norm"][unclipped] > 10 * d["max_grad_norm"][clipped] or v[unclipped] is None


def _clipping_methods(r: lab.ExperimentResult) -> None:
    d = r.data
    v, frac = d["val_loss"], d["clipped_fraction"]
    for method in d["methods"][1:]:
        if method.startswith("zclip "):
            # A z-score rule is a spike detector: it does not clip during its warm-up and its EMA
            # follows a blow-up that starts there, so on this task it (honestly) never trips.
            assert frac[method] < 0.1
        else:
            assert v[method] < v["none"]
    low, high = d["sweep"][0], d["sweep"][-1]
    assert frac[low] > 0.9 and frac[high] < 0.1
    best = min(v[k] for k in d["sweep"])
    assert v[low] > best and v[high] > best       # the threshold trade-off


def _learning_rate(r: lab.ExperimentResult) -> None:
    d = r.data
    top = max(d["sweep"], key=float)
    assert d["sweep"][top]["diverged_at"] is not None
    f = d["final_train_loss"]
    assert f["cosine"] < f["constant"] and f["step"] < f["constant"]


def _optimizers(r: lab.ExperimentResult) -> None:
    best = r.data["best"]
    for name in ("adagrad", "rmsprop", "adam"):
        assert best[name]["final"] < best["sgd"]["final"]


def _regularization(r: lab.ExperimentResult) -> None:
    s = r.data["summary"]
    assert s["l2"]["weight_norm"] < s["none"]["weight_norm"]
    assert s["l1"]["weight_norm"] < s["none"]["weight_norm"]
    assert s["l1"]["zero_fraction"] > 5 * max(s["l2"]["zero_fraction"], s["none"]["zero_fraction"])
    assert s["l2"]["data_grad"] > s["none"]["data_grad"]


def _dropout_early_stopping(r: lab.ExperimentResult) -> None:
    d = r.data
    base, drop = d["curves"]["baseline"], d["curves"]["dropout"]
    assert base["test"][-1] > min(base["test"])    # the baseline overfits
    assert drop["test"][-1] < base["test"][-1]
    assert d["early_stop_test_loss"] < base["test"][-1]


def _gated_recurrence(r: lab.ExperimentResult) -> None:
    d = r.data
    mse = d["final_mse"]
    assert mse["rnn"] > 0.5 * BASELINE
    assert mse["lstm"] < mse["rnn"] / 5 and mse["gru"] < mse["rnn"] / 5
    assert all(step is not None for step in d["diverged_at"]["rnn_large_init"])
    assert all(step is None for step in d["diverged_at"]["rnn_large_init_clipped"])
    assert mse["rnn_large_init_clipped"] > 0.5 * BASELINE  # finite, but not solved


def _pretraining(r: lab.ExperimentResult) -> None:
    f = r.data["final_loss"]
    pre = f["pre-trained"]
    assert all(pre < v / 4 for k, v in f.items() if k != "pre-trained")


DIRECTIONS: dict[str, Callable[[lab.ExperimentResult], None]] = {
    "sigmoid_derivative": _sigmoid_derivative, "activations_depth": _activations_depth,
    "init_schemes": _init_schemes, "orthogonal_init": _orthogonal_init, "batchnorm": _batchnorm,
    "residual": _residual, "clipping_rnn": _clipping_rnn, "clipping_methods": _clipping_methods,
    "learning_rate": _learning_rate, "optimizers": _optimizers, "regularization": _regularization,
    "dropout_early_stopping": _dropout_early_stopping, "gated_recurrence": _gated_recurrence,
    "pretraining": _pretraining,
}


def test_every_experiment_has_a_direction_test() -> None:
    assert set(DIRECTIONS) == {i.name for i in lab.list_experiments()}


@pytest.mark.parametrize("name", list(DIRECTIONS))
def test_experiment(quick_result: Get, name: str) -> None:
    """One quick run per experiment: a consistent, serialisable result whose numbers point the
    way the claim says."""
    r = quick_result(name)
    assert r.name == name and r.quick and r.checks
    assert r.verdict == lab.verdict_from(r.checks)
    assert all(c.statement_en and c.statement_ko and c.evidence_en and c.evidence_ko and c.brief
               for c in r.checks)
    json.loads(r.to_json())
    assert lab.ExperimentResult.from_json(r.to_json()).to_dict() == r.to_dict()
    assert r.config["seed"] == 0
    DIRECTIONS[name](r)
