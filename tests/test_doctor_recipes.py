"""The doctor on real recipes: step_fn (hidden-state forwards, (logits, loss) returns), the
user's scheduler and clipping, progress, time budget, ranking by the loss, and every remedy."""

from __future__ import annotations

import math
import random
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import gradguard as gg
from gradguard.doctor import remedies as R
from gradguard.doctor.probes import Probe, param_infos
from gradguard.doctor.ranking import verdict
from gradguard.doctor.run import Recipe, collect_batches, run
from gradguard.findings import Finding

from tests.gallery import digit_batches, mlp

torch.set_num_threads(1)


# -- models written the way people write them ------------------------------------------------------
class HiddenLM(nn.Module):
    """forward(x, h) -> (logits, h): the hidden state is the caller's to carry."""

    def __init__(self, V: int = 16, d: int = 24, cell: type[nn.RNNBase] = nn.GRU) -> None:
        super().__init__()
        self.emb = nn.Embedding(V, d)
        self.rnn = cell(d, d, batch_first=True)
        self.head = nn.Linear(d, V)

    def forward(self, x: torch.Tensor, h: Any = None) -> tuple[torch.Tensor, Any]:
        out, h = self.rnn(self.emb(x), h)
        return self.head(out), h


class LossInForward(nn.Module):
    """forward(x, targets) -> (logits, loss), as nanoGPT-style models do."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.body(x)
        return logits, F.cross_entropy(logits, y)


def tokens(n: int, V: int = 16, T: int = 12, bs: int = 8, seed: int = 0) -> list[Any]:
    torch.manual_seed(seed)
    out = []
    for _ in range(n):  # drawn from the global RNG, like a user's get_batch()
        start = torch.randint(0, V, (bs, 1))
        step = torch.randint(1, 3, (bs, 1))
        seq = (start + step * torch.arange(T + 1)) % V  # learnable from the last two tokens
        out.append((seq[:, :-1], seq[:, 1:]))
    return out


def carry(model: nn.Module, batch: Any) -> torch.Tensor:
    x, y = batch
    logits, h = model(x, getattr(model, "h", None))
    model.h = tuple(t.detach() for t in h) if isinstance(h, tuple) else h.detach()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def test_step_fn_with_hidden_state_names_layers_without_prefix() -> None:
    torch.manual_seed(0)
    model = HiddenLM()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = gg.diagnose(model, None, tokens(12), opt, steps=12, step_fn=carry)
    assert report.history.layers == ["emb", "rnn", "head"]  # no wrapper prefix
    assert report.healthy, report.codes
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not hasattr(model, "h")  # the carried state lived on the doctor's copies only


def test_step_fn_returning_logits_and_loss() -> None:
    torch.manual_seed(0)
    model = LossInForward()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    report = gg.diagnose(model, None, digit_batches(10), opt, steps=10,
                         step_fn=lambda m, b: m(*b))
    assert report.history.layers == ["body.0", "body.2"]
    assert report.healthy
    with pytest.raises(TypeError, match="step_fn"):
        gg.diagnose(model, None, digit_batches(2), opt, steps=2, step_fn=lambda m, b: "loss")
    # an output object with .loss (Hugging Face style), and examining without an optimizer
    from types import SimpleNamespace

    hf = gg.diagnose(model, None, digit_batches(4), step_fn=lambda m, b: SimpleNamespace(
        logits=m(*b)[0], loss=m(*b)[1]))
    assert hf.metadata["mode"] == "examine" and hf.history.layers == ["body.0", "body.2"]


def test_missing_loss_fn_and_step_fn_is_a_clear_error() -> None:
    with pytest.raises(TypeError, match="step_fn=lambda"):
        gg.diagnose(nn.Linear(2, 2), None, (torch.zeros(4, 2), torch.zeros(4, 2)))
    with pytest.raises(ValueError, match="clip"):
        gg.diagnose(nn.Linear(2, 2), F.mse_loss, (torch.zeros(4, 2), torch.zeros(4, 2)), clip=-1)
    with pytest.raises(ValueError, match="max_seconds"):
        gg.diagnose(nn.Linear(2, 2), F.mse_loss, (torch.zeros(4, 2), torch.zeros(4, 2)),
                    max_seconds=0)


def test_scheduler_is_the_users_recipe() -> None:
    """A schedule that holds the LR at 0 stalls the copy; the user's scheduler is untouched."""
    torch.manual_seed(0)
    model = mlp(2, 32, nn.ReLU, "he")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    frozen = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.0)
    data = digit_batches(12)
    r0 = gg.diagnose(model, F.cross_entropy, data, opt, steps=12, scheduler=frozen)
    assert r0.codes == ["training_stalled"]
    assert r0.metadata["scheduler"] == "LambdaLR"
    assert frozen.last_epoch == 0 and opt.param_groups[0]["lr"] == 0.0
    opt2 = torch.optim.SGD(model.parameters(), lr=0.1)
    assert gg.diagnose(model, F.cross_entropy, data, opt2, steps=12).healthy
    with pytest.raises(ValueError, match="scheduler"):
        gg.diagnose(model, F.cross_entropy, data, opt2, steps=2, scheduler=frozen)


