"""Detectors on synthetic and recorded histories: triggers, scale invariance, no false alarms."""

from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from gradguard.doctor.detectors import CODES, DETECTORS, layer_view, run_detectors
from gradguard.doctor.detectors._common import EXPLODE_GROWTH, VANISH_RATIO
from gradguard.doctor.probes import ProbeSummary, SiteStats
from gradguard.history import History, HistoryBuffer
from gradguard.stats import grad_stats

torch.set_num_threads(1)


def history(profile_rows: list[list[float]], *, loss: list[float] | None = None,
            update: float | list[float] = math.nan, bias: bool = True) -> History:
    """Per-layer gradient norms -> a History of "l{i}.weight" (+ "l{i}.bias") tensors."""
    depth = len(profile_rows[0])
    names = []
    for i in range(depth):
        names.append(f"l{i}.weight")
        if bias:
            names.append(f"l{i}.bias")
    h = History(names)
    for r, row in enumerate(profile_rows):
        h.step.append(r)
        h.loss.append(loss[r] if loss is not None else math.nan)
        per = []
        for v in row:
            per.append(v)
            if bias:
                per.append(0.0)
        h.layer_norm.append(per)
        h.global_norm.append(math.sqrt(sum(v * v for v in row)))
        h.threshold.append(math.inf)
        h.clipped.append(False)
        h.skipped.append(False)
        h.lr_scale.append(1.0)
        u = update[r] if isinstance(update, list) else update
        h.update_ratio.append([u if n.endswith("weight") else math.nan for n in names])
    return h


def geometric(depth: int, decay: float, scale: float, rows: int = 6) -> list[list[float]]:
    rng = random.Random(depth)
    return [[scale * decay ** (depth - 1 - i) * (1 + 0.01 * rng.random()) for i in range(depth)]
            for _ in range(rows)]


def codes(h: History, probes: ProbeSummary | None = None) -> list[str]:
    return [f.code for f in run_detectors(h, probes)]


def test_every_finding_code_has_a_detector() -> None:
    # the loss-scale finding is read after the others: it names what caused them
    assert set(DETECTORS) | {"loss_scale"} == set(CODES)
    assert len(CODES) == 12


@settings(max_examples=60, deadline=None)
@given(depth=st.integers(3, 30), decay=st.floats(0.05, 0.98), scale=st.floats(1e-8, 1e8))
def test_vanishing_iff_first_layer_two_decades_below(depth: int, decay: float, scale: float) -> None:
    h = history(geometric(depth, decay, scale))
    ratio = decay ** (depth - 1)
    if abs(math.log10(ratio) - math.log10(VANISH_RATIO)) < 0.02:
        return  # too close to the threshold for the 1% jitter
    found = run_detectors(h)
    vanishing = [f for f in found if f.code == "vanishing_gradients"]
    assert bool(vanishing) == (ratio < VANISH_RATIO)
    if vanishing:
        f = vanishing[0]
        assert f.layers[0] == "l0" and f"l{depth - 1}" not in f.layers
        assert f.evidence["decay_per_layer"] == pytest.approx(decay, rel=0.05)
        assert f.evidence["ratio"] == pytest.approx(ratio, rel=0.1)


@settings(max_examples=30, deadline=None)
@given(depth=st.integers(3, 20), decay=st.floats(0.05, 0.5), c=st.floats(1e-6, 1e6))
def test_detectors_are_scale_free(depth: int, decay: float, c: float) -> None:
    rows = geometric(depth, decay, 1.0)
    a = run_detectors(history(rows))
    b = run_detectors(history([[c * v for v in r] for r in rows]))
    assert [(f.code, f.layers) for f in a] == [(f.code, f.layers) for f in b]


def test_flat_noisy_profile_is_healthy() -> None:
    rng = random.Random(0)
    rows = [[rng.uniform(0.3, 3.0) for _ in range(12)] for _ in range(30)]
    loss = [2.3 * math.exp(-s / 20) + 0.05 * rng.random() for s in range(30)]
    assert codes(history(rows, loss=loss, update=1e-3)) == []


