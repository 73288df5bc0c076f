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


@pytest.mark.parametrize("name", [i.name for i in lab.list_experiments()])
def test_result_is_consistent_and_serialisable(quick_result: Get, name: str) -> None:
    r = quick_result(name)
    assert r.name == name and r.quick and r.checks
    assert r.verdict == lab.verdict_from(r.checks)
    assert all(c.statement_en and c.statement_ko and c.evidence_en and c.evidence_ko and c.brief for c in r.checks)
    json.loads(r.to_json())
    assert lab.ExperimentResult.from_json(r.to_json()).to_dict() == r.to_dict()
    assert r.config == {**r.config, "seed": 0}


def test_sigmoid_derivative(quick_result: Get) -> None:
    d = quick_result("sigmoid_derivative").data
    assert abs(max(d["sigmoid_derivative"]) - 0.25) < 1e-6
    assert abs(max(d["tanh_derivative"]) - 1.0) < 1e-6
    i10 = d["depths"].index(10)
    sig = d["ratio"]["sigmoid+xavier"]
    assert sig[i10] < 0.5 ** 10                   # the gradient reaching layer 1 at depth 10
    assert all(b < a for a, b in zip(sig, sig[1:]))  # shrinks with every added layer
    for key in d["ratio"]:                          # ... like the product of the per-layer gains
        assert abs(math.log10(d["ratio"][key][i10] / d["predicted"][key][i10])) < math.log10(2)
    assert d["ratio"]["tanh+xavier"][i10] > 100 * sig[i10]


def test_activations_depth(quick_result: Get) -> None:
    d = quick_result("activations_depth").data
    for depth, losses in d["final_loss"].items():
        assert losses["sigmoid"] > 2.0
        for act in ("relu", "leaky_relu", "elu", "gelu", "prelu"):
            assert losses[act] < losses["sigmoid"] / 4
            assert d["grad_ratio"][depth][act] > 1000 * d["grad_ratio"][depth]["sigmoid"]


def test_init_schemes(quick_result: Get) -> None:
    r = quick_result("init_schemes")
    d = r.data
    assert d["he_final"]["he"] < d["he_final"]["xavier"]  # He trains a 30-layer ReLU net, Xavier stalls
    assert d["he_final"]["xavier"] > 2.0
    big, small = d["sweep_std"]["1"], d["sweep_std"]["0.01"]
    assert big[-1] / big[0] > 1e3 and small[-1] / small[0] < 1e-3
    assert d["match"]["relu+xavier"]["std"][-1] < d["match"]["relu+he"]["std"][-1] / 100
    top = [m[-1] for m in d["glorot_means"]]
    assert top[-1] < top[0] / 2                    # the top sigmoid layer saturates towards 0
    assert all(0.4 < m[0] < 0.6 for m in d["glorot_means"])


def test_orthogonal_init(quick_result: Get) -> None:
    t = quick_result("orthogonal_init").data["steps_to_target"]
    orth, gauss = t["scaled"]["orthogonal"], t["scaled"]["normal"]
    assert max(orth) <= 1.5 * min(orth)           # learning time independent of depth
    assert gauss[-1] > 2 * gauss[0] and gauss[-1] > 2 * orth[-1]
    assert t["fixed"]["orthogonal"][-1] <= t["fixed"]["orthogonal"][0]


def test_batchnorm(quick_result: Get) -> None:
    d = quick_result("batchnorm").data
    acc = d["test_acc"]
    assert acc["bn"][-1] > acc["plain"][-1] + 0.3
    assert acc["bn"][2] > acc["plain"][2]           # faster, early on
    assert d["drift"]["bn"] < d["drift"]["plain"] / 2


def test_residual(quick_result: Get) -> None:
    loss = quick_result("residual").data["final_loss"]
    assert loss["plain"][-1] > 5 * loss["plain"][0]   # degradation in the plain nets
    assert loss["residual"][-1] < loss["plain"][-1] / 5


def test_clipping_rnn(quick_result: Get) -> None:
    d = quick_result("clipping_rnn").data
    _safe, unclipped, clipped = d["val_loss"]     # safe lr, high lr, high lr + clipping
    v = d["val_loss"]
    assert v[unclipped] is None or v[unclipped] > v[clipped]  # None: the unclipped run hit NaN
    assert v[clipped] < d["unigram_loss"]
    assert d["max_grad_norm"][unclipped] > 10 * d["max_grad_norm"][clipped] or v[unclipped] is None


def test_clipping_methods(quick_result: Get) -> None:
    d = quick_result("clipping_methods").data
    v, frac = d["val_loss"], d["clipped_fraction"]
    for method in d["methods"][1:]:
        assert v[method] < v["none"]
    low, high = d["sweep"][0], d["sweep"][-1]
    assert frac[low] > 0.9 and frac[high] < 0.1
    best = min(v[k] for k in d["sweep"])
    assert v[low] > best and v[high] > best       # the threshold trade-off


def test_learning_rate(quick_result: Get) -> None:
    d = quick_result("learning_rate").data
    top = max(d["sweep"], key=float)
    assert d["sweep"][top]["diverged_at"] is not None
    f = d["final_train_loss"]
    assert f["cosine"] < f["constant"] and f["step"] < f["constant"]


def test_optimizers(quick_result: Get) -> None:
    best = quick_result("optimizers").data["best"]
    for name in ("adagrad", "rmsprop", "adam"):
        assert best[name]["final"] < best["sgd"]["final"]


def test_regularization(quick_result: Get) -> None:
    s = quick_result("regularization").data["summary"]
    assert s["l2"]["weight_norm"] < s["none"]["weight_norm"]
    assert s["l1"]["weight_norm"] < s["none"]["weight_norm"]
    assert s["l1"]["zero_fraction"] > 5 * max(s["l2"]["zero_fraction"], s["none"]["zero_fraction"])
    assert s["l2"]["data_grad"] > s["none"]["data_grad"]


def test_dropout_early_stopping(quick_result: Get) -> None:
    d = quick_result("dropout_early_stopping").data
    base, drop = d["curves"]["baseline"], d["curves"]["dropout"]
    assert base["test"][-1] > min(base["test"])    # the baseline overfits
    assert drop["test"][-1] < base["test"][-1]
    assert d["early_stop_test_loss"] < base["test"][-1]


def test_gated_recurrence(quick_result: Get) -> None:
    d = quick_result("gated_recurrence").data
    mse = d["final_mse"]
    assert mse["rnn"] > 0.5 * BASELINE
    assert mse["lstm"] < mse["rnn"] / 5 and mse["gru"] < mse["rnn"] / 5
    assert all(step is not None for step in d["diverged_at"]["rnn_large_init"])
    assert all(step is None for step in d["diverged_at"]["rnn_large_init_clipped"])
    assert mse["rnn_large_init_clipped"] > 0.5 * BASELINE  # finite, but not solved


def test_pretraining(quick_result: Get) -> None:
    f = quick_result("pretraining").data["final_loss"]
    pre = f["pre-trained"]
    assert all(pre < v / 4 for k, v in f.items() if k != "pre-trained")