def test_clip_is_applied_and_never_prescribed_back() -> None:
    torch.manual_seed(0)
    model = mlp(2, 32, nn.ReLU, "he")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    data = digit_batches(12)
    tight = gg.diagnose(model, F.cross_entropy, data, opt, steps=12, clip=1e-9)
    assert tight.codes == ["training_stalled"]  # a threshold that tiny freezes the copy
    hot = torch.optim.SGD(model.parameters(), lr=30.0)
    r = gg.diagnose(model, F.cross_entropy, data, hot, steps=12, clip=5.0, try_remedies=True,
                    max_trials=2)
    assert r.findings
    assert all("gradient_clipping" not in f.remedies for f in r.findings)
    assert r.metadata["clip"] == 5.0


def test_progress_time_budget_and_early_stop() -> None:
    torch.manual_seed(0)
    model = mlp(3, 32, nn.ReLU, "he")
    opt = torch.optim.SGD(model.parameters(), lr=3.0)
    seen: list[tuple[str, int, int]] = []
    r = gg.diagnose(model, F.cross_entropy, digit_batches(16), opt, steps=16, try_remedies=True,
                    progress=lambda *a: seen.append(a))
    stages = {s for s, _, _ in seen}
    assert "baseline" in stages and len(stages) > 1
    assert all(total == 16 for _, _, total in seen)
    losing = [t for t in r.trials if t.applied and len(t.loss_curve) < 16
              and t.verdict == "worse"]
    fast = gg.diagnose(model, F.cross_entropy, digit_batches(16), opt, steps=16,
                       try_remedies=True, max_seconds=1e-6)
    assert fast.trials and all(t.note in ("time_budget", "manual", "not_applicable")
                               for t in fast.trials)
    assert losing or all(t.verdict != "worse" or len(t.loss_curve) == 16 for t in r.trials)


# -- ranking by the loss -------------------------------------------------------------------------------
def test_verdict_table() -> None:
    base = [2.0 + 0.01 * (i % 3) for i in range(20)]
    assert verdict(base, [1.5 + 0.01 * (i % 2) for i in range(20)])[0] == "helps"
    assert verdict(base, [1.9 + 0.01 * (i % 2) for i in range(20)])[0] == "no_gain"  # < 10 %
    assert verdict(base, [2.5 + 0.01 * (i % 2) for i in range(20)])[0] == "worse"
    assert verdict(base, [1.0] * 5, stopped="losing")[0] == "worse"
    assert verdict(base, base[:10] + [math.nan] * 3)[0] == "worse"
    noisy = [2.0 + (1.0 if i % 2 else -1.0) for i in range(20)]
    assert verdict(noisy, [1.75 + (1.0 if i % 3 else -1.0) for i in range(20)])[0] == "no_gain"
    diverged = [2.0, 3.0, 8.0, 30.0] + [math.inf] * 2
    learns = [2.0, 1.9] + [1.2] * 10
    assert verdict(diverged, learns)[0] == "helps"  # finite and ends well below its own start
    assert verdict(diverged, [2.0] * 12)[0] == "no_gain"  # finite, but learns nothing