def test_exploding_over_steps() -> None:
    rows = [[1.0 * 1.4 ** s] * 4 for s in range(25)]
    loss = [2.0 + 0.1 * s for s in range(25)]
    f = run_detectors(history(rows, loss=loss))[0]
    assert f.code == "exploding_gradients" and f.evidence["axis"] == "steps"
    assert f.evidence["growth"] > EXPLODE_GROWTH
    assert f.layers == ["l0", "l1", "l2", "l3"]


def test_nonfinite_gradients_name_layers_and_origin() -> None:
    rows = [[1.0, 1.0, 1.0, 1.0] for _ in range(10)]
    rows[6] = [math.nan, math.nan, math.inf, 1.0]
    h = history(rows, loss=[1.0] * 10)
    found = run_detectors(h)
    f = next(f for f in found if f.code == "nonfinite_gradients")
    assert f.layers == ["l0", "l1", "l2"]
    assert f.evidence["origin"] == "l2" and f.evidence["first_step"] == 6
    assert "nonfinite_loss" not in [g.code for g in found]


def test_nonfinite_loss_is_a_loss_problem_not_a_gradient_one() -> None:
    rows = [[1.0] * 3 for _ in range(10)]
    loss = [1.0] * 10
    rows[4] = [math.nan] * 3
    loss[4] = math.nan
    found = run_detectors(history(rows, loss=loss))
    assert [f.code for f in found] == ["nonfinite_loss"]
    assert found[0].evidence["first_step"] == 4 and not found[0].evidence["at_start"]


def test_all_nan_loss_counts_when_the_caller_recorded_it() -> None:
    rows = [[1.0] * 3 for _ in range(3)]
    h = history(rows, loss=[math.nan] * 3)
    assert codes(h) == []  # NaN also means "not recorded"
    assert codes(h, ProbeSummary(loss_recorded=True)) == ["nonfinite_loss"]


def test_loss_spike_that_recovers() -> None:
    rng = random.Random(1)
    loss = [1.0 + 0.02 * rng.random() for _ in range(40)]
    rows = [[1.0 + 0.05 * rng.random()] * 3 for _ in range(40)]
    loss[20] = 6.0
    rows[20] = [30.0, 1.0, 1.0]
    f = run_detectors(history(rows, loss=loss))[0]
    assert f.code == "loss_spike" and f.evidence["steps"] == [20]
    assert f.layers == ["l0"]


def test_level_shift_is_not_a_spike() -> None:
    loss = [1.0] * 20 + [6.0] * 20
    rows = [[1.0] * 3 for _ in range(40)]
    assert "loss_spike" not in codes(history(rows, loss=loss))


def test_learning_rate_too_high_needs_big_updates_and_no_progress() -> None:
    rng = random.Random(2)
    rows = [[1.0] * 3 for _ in range(30)]
    flat = [2.3 + 0.3 * rng.random() for _ in range(30)]
    falling = [2.3 * math.exp(-s / 10) for s in range(30)]
    assert codes(history(rows, loss=flat, update=0.2)) == ["learning_rate_too_high"]
    assert codes(history(rows, loss=falling, update=0.2)) == []
    assert codes(history(rows, loss=flat, update=1e-3)) == []


def test_training_stalled() -> None:
    rng = random.Random(3)
    rows = [[1.0] * 3 for _ in range(30)]
    flat = [2.3 + 0.1 * rng.random() for _ in range(30)]
    f = run_detectors(history(rows, loss=flat, update=1e-7))[0]
    assert f.code == "training_stalled" and f.remedies[0] == "adaptive_optimizer"
    assert codes(history(rows, loss=[2.3 - 0.05 * s for s in range(30)], update=1e-7)) == []


def test_probe_detectors_are_silent_without_probes_and_fire_with_them() -> None:
    rows = [[1.0] * 4 for _ in range(5)]
    h = history(rows)
    assert codes(h) == []
    sites = [
        SiteStats("l0", "l0", "Linear", "layer", 0, calls=5, rms=1.0),
        SiteStats("a0", "a0", "tanh", "saturating", 1, calls=5, rms=0.9, saturated=0.8),
        SiteStats("l1", "l1", "Linear", "layer", 2, calls=5, rms=1.0),
        SiteStats("r1", "r1", "relu", "relu", 3, calls=5, rms=0.1, dead=0.9, units=32),
        SiteStats("l2", "l2", "Linear", "layer", 4, calls=5, rms=1.0),
        SiteStats("out", "out", "sigmoid", "saturating", 5, calls=5, saturated=1.0, is_output=True),
    ]
    found = run_detectors(h, ProbeSummary(sites=sites, batches=5))
    by = {f.code: f for f in found}
    assert set(by) == {"saturated_activations", "dead_units"}
    assert by["saturated_activations"].layers == ["a0"]  # the output sigmoid is by design
    assert by["dead_units"].layers == ["r1"]


