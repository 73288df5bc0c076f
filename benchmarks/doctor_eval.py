"""Held-out evaluation of the doctor on networks the tests did not tune to.

Generates a varied set of sick and healthy networks — MLPs, CNNs (2-D and 1-D), vanilla RNNs,
GRUs, LSTMs and small transformers, with depths, widths, activations, initialisations,
optimizers, learning rates and seeds drawn from a seeded generator (seeds from 1000 up; the test
gallery uses 0-29 and other sizes) — and measures:

* **detection**: the share of sick networks for which ``diagnose`` names the expected finding
  code *and* the right layers (the check depends on the problem: e.g. the first weight layer named
  and the last not, for vanishing across depth);
* **false alarms**: the share of healthy networks with any finding at all;
* **first remedy**: for each correctly named problem, the finding's first-ranked remedy (the
  ranking *before* any trial) is applied to a fresh copy and run for the same steps; it counts as
  an improvement when the gradient flow moves at least half a decade toward 1 (first/last layer,
  or first/last time step, from at least a decade off), or the final loss drops by at least 5%,
  or a diverged run stays finite. Remedies that need a code change (``stable_loss``,
  ``residual_connections``) cannot be tried automatically and are reported separately.

The networks and data are built with the test gallery's functions (``tests/gallery.py``); only
its builders are shared, never its cases, seeds or sizes.

Run:  PYTHONPATH=src python benchmarks/doctor_eval.py [--n 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gradguard.doctor import ranking
from gradguard.doctor import diagnose
from gradguard.findings import Finding

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for tests/
from tests.gallery import (  # noqa: E402  (the builders only)
    ResidualMLP,
    SeqModel,
    adding_batches,
    cnn,
    digit_batches,
    init_linear,
    mlp,
    seq_ce,
    token_batches,
)

torch.set_num_threads(1)


# -- models ---------------------------------------------------------------------------------------
class SqrtHead(nn.Module):
    """sqrt(h - min(h)): finite forward, but d sqrt at 0 is inf, and inf - inf = NaN going back."""

    def __init__(self, depth: int, width: int) -> None:
        super().__init__()
        self.body = mlp(depth, width, nn.ReLU, d_out=width)
        self.head = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(x)
        return self.head(torch.sqrt(h - h.min(-1, keepdim=True).values))


class LM(nn.Module):
    def __init__(self, vocab: int, d: int, layers: int, T: int) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(T, d)
        block = nn.TransformerEncoderLayer(d, 4, 4 * d, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.ln = nn.LayerNorm(d)
        self.out = nn.Linear(d, vocab)
        self.register_buffer("mask", torch.triu(torch.full((T, T), float("-inf")), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T = x.shape[1]
        h = self.tok(x) + self.pos(torch.arange(T))
        return self.out(self.ln(self.blocks(h, mask=self.mask[:T, :T], is_causal=True)))


def conv1d(depth: int, ch: int, act: Callable[[], nn.Module]) -> nn.Sequential:
    layers: list[nn.Module] = []
    c = 8
    for _ in range(depth):
        layers += [nn.Conv1d(c, ch, 3, padding=1), act()]
        c = ch
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(ch * 8, 10))


# -- cases ----------------------------------------------------------------------------------------
@dataclass
class EvalCase:
    name: str
    build: Callable[[], tuple[nn.Module, Any, Any, torch.optim.Optimizer | None]]
    code: str | None
    check: Callable[[Finding, nn.Module], bool] = lambda f, m: True
    steps: int = 30
    notes: dict[str, Any] = field(default_factory=dict)


def weight_layers(m: nn.Module) -> list[str]:
    return [n for n, mod in m.named_modules()
            if isinstance(mod, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.RNNBase, nn.Embedding))]


def early(f: Finding, m: nn.Module) -> bool:
    w = weight_layers(m)
    return w[0] in f.layers and w[-1] not in f.layers


def deep(f: Finding, m: nn.Module) -> bool:
    w = weight_layers(m)
    return w[0] not in f.layers and w[-2] in f.layers


def first_in(f: Finding, m: nn.Module) -> bool:
    return weight_layers(m)[0] in f.layers


def only_rnn(f: Finding, m: nn.Module) -> bool:
    return f.layers == ["rnn"]


def sites_of(kind: type[nn.Module], only: set[str] | None = None) -> Callable[[Finding, nn.Module], bool]:
    def check(f: Finding, m: nn.Module) -> bool:
        names = [n for n, mod in m.named_modules() if isinstance(mod, kind)]
        want = [n for n in names if only is None or n in only]
        return bool(f.layers) and set(f.layers) <= set(names) and (
            want[0] in f.layers if only is None else set(want) <= set(f.layers))
    return check


def nonempty(f: Finding, m: nn.Module) -> bool:
    return bool(f.layers)


def cases(n_per: int, base_seed: int = 1000) -> list[EvalCase]:
    rng = random.Random(base_seed)
    out: list[EvalCase] = []

    def seed() -> int:
        return rng.randrange(1000, 10**6)

    def opt_for(net: nn.Module, kind: str, lr: float) -> torch.optim.Optimizer | None:
        if kind == "none":
            return None
        if kind == "sgd":
            return torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
        if kind == "sgd0":
            return torch.optim.SGD(net.parameters(), lr=lr)
        if kind == "adam":
            return torch.optim.Adam(net.parameters(), lr=lr)
        return torch.optim.AdamW(net.parameters(), lr=lr)

    for _ in range(n_per):
        # ---- sick --------------------------------------------------------------------------
        s, depth, width = seed(), rng.choice([5, 7, 9, 12]), rng.choice([24, 40, 96])
        ok, lr = rng.choice(["sgd0", "none", "adam"]), rng.choice([0.05, 0.2])

        def b_sig(s=s, depth=depth, width=width, ok=ok, lr=lr):  # type: ignore[no-untyped-def]
            torch.manual_seed(s)
            net = mlp(depth, width, nn.Sigmoid, "old")
            return net, F.cross_entropy, digit_batches(30, 48, s), opt_for(net, ok, lr if ok != "adam" else 1e-3)
        out.append(EvalCase(f"sigmoid_mlp_old_d{depth}_w{width}_{ok}", b_sig, "vanishing_gradients", early))

        s, depth, std = seed(), rng.choice([6, 8, 10]), rng.choice([0.005, 0.02, 0.04])

        def b_tanh_small(s=s, depth=depth, std=std):  # type: ignore[no-untyped-def]
            torch.manual_seed(s)
            net = mlp(depth, 48, nn.Tanh, f"normal:{std}")
            return net, F.cross_entropy, digit_batches(30, 48, s), opt_for(net, "sgd", 0.05)
        out.append(EvalCase(f"tanh_mlp_std{std}_d{depth}", b_tanh_small, "vanishing_gradients", early))

        s, depth, width = seed(), rng.choice([20, 26, 34]), rng.choice([32, 56])

        def b_relu_xavier(s=s, depth=depth, width=width):  # type: ignore[no-untyped-def]
            torch.manual_seed(s)
            net = mlp(depth, width, nn.ReLU, "xavier_uniform")
            return net, F.cross_entropy, digit_batches(30, 64, s), opt_for(net, "sgd", 0.01)
        out.append(EvalCase(f"relu_mlp_xavier_d{depth}_w{width}", b_relu_xavier,
                            "activation_scale_drift", deep))

        s, depth, std = seed(), rng.choice([3, 5]), rng.choice([0.7, 1.5])
        act = rng.choice([nn.Tanh, nn.Sigmoid])

        def b_sat(s=s, depth=depth, std=std, act=act):  # type: ignore[no-untyped-def]
            torch.manual_seed(s)
            net = mlp(depth, 64, act, f"normal:{std}")
            return net, F.cross_entropy, digit_batches(30, 48, s), opt_for(net, "sgd0", 0.05)
        out.append(EvalCase(f"{act.__name__.lower()}_mlp_std{std}_d{depth}", b_sat,
                            "saturated_activations", sites_of(act)))

        s, depth, std = seed(), rng.choice([6, 10]), rng.choice([0.4, 0.8])

        def b_relu_big(s=s, depth=depth, std=std):  # type: ignore[no-untyped-def]
            torch.manual_seed(s)
            net = mlp(depth, 48, nn.ReLU, f"normal:{std}")
            return net, F.cross_entropy, digit_batches(4, 48, s), None
        out.append(EvalCase(f"relu_mlp_std{std}_d{depth}_examine", b_relu_big,
                            "exploding_gradients", first_in))

        s, bias = seed(), rng.choice([-4.0, -8.0])
        dead_at = rng.choice([[1], [1, 2]])

        def b_dead(s=s, bias=bias, dead_at=dead_at):  # type: ignore[no-untyped-def]
            torch.manual_seed(s)
            net = mlp(4, 48, nn.ReLU, "he")
            with torch.no_grad():
                for k in dead_at:
                    net[2 * k].bias.fill_(bias)
            return net, F.cross_entropy, digit_batches(30, 48, s), opt_for(net, "sgd0", 0.02)
        out.append(EvalCase(f"relu_mlp_bias{bias}_at{dead_at}", b_dead, "dead_units",
                            sites_of(nn.ReLU, {str(2 * k + 1) for k in dead_at})))

        s, lr, arch = seed(), rng.choice([2.0, 5.0, 10.0]), rng.choice(["mlp", "cnn"])

        def b_hot(s=s, lr=lr, arch=arch):  # type: ignore[no-untyped-def]
            torch.manual_seed(s)
            if arch == "mlp":
                net = mlp(3, 64, nn.ReLU, "he")
                data = digit_batches(30, 48, s)
            else:
                net = cnn(3, 8, nn.ReLU, "he")
                data = digit_batches(30, 48, s, "image")
            return net, F.cross_entropy, data, opt_for(net, "sgd", lr)
        out.append(EvalCase(f"{arch}_sgd_lr{lr}", b_hot, "learning_rate_too_high", nonempty))

        s, lr = seed(), rng.choice([1e-6, 1e-7])

        def b_cold(s=s, lr=lr):  # type: ignore[no-untyped-def]
            torch.manual_seed(s)
            net = mlp(4, 48, nn.ReLU, "he")
            return net, F.cross_entropy, digit_batches(30, 48, s), opt_for(net, "sgd0", lr)
        out.append(EvalCase(f"relu_mlp_sgd_lr{lr}", b_cold, "training_stalled", nonempty))

        s, T, hidden = seed(), rng.choice([30, 50]), rng.choice([16, 48])

        def b_rnn_v(s=s, T=T, hidden=hidden):  # type: ignore[no-untyped-def]
            torch.manual_seed(s)
            net = SeqModel(nn.RNN, hidden)
            return net, F.mse_loss, adding_batches(30, T, 32, s), opt_for(net, "sgd0", 0.05)
        out.append(EvalCase(f"rnn_T{T}_h{hidden}", b_rnn_v, "vanishing_gradients", only_rnn))

        s, T, scale = seed(), rng.choice([20, 40]), rng.choice([2.0, 3.0, 4.0])

        def b_rnn_e(s=s, T=T, scale=scale):  # type: ignore[no-untyped-def]
            torch.manual_seed(s)
            net = SeqModel(nn.RNN, 32, recurrent_scale=scale)
            return net, F.mse_loss, adding_batches(30, T, 32, s), opt_for(net, "sgd0", 0.02)
        out.append(EvalCase(f"rnn_scale{scale}_T{T}", b_rnn_e, "exploding_gradients", only_rnn))

        s, depth = seed(), rng.choice([5, 7])

        def b_c1(s=s, depth=depth):  # type: ignore[no-untyped-def]
            torch.manual_seed(s)
            net = conv1d(depth, 16, nn.Sigmoid)
            init_linear(net, "old")
            return net, F.cross_entropy, digit_batches(30, 48, s, "seq"), opt_for(net, "sgd0", 0.1)
        out.append(EvalCase(f"conv1d_sigmoid_d{depth}", b_c1, "vanishing_gradients", early))

        s, at, factor = seed(), rng.randrange(18, 30), rng.choice([20.0, 60.0])

        def b_spike(s=s, at=at, factor=factor):  # type: ignore[no-untyped-def]
            torch.manual_seed(s)
            net = mlp(3, 48, nn.ReLU, "he")
            data = digit_batches(40, 48, s)
            x, y = data[at]
            data[at] = (x * factor, y)
            return net, F.cross_entropy, data, opt_for(net, "sgd", 0.01)
        out.append(EvalCase(f"outlier_batch_x{factor}_at{at}", b_spike, "loss_spike", nonempty,
                            steps=40))

        s, depth = seed(), rng.choice([2, 4])

        def b_nan_g(s=s, depth=depth):  # type: ignore[no-untyped-def]
            torch.manual_seed(s)
            net = SqrtHead(depth, 32)
            return net, F.cross_entropy, digit_batches(20, 48, s), opt_for(net, "sgd0", 0.05)
        out.append(EvalCase(f"sqrt_minus_min_head_d{depth}", b_nan_g, "nonfinite_gradients",
                            lambda f, m: "body.0" in f.layers and "head" not in f.layers))

        s, std = seed(), rng.choice([2.0, 5.0])

        def b_nan_l(s=s, std=std):  # type: ignore[no-untyped-def]
            torch.manual_seed(s)
            net = mlp(2, 32, nn.ReLU, f"normal:{std}")

            def loss(o: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
                return F.nll_loss(torch.log(torch.softmax(o, -1)), t)
            return net, loss, digit_batches(10, 48, s), None
        out.append(EvalCase(f"log_softmax_std{std}", b_nan_l, "nonfinite_loss"))

        # ---- healthy -----------------------------------------------------------------------
        s, depth, width = seed(), rng.choice([4, 10, 16]), rng.choice([32, 80])
        ok, how = rng.choice(["sgd", "adam", "none"]), rng.choice(["he", "he_uniform"])

        def h_relu(s=s, depth=depth, width=width, ok=ok, how=how):  # type: ignore[no-untyped-def]
            torch.manual_seed(s)
            net = mlp(depth, width, nn.ReLU, how)
            return net, F.cross_entropy, digit_batches(30, 64, s), opt_for(net, ok, 0.01 if ok == "sgd" else 1e-3)
        out.append(EvalCase(f"healthy_relu_he_d{depth}_w{width}_{ok}", h_relu, None))

        s, blocks = seed(), rng.choice([4, 12])
        act = rng.choice([nn.ReLU, nn.GELU])

        def h_res(s=s, blocks=blocks, act=act):  # type: ignore[no-untyped-def]
            torch.manual_seed(s)
            net = ResidualMLP(blocks, 48, act, expand=2)
            return net, F.cross_entropy, digit_batches(30, 64, s), opt_for(net, "adamw", 1e-3)
        out.append(EvalCase(f"healthy_residual_{act.__name__}_b{blocks}", h_res, None))

        s, depth, bn = seed(), rng.choice([3, 5]), rng.choice([True, False])

        def h_cnn(s=s, depth=depth, bn=bn):  # type: ignore[no-untyped-def]
            torch.manual_seed(s)
            net = cnn(depth, 12, nn.ReLU, "he", norm=bn)
            return net, F.cross_entropy, digit_batches(30, 48, s, "image"), opt_for(net, "sgd", 0.01)
        out.append(EvalCase(f"healthy_cnn_d{depth}_bn{bn}", h_cnn, None))

        s, cell, T = seed(), rng.choice([nn.LSTM, nn.GRU]), rng.choice([20, 40])
        nl = rng.choice([1, 2])

        def h_rnn(s=s, cell=cell, T=T, nl=nl):  # type: ignore[no-untyped-def]
            torch.manual_seed(s)
            net = SeqModel(cell, 32, layers=nl)
            return net, F.mse_loss, adding_batches(30, T, 32, s), opt_for(net, "adam", 3e-3)
        out.append(EvalCase(f"healthy_{cell.__name__}_T{T}", h_rnn, None))

        s, layers, d = seed(), rng.choice([2, 4]), rng.choice([32, 48])

        def h_lm(s=s, layers=layers, d=d):  # type: ignore[no-untyped-def]
            torch.manual_seed(s)
            net = LM(40, d, layers, 20)
            return net, seq_ce, token_batches(30, 40, 20, 16, s, stride=5, noise=0.05), opt_for(
                net, "adamw", 2e-3)
        out.append(EvalCase(f"healthy_transformer_L{layers}_d{d}", h_lm, None))

        s, depth = seed(), rng.choice([2, 3, 5])
        act, how = rng.choice([(nn.Tanh, "xavier_tanh_uniform"), (nn.ELU, "he"), (nn.SiLU, "he"),
                               (nn.LeakyReLU, "he")])
        norm = rng.choice([None, "ln"])

        def h_misc(s=s, depth=depth, act=act, how=how, norm=norm):  # type: ignore[no-untyped-def]
            torch.manual_seed(s)
            net = mlp(depth, 64, act, how, norm=norm)
            return net, F.cross_entropy, digit_batches(30, 48, s), opt_for(net, "sgd", 0.02)
        out.append(EvalCase(f"healthy_{act.__name__}_d{depth}", h_misc, None))

        s, depth = seed(), rng.choice([3, 4])

        def h_c1(s=s, depth=depth):  # type: ignore[no-untyped-def]
            torch.manual_seed(s)
            net = conv1d(depth, 16, nn.ReLU)
            init_linear(net, "he")
            return net, F.cross_entropy, digit_batches(30, 48, s, "seq"), opt_for(net, "adam", 1e-3)
        out.append(EvalCase(f"healthy_conv1d_d{depth}", h_c1, None))

        s, depth = seed(), rng.choice([1, 2])

        def h_sig(s=s, depth=depth):  # type: ignore[no-untyped-def]
            torch.manual_seed(s)
            net = mlp(depth, 64, nn.Sigmoid, "xavier_uniform")
            return net, F.cross_entropy, digit_batches(30, 48, s), opt_for(net, "sgd", 0.1)
        out.append(EvalCase(f"healthy_shallow_sigmoid_d{depth}", h_sig, None))
        s, p = seed(), rng.choice([0.1, 0.3])

        def h_drop(s=s, p=p):  # type: ignore[no-untyped-def]
            torch.manual_seed(s)
            net = nn.Sequential(nn.Linear(64, 128), nn.BatchNorm1d(128), nn.ReLU(), nn.Dropout(p),
                                nn.Linear(128, 128), nn.BatchNorm1d(128), nn.ReLU(), nn.Dropout(p),
                                nn.Linear(128, 10))
            return net, F.cross_entropy, digit_batches(30, 64, s), opt_for(net, "sgd", 0.1)
        out.append(EvalCase(f"healthy_bn_dropout_p{p}", h_drop, None))

        s, T = seed(), rng.choice([6, 10])

        def h_rnn_orth(s=s, T=T):  # type: ignore[no-untyped-def]
            torch.manual_seed(s)
            net = SeqModel(nn.RNN, 24)
            nn.init.orthogonal_(net.rnn.weight_hh_l0)
            return net, F.mse_loss, adding_batches(30, T, 32, s), opt_for(net, "adam", 3e-3)
        out.append(EvalCase(f"healthy_rnn_orthogonal_T{T}", h_rnn_orth, None))

        s = seed()

        def h_pool(s=s):  # type: ignore[no-untyped-def]
            torch.manual_seed(s)
            net = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.SiLU(), nn.MaxPool2d(2),
                                nn.Conv2d(16, 32, 3, padding=1), nn.SiLU(), nn.MaxPool2d(2),
                                nn.Flatten(), nn.Linear(32 * 4, 10))
            return net, F.cross_entropy, digit_batches(30, 48, s, "image"), opt_for(net, "adam", 2e-3)
        out.append(EvalCase("healthy_cnn_pool_silu", h_pool, None))
    return out


# -- evaluation -----------------------------------------------------------------------------------
def first_remedy_effect(case: EvalCase, finding: Finding) -> tuple[str, str]:
    """(remedy, verdict) for the finding's first-ranked remedy, tried on a fresh copy."""
    from gradguard.doctor import session
    from gradguard.doctor.remedies import TREATMENTS
    from gradguard.doctor.run import EXAM_BATCHES, Recipe, collect_batches, run

    model, loss_fn, data, opt = case.build()
    n = case.steps if opt is not None else min(case.steps, EXAM_BATCHES)
    batches = collect_batches(data, n)
    recipe = Recipe(model, batches, loss_fn, None, opt)
    with torch.random.fork_rng():
        base, _ = run(recipe, 0)
        remedy = next((r for r in finding.remedies if not (
            TREATMENTS.get(r) is not None and TREATMENTS[r].needs_optimizer and opt is None)),
            finding.remedies[0])
        t = TREATMENTS.get(remedy)
        if t is None or t.manual:
            return remedy, "manual"
        ctx = session._trial_context(base, recipe)
        time_axis = finding.evidence.get("axis") == "time"
        trial = session._trial(recipe, 0, base, t, ctx, time_axis, None)
    if not trial.applied:
        return remedy, f"not applied ({trial.note})"
    # strict: gradient flow or loss, not merely "the finding went away"
    bflow = ranking.time_flow(base) if time_axis else ranking.flow(base)
    tflow = trial.time_ratio if time_axis else trial.flow_ratio
    bd, td = ranking._decades(bflow), ranking._decades(tflow)
    flow_ok = (math.isfinite(bd) and math.isfinite(td) and bd >= 1.0
               and ranking.flow_gain(bflow, tflow) >= 0.5) or (
        not math.isfinite(bd) and math.isfinite(td))
    bl, tl = ranking.final_loss(base), trial.final_loss
    loss_ok = (math.isfinite(bl) and math.isfinite(tl) and tl < 0.95 * bl) or (
        not math.isfinite(bl) and math.isfinite(tl))
    verdict = "improves" if (flow_ok or loss_ok) else "no gain"
    return remedy, verdict + f" (flow {bflow:.2g}->{tflow:.2g}, loss {bl:.3g}->{tl:.3g})"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=2, help="networks per family (default 2: 42 networks)")
    ap.add_argument("--seed", type=int, default=1000)
    ap.add_argument("--json", help="write per-case results here")
    args = ap.parse_args(argv)
    all_cases = cases(args.n, args.seed)
    rows = []
    t0 = time.perf_counter()
    for c in all_cases:
        model, loss_fn, data, opt = c.build()
        t = time.perf_counter()
        report = diagnose(model, loss_fn, data, opt, steps=c.steps)
        row: dict[str, Any] = {"name": c.name, "expected": c.code, "found": report.codes,
                               "seconds": round(time.perf_counter() - t, 2)}
        if c.code is None:
            row["ok"] = not report.findings
        else:
            f = report.finding(c.code)
            row["code_ok"] = f is not None
            row["ok"] = f is not None and c.check(f, model)
            row["layers"] = f.layers if f else []
            if row["ok"]:
                assert f is not None
                row["remedy"], row["remedy_verdict"] = first_remedy_effect(c, f)
        rows.append(row)
        mark = "ok " if row["ok"] else "MISS" if c.code else "FALSE ALARM"
        print(f"{mark:11s} {c.name:38s} expected={c.code} found={report.codes} "
              f"{row.get('remedy', '')} {row.get('remedy_verdict', '')}", flush=True)
    sick = [r for r in rows if r["expected"]]
    healthy = [r for r in rows if not r["expected"]]
    detected = sum(r["ok"] for r in sick)
    code_only = sum(r["code_ok"] for r in sick)
    alarms = sum(not r["ok"] for r in healthy)
    tried = [r for r in sick if r.get("remedy_verdict") and r["remedy_verdict"] != "manual"
             and not r["remedy_verdict"].startswith("not applied")]
    improved = sum(r["remedy_verdict"].startswith("improves") for r in tried)
    manual = sum(r.get("remedy_verdict") == "manual" for r in sick)
    print()
    print(f"networks: {len(rows)} ({len(sick)} sick, {len(healthy)} healthy), "
          f"{time.perf_counter() - t0:.0f} s")
    print(f"detection (right code and layers): {detected}/{len(sick)} = {detected / len(sick):.1%}"
          f"  (right code alone: {code_only}/{len(sick)})")
    print(f"false alarms on healthy networks: {alarms}/{len(healthy)} = {alarms / len(healthy):.1%}")
    print(f"first-ranked remedy measurably improves flow or loss: {improved}/{len(tried)} = "
          f"{improved / max(1, len(tried)):.1%}  ({manual} needed a code change and were not tried)")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(rows, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