def test_lr_search_reports_its_factor_and_ranks_across_findings() -> None:
    torch.manual_seed(11)
    model = mlp(3, 64, nn.ReLU, "he")
    opt = torch.optim.SGD(model.parameters(), lr=3.0)
    r = gg.diagnose(model, F.cross_entropy, digit_batches(24), opt, steps=24,
                    try_remedies=True)
    best = r.prescription
    assert best is not None and best.verdict == "helps" and best.relative_loss <= 0.9
    assert r.trials[0] is best
    lr = next(t for t in r.trials if t.remedy == "lower_learning_rate")
    assert lr.factor in R.TREATMENTS["lower_learning_rate"].lr_search
    assert f"lr x{lr.factor:.3g}" in lr.changed
    assert "Prescription" in r.render() and "처방" in r.render("ko")
    for t in r.trials:
        if t.applied and t.verdict == "helps":
            assert t.relative_loss <= 0.9


# -- remedies that fit the model -----------------------------------------------------------------------
def test_fit_remedies_never_offers_what_the_recipe_does() -> None:
    f = Finding("learning_rate_too_high", "warning", [], ["high_learning_rate"],
                ["lower_learning_rate", "gradient_clipping", "adaptive_optimizer", "batch_norm"])
    tf = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)
    facts = R.model_facts(tf, torch.optim.AdamW(tf.parameters()), clip=1.0)
    assert facts.kind == "transformer" and facts.post_ln and facts.adaptive
    R.fit_remedies([f], facts)
    assert f.remedies == ["lower_learning_rate", "pre_ln", "lr_schedule"]
    g = Finding("vanishing_gradients", "error", [], [], ["he_init", "batch_norm"])
    lstm = nn.LSTM(4, 4)
    R.fit_remedies([g], R.model_facts(lstm, torch.optim.SGD(lstm.parameters(), lr=1)))
    assert g.remedies == ["he_init", "layer_norm"]
    h = Finding("nonfinite_loss", "error", [], [], ["lower_learning_rate", "lr_schedule"])
    half = nn.Linear(2, 2).half()
    sched_lrs = [0.1 * (i + 1) for i in range(10)]
    R.fit_remedies([h], R.model_facts(half, torch.optim.SGD(half.parameters(), lr=1),
                                      lrs=sched_lrs, unscaled_data=True))
    assert h.remedies == ["fp32_logits", "standardize_data", "lower_learning_rate"]
    assert h.causes[:2] == ["half_precision", "unscaled_data"]


def test_layer_norm_pre_ln_forget_gate_and_fp32_remedies() -> None:
    torch.manual_seed(0)
    m = HiddenLM(cell=nn.LSTM)
    assert R.insert_layer_norm_(m) == ["rnn"]
    out, _ = m(torch.randint(0, 16, (2, 5)))
    assert out.shape == (2, 5, 16)
    y, _ = m.rnn(m.emb(torch.randint(0, 16, (2, 5))))
    assert torch.allclose(y.mean(-1), torch.zeros(2, 5), atol=1e-5)  # normalised per step
    assert R.forget_gate_bias_(m) == ["rnn"]
    b = m.rnn.bias_ih_l0 + m.rnn.bias_hh_l0
    assert torch.all(b[24:48] == 1.0)
    tf = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, batch_first=True), 2,
                               enable_nested_tensor=False)
    assert R.pre_ln_(tf) == ["layers.0", "layers.1"] and R.pre_ln_(tf) == []
    half = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).half()
    assert R.fp32_output_(nn.Linear(2, 2)) == []
    assert R.fp32_output_(half) == ["2"]
    out = half(torch.randn(5, 4).half())
    assert out.dtype == torch.float32 and half[2].weight.dtype == torch.float32
    assert half[0].weight.dtype == torch.float16