def test_activation_scale_drift_from_probes() -> None:
    rows = [[1.0] * 10 for _ in range(4)]
    sites = [SiteStats(f"l{i}", f"l{i}", "Linear", "layer", i, calls=4, rms=0.5 ** i)
             for i in range(10)]
    f = run_detectors(history(rows), ProbeSummary(sites=sites))[0]
    assert f.code == "activation_scale_drift" and f.evidence["direction"] == "shrinks"
    assert f.evidence["factor_per_layer"] == pytest.approx(0.5)
    assert "l0" not in f.layers and "l6" in f.layers


def test_layer_view_groups_tensors_by_module() -> None:
    h = History(["emb.weight", "rnn.weight_ih_l0", "rnn.weight_hh_l0", "rnn.bias_ih_l0",
                 "norm.weight", "norm.bias", "pos", "head.weight"])
    h.layer_norm.append([1.0, 3.0, 4.0, 0.0, 1.0, 1.0, 2.0, 1.0])
    h.update_ratio.append([math.nan] * 8)
    v = layer_view(h)
    assert v.layers == ["emb", "rnn", "norm", "pos", "head"]
    assert v.norms[0][1] == pytest.approx(5.0)
    assert "norm" not in v.weight_layers and "rnn" in v.weight_layers


def test_bad_arguments() -> None:
    with pytest.raises(TypeError, match="`history` must be a gradguard History"):
        run_detectors([1, 2, 3])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="`probes` must be a ProbeSummary"):
        run_detectors(History(["w"]), probes={})  # type: ignore[arg-type]
    assert run_detectors(History([])) == []


class _LSTM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(2, 32, batch_first=True)
        self.fc = nn.Linear(32, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.rnn(x)[0][:, -1])


def _guard_like_run(model: nn.Module, opt: torch.optim.Optimizer, batches: list, clip: float,
                    loss_fn=F.mse_loss) -> History:  # type: ignore[no-untyped-def]
    """What a Guard records: per-tensor norms before clipping, the threshold, clipped flags."""
    names = [n for n, _ in model.named_parameters()]
    params = list(model.parameters())
    buf = HistoryBuffer(names, capacity=len(batches))
    for step, (x, y) in enumerate(batches):
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        s = grad_stats(params)
        torch.nn.utils.clip_grad_norm_(params, clip)
        before = [p.detach().clone() for p in params]
        opt.step()
        ratio = torch.stack([(p.detach() - b).norm() / b.norm().clamp_min(1e-12)
                             for p, b in zip(params, before)])
        buf.record(step, global_norm=s.global_norm, per_tensor_norm=s.per_tensor_norm,
                   loss=loss.detach(), threshold=clip, clipped=s.global_norm > clip,
                   update_ratio=ratio)
    return buf.flush()


def test_recorded_lstm_run_with_clipping_is_healthy(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from tests.gallery import adding_batches

    torch.manual_seed(5)
    model = _LSTM()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    hist = _guard_like_run(model, opt, adding_batches(60, T=25, seed=5), clip=0.5)
    assert any(hist.clipped)  # clipping did act
    assert run_detectors(hist) == []
    # the same through a JSONL file, as `gradguard report` reads it
    hist.to_jsonl(tmp_path / "run.jsonl")
    assert run_detectors(History.from_jsonl(tmp_path / "run.jsonl")) == []


def test_recorded_run_that_diverges() -> None:
    from tests.gallery import digit_batches, mlp

    torch.manual_seed(6)
    model = mlp(3, 32, nn.ReLU, "he")
    opt = torch.optim.SGD(model.parameters(), lr=4.0)
    hist = _guard_like_run(model, opt, digit_batches(30, seed=6), clip=1e9,
                           loss_fn=F.cross_entropy)
    found = codes(hist)
    assert found and found[0] in ("nonfinite_loss", "exploding_gradients", "nonfinite_gradients")
    assert "learning_rate_too_high" in found