def test_wrap_norm_reaches_functional_activations() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.out = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(F.relu(self.b(F.relu(self.a(x)))))

    net = Net()
    with Probe(net) as probe:
        net(torch.randn(6, 4))
        summary = probe.summary()
    follow, _, _ = gg.doctor.activation_map(summary)
    assert R.wrap_norm_(net, follow, "batch") == ["a", "b"]
    assert isinstance(net.a[1], nn.BatchNorm1d) and net(torch.randn(6, 4)).shape == (6, 2)


def test_standardize_and_mean_reduction_trials_lower_the_loss() -> None:
    torch.manual_seed(0)
    x = torch.randn(256, 6) * torch.tensor([1.0, 10.0, 100.0, 1000.0, 0.1, 5.0])
    y = (x / x.std(0)).sum(1, keepdim=True) * 50 + 300
    data = [(x[i:i + 32], y[i:i + 32]) for i in range(0, 256, 32)]
    model = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 1))
    opt = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)
    r = gg.diagnose(model, F.mse_loss, data, opt, steps=24, try_remedies=True, max_trials=3)
    assert "nonfinite_loss" in r.codes
    assert r.findings[0].causes[0] == "unscaled_data"
    st = r.prescription
    assert st is not None and st.remedy == "standardize_data"
    assert st.changed[:2] == ["inputs", "targets"] and st.verdict == "helps"
    # a summed loss with SGD: the loss-scale finding, cured by averaging
    torch.manual_seed(0)
    gru = HiddenLM()
    sgd = torch.optim.SGD(gru.parameters(), lr=1.0)

    def summed(m: nn.Module, b: Any) -> torch.Tensor:
        logits, _ = m(b[0])
        return F.cross_entropy(logits.reshape(-1, 16), b[1].reshape(-1), reduction="sum")

    r = gg.diagnose(gru, None, tokens(24, bs=16), sgd, steps=24, step_fn=summed,
                    try_remedies=True, max_trials=2)
    assert r.codes[0] == "loss_scale", r.codes
    mean = next(t for t in r.trials if t.remedy == "mean_reduction")
    assert mean.verdict == "helps" and mean.changed == ["loss / 192"]
    assert r.findings[0].remedies[0] in ("mean_reduction", "lower_learning_rate")
    assert r.prescription is not None and r.prescription.verdict == "helps"


# -- detectors: embeddings, tied weights, slow starts, closed gates, scale ----------------------------
class TiedLM(nn.Module):
    def __init__(self, V: int = 32, d: int = 16) -> None:
        super().__init__()
        self.emb = nn.Embedding(V, d)
        self.mid = nn.Linear(d, d)
        self.head = nn.Linear(d, V, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mid(self.emb(x))))


def test_guard_findings_judge_embeddings_and_tied_weights_by_their_own_rules() -> None:
    torch.manual_seed(0)
    model = TiedLM()
    infos = {p.name: p for p in param_infos(model)}
    assert infos["emb.weight"].shared_with == ["head"]
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    guard = gg.Guard(model, clip=None, flush_every=5)
    for _ in range(30):
        x = torch.randint(0, 32, (8, 6))  # only these rows of the embedding get a gradient
        loss = F.cross_entropy(model(x).reshape(-1, 32), x.roll(1, 1).reshape(-1))
        opt.zero_grad()
        loss.backward()
        guard.step(opt, loss=loss)
    guard.flush()
    codes = [f.code for f in guard.findings()]
    assert "vanishing_gradients" not in codes and "exploding_gradients" not in codes


def test_loss_that_climbs_is_always_a_finding() -> None:
    """A recurrent LM at a huge SGD learning rate: the loss climbs and stays up."""
    torch.manual_seed(0)
    model = HiddenLM(cell=nn.LSTM)
    opt = torch.optim.SGD(model.parameters(), lr=60.0)
    r = gg.diagnose(model, None, tokens(24), opt, steps=24, step_fn=carry)
    assert r.findings, "a climbing loss got 'No problems found'"
    loss = r.history.loss
    assert max(loss) > 2 * loss[0]
    assert {"loss_divergence", "learning_rate_too_high", "exploding_gradients",
            "nonfinite_loss", "nonfinite_gradients"} & set(r.codes)


def test_slow_start_is_not_a_learning_rate_problem() -> None:
    from gradguard.doctor.detectors import run_detectors
    from gradguard.history import History

    names = ["a.weight", "b.weight"]
    h = History(names)
    for s in range(40):
        plateau = 4.0 + 0.02 * ((s * 7) % 3 - 1)
        loss = plateau if s < 24 else 4.0 - 0.12 * (s - 23)
        h.step.append(s)
        h.loss.append(loss)
        h.global_norm.append(1.0)
        h.layer_norm.append([0.7, 0.7])
        h.update_ratio.append([0.03, 0.03])  # Adam-sized updates on small weights
        h.skipped.append(False)
        h.clipped.append(False)
        h.threshold.append(math.nan)
        h.lr_scale.append(1.0)
    assert run_detectors(h) == []


def test_closed_lstm_forget_gate_is_named_with_its_remedy() -> None:
    from tests.test_detect import _LSTM

    torch.manual_seed(0)
    net = _LSTM()
    with torch.no_grad():
        net.rnn.bias_ih_l0[32:64].fill_(-6.0)
        net.rnn.bias_hh_l0[32:64].zero_()
    x = torch.randn(32, 30, 2)
    y = x[:, 0, :1]
    r = gg.diagnose(net, F.mse_loss, (x, y))
    f = r.finding("vanishing_gradients")
    assert f is not None and f.evidence["axis"] == "time" and f.layers == ["rnn"]
    assert f.causes[0] == "closed_forget_gate" and f.remedies[0] == "forget_gate_bias"
    assert f.evidence["forget_bias"] == pytest.approx(-6.0)


@pytest.mark.parametrize("c", [1e-3, 1e3])
def test_live_findings_are_scale_free(c: float) -> None:
    """loss × c with Adam takes the same steps: the same findings, layers and causes (in stable
    regimes: a chaotic one amplifies the last bit of rounding into another trajectory)."""
    for build, lr in ((lambda: mlp(6, 32, nn.Sigmoid, "old"), 1e-2),
                      (lambda: mlp(3, 64, nn.ReLU, "he"), 1e-3),
                      (lambda: mlp(3, 64, nn.ReLU, "he"), 1e-7),
                      (lambda: mlp(8, 64, nn.ReLU, "normal:0.5"), 1e-3)):
        out = []
        for k in (1.0, c):
            torch.manual_seed(0)
            model = build()
            opt = torch.optim.Adam(model.parameters(), lr=lr, eps=1e-30)
            r = gg.diagnose(model, lambda o, y, k=k: k * F.cross_entropy(o, y),
                            digit_batches(16), opt, steps=16)
            out.append([(f.code, f.layers, f.causes) for f in r.findings
                        if f.code != "loss_scale"])
        assert out[0] == out[1], (lr, out)


def test_recipe_runs_step_fn_batches_as_given() -> None:
    batches = collect_batches(tokens(3), 5, pairs=False)
    assert len(batches) == 5 and batches[3] is batches[0]
    one = collect_batches((torch.zeros(2, 3), torch.zeros(2)), 2, pairs=False)
    assert len(one) == 2
    torch.manual_seed(0)
    model = HiddenLM()
    rec = Recipe(model, batches, step_fn=carry, optimizer=torch.optim.SGD(model.parameters(),
                                                                          lr=0.1))
    r, changed = run(rec, 0)
    assert changed == [] and len(r.history) == 5 and len(r.lrs) == 5


def _recorded(loss: list[float], gn: list[float]) -> Any:
    from gradguard.history import History

    h = History(["a.weight", "b.weight"])
    for s, (v, g) in enumerate(zip(loss, gn)):
        h.step.append(s)
        h.loss.append(v)
        h.global_norm.append(g)
        h.layer_norm.append([g / 2 ** 0.5] * 2)
        h.update_ratio.append([1e-3, 1e-3])
        h.skipped.append(False)
        h.clipped.append(False)
        h.threshold.append(math.nan)
        h.lr_scale.append(1.0)
    return h


@pytest.mark.parametrize("scale", [1.0, 1000.0])
def test_recorded_lr_burst_is_a_divergence_and_an_outlier_batch_a_spike(scale: float) -> None:
    from gradguard.doctor.detectors import run_detectors

    falling = [4.2 * 0.97 ** s for s in range(30)]
    burst = falling + [falling[-1] * 4 * (1 + 0.01 * (s % 3)) for s in range(20)]
    codes = [f.code for f in run_detectors(_recorded([scale * v for v in burst], [1.0] * 50))]
    assert codes == ["loss_divergence"]
    f = run_detectors(_recorded(burst, [1.0] * 50))[0]
    assert not f.evidence["recovered"] and f.evidence["first_step"] == 30
    knocked = falling + [falling[-1] * 30] + [falling[-1] * 3.5] * 19  # one bad batch, then damage
    gn = [1.0] * 30 + [60.0] + [3.0] * 19
    codes = [f.code for f in run_detectors(_recorded([scale * v for v in knocked], gn))]
    assert "loss_spike" in codes and "loss_divergence" not in codes


@settings(max_examples=25, deadline=None)
@given(c=st.floats(1e-4, 1e4), shape=st.sampled_from(["falling", "climb", "burst", "spike",
                                                        "flat", "oscillate"]),
       seed=st.integers(0, 1000))
def test_every_detector_is_scale_free_in_the_loss(c: float, shape: str, seed: int) -> None:
    """A loss × c (its gradients × c too) gives the same findings on a recorded history."""
    from gradguard.doctor.detectors import run_detectors

    rng = random.Random(seed)
    n = 40
    base = {
        "falling": [3.0 * 0.96 ** s for s in range(n)],
        "climb": [3.0 * 1.08 ** s for s in range(n)],
        "burst": [3.0 * 0.96 ** s if s < 25 else 3.0 * 0.96 ** 24 * 5 for s in range(n)],
        "spike": [3.0 * 0.96 ** s * (20 if s == 30 else 1) for s in range(n)],
        "flat": [3.0] * n,
        "oscillate": [3.0 * (1.6 if s % 2 else 0.6) for s in range(n)],
    }[shape]
    loss = [v * (1 + 0.02 * rng.random()) for v in base]
    gn = [1.0 + 0.1 * rng.random() for _ in range(n)]
    a = run_detectors(_recorded(loss, gn))
    b = run_detectors(_recorded([c * v for v in loss], [c * g for g in gn]))
    assert [(f.code, f.layers, f.causes) for f in a] == [(f.code, f.layers, f.causes) for f in b]


def test_diagnose_on_a_compiled_model_names_the_users_modules() -> None:
    """torch.compile wraps the model in an OptimizedModule; the doctor examines the user's module."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.Sigmoid(), nn.Linear(8, 2))
    compiled = torch.compile(net, backend="eager")
    opt = torch.optim.SGD(compiled.parameters(), lr=0.1)
    x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))
    report = gg.diagnose(compiled, nn.functional.cross_entropy, (x, y), opt, steps=5)
    names = report.history.layers
    assert names and not any("_orig_mod" in n for n in names)
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), compiled.parameters()))
