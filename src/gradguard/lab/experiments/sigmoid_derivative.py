"""σ′ ≤ 1/4 and tanh′ ≤ 1, and the gradient reaching layer 1 shrinks like the product of the
per-layer factors over depth.

Backpropagation multiplies the error signal by ``diag(f′(z_l)) W_{l+1}^T`` once per layer, so
``δ_1 = Π_l diag(f′(z_l)) W_{l+1}^T δ_L``. With f′ ≤ 1/4 (sigmoid) every factor has a gain of at most
``‖W‖₂ / 4``; at init its typical gain is ``rms(f′(z_l)) · ‖W_{l+1}‖_F / sqrt(fan_out)``. The
experiment measures ``‖δ_1‖ / ‖δ_L‖`` (the error signal at the first hidden layer over the last)
at initialisation and compares it with the product of those per-layer gains.

References:
    Hochreiter (1991), "Untersuchungen zu dynamischen neuronalen Netzen" (diploma thesis);
    Glorot & Bengio (2010), "Understanding the difficulty of training deep feedforward neural
    networks", AISTATS, Section 4.2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gradguard.lab._result import Check, ExperimentResult
from gradguard.lab._util import fmt, geomean, seed_list
from gradguard.lab.datasets import digits
from gradguard.lab.models import MLP
from gradguard.lab.registry import ExperimentInfo, Outcome

__all__ = ["Config", "INFO", "plot", "run"]

_NETS = (("sigmoid", "default"), ("sigmoid", "xavier"), ("tanh", "xavier"), ("relu", "he"))


@dataclass(frozen=True)
class Config:
    """Set-up: MLPs of ``width`` units on a batch of ``batch_size`` digits, measured at init.

    Attributes:
        depths: hidden-layer counts for the ratio-versus-depth curve.
        profile_depth: the depth whose per-layer profile is plotted and tested against 0.5^10.
        nets: (activation, init) pairs compared.
    """

    depths: tuple[int, ...] = (2, 4, 6, 8, 10, 12, 14, 16, 18, 20)
    profile_depth: int = 10
    width: int = 64
    batch_size: int = 512
    nets: tuple[tuple[str, str], ...] = _NETS
    n_seeds: int = 5
    seed: int = 0


def _measure(act: str, init: str, depth: int, width: int, x: torch.Tensor, y: torch.Tensor,
             seed: int) -> tuple[list[float], float]:
    """Per-layer ‖δ_l‖ (gradient w.r.t. each hidden pre-activation) and the product prediction."""
    torch.manual_seed(seed)
    model = MLP(x.shape[1], 10, width, depth, act, init)
    pre: list[torch.Tensor] = []

    def keep(_m: torch.nn.Module, _i: object, out: torch.Tensor) -> None:
        out.retain_grad()
        pre.append(out)

    hooks = [lin.register_forward_hook(keep) for lin in model.linears[:-1]]
    F.cross_entropy(model(x), y).backward()
    for h in hooks:
        h.remove()
    norms = [z.grad.norm().item() for z in pre]
    predicted = 1.0
    for layer in range(depth - 1):
        z = pre[layer].detach().requires_grad_()
        (slope,) = torch.autograd.grad(model.acts[layer](z).sum(), z)
        w = model.linears[layer + 1].weight.detach()
        predicted *= slope.pow(2).mean().sqrt().item() * w.norm().item() / math.sqrt(w.shape[0])
    return norms, predicted


def run(cfg: Config) -> Outcome:
    # Part 1: the derivative bounds, on a fine grid, with autograd.
    grid = torch.linspace(-8.0, 8.0, 16001, dtype=torch.float64, requires_grad=True)
    (d_sig,) = torch.autograd.grad(torch.sigmoid(grid).sum(), grid)
    (d_tanh,) = torch.autograd.grad(torch.tanh(grid).sum(), grid)
    sig_max, tanh_max = d_sig.max().item(), d_tanh.max().item()
    sig_at = round(grid[d_sig.argmax()].item(), 6) + 0.0  # + 0.0 turns -0.0 into 0.0

    # Part 2: the error signal across depth at init, for each (activation, init).
    data_split = digits()
    x, y = data_split.x_train[: cfg.batch_size], data_split.y_train[: cfg.batch_size]
    seeds = seed_list(cfg)
    depths = sorted(set(cfg.depths) | {cfg.profile_depth})
    ratio: dict[str, list[float]] = {}
    predicted: dict[str, list[float]] = {}
    profile: dict[str, list[float]] = {}
    for act, init in cfg.nets:
        key = f"{act}+{init}"
        ratio[key], predicted[key] = [], []
        for depth in depths:
            rs, ps, profs = [], [], []
            for s in seeds:
                norms, pred = _measure(act, init, depth, cfg.width, x, y, s)
                rs.append(norms[0] / norms[-1])
                ps.append(pred)
                profs.append(norms)
            ratio[key].append(geomean(rs))
            predicted[key].append(geomean(ps))
            if depth == cfg.profile_depth:
                profile[key] = [geomean(col) for col in zip(*profs)]

    # Geometric decay of sigmoid+xavier: fit log10(ratio) = a + b (depth - 1).
    i_prof = depths.index(cfg.profile_depth)
    sig_key = "sigmoid+xavier" if "sigmoid+xavier" in ratio else next(k for k in ratio if k.startswith("sigmoid"))
    xs = [d - 1 for d in depths]
    ys = [math.log10(r) for r in ratio[sig_key]]
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((a - mx) ** 2 for a in xs)
    slope = sum((a - mx) * (b - my) for a, b in zip(xs, ys)) / sxx if sxx else math.nan
    ss_res = sum((b - (my + slope * (a - mx))) ** 2 for a, b in zip(xs, ys))
    ss_tot = sum((b - my) ** 2 for b in ys)
    r2 = 1 - ss_res / ss_tot if ss_tot > 0 else math.nan
    factor = 10 ** slope

    checks: list[Check] = []
    ok = abs(sig_max - 0.25) < 1e-6 and abs(tanh_max - 1.0) < 1e-6
    checks.append(Check(
        "derivative_bounds", ok,
        "σ′(x) = σ(x)(1 − σ(x)) never exceeds 1/4, and tanh′(x) = 1 − tanh²(x) never exceeds 1.",
        "σ′(x) = σ(x)(1 − σ(x))의 최댓값은 1/4이고, tanh′(x) = 1 − tanh²(x)의 최댓값은 1이다.",
        f"max σ′ = {sig_max:.6f} at x = {sig_at:.3f}; max tanh′ = {tanh_max:.6f} (autograd on a grid over [−8, 8]).",
        f"[−8, 8] 구간에서 autograd로 구한 σ′의 최댓값은 x = {sig_at:.3f}에서 {sig_max:.6f}, tanh′의 최댓값은 {tanh_max:.6f}.",
        f"max σ′ {sig_max:.4f}, max tanh′ {tanh_max:.4f}",
        {"max_sigmoid_derivative": sig_max, "max_tanh_derivative": tanh_max},
    ))

    errs = {k: abs(math.log10(ratio[k][i_prof] / predicted[k][i_prof])) for k in ratio}
    worst = max(errs, key=errs.__getitem__)
    ok = errs[worst] < math.log10(2.0)
    checks.append(Check(
        "product_law",
        ok,
        f"At depth {cfg.profile_depth}, ‖δ₁‖/‖δ_L‖ equals the product over layers of "
        "rms(f′(z_l)) · ‖W_{l+1}‖_F / √fan_out (within a factor of 2) for every activation and init.",
        f"깊이 {cfg.profile_depth}에서 ‖δ₁‖/‖δ_L‖이 층마다의 이득 rms(f′(z_l)) · ‖W_{{l+1}}‖_F / √fan_out을 "
        "모두 곱한 값과 (2배 이내로) 일치한다. 활성화 함수와 초기화 방식에 상관없이 그렇다.",
        "measured / predicted: " + ", ".join(
            f"{k} {fmt(ratio[k][i_prof])} / {fmt(predicted[k][i_prof])}" for k in ratio),
        "측정값 / 곱으로 예측한 값: " + ", ".join(
            f"{k} {fmt(ratio[k][i_prof])} / {fmt(predicted[k][i_prof])}" for k in ratio),
        f"worst measured/product {fmt(10 ** errs[worst])}x ({worst})",
        {f"ratio_{k}": ratio[k][i_prof] for k in ratio} | {f"product_{k}": predicted[k][i_prof] for k in ratio},
    ))

    ok = factor < 0.5 and r2 >= 0.95
    checks.append(Check(
        "geometric_decay", ok,
        "For a sigmoid net the ratio falls geometrically with depth: log ‖δ₁‖/‖δ_L‖ is a straight "
        "line in depth, with a per-layer factor below 0.5.",
        "sigmoid 신경망에서는 이 비율이 깊이에 따라 기하급수적으로 줄어든다. 즉 log ‖δ₁‖/‖δ_L‖이 깊이에 대해 "
        "직선이고, 층마다 곱해지는 배율은 0.5보다 작다.",
        f"{sig_key}: per-layer factor {factor:.3f} (fit over depths {depths[0]}–{depths[-1]}, R² = {r2:.4f}).",
        f"{sig_key}: 층당 배율 {factor:.3f} (깊이 {depths[0]}–{depths[-1]}에 직선 적합, R² = {r2:.4f}).",
        f"x{factor:.3f}/layer, R² {r2:.3f}",
        {"per_layer_factor": factor, "fit_r2": r2},
    ))

    sig_ratios = {k: ratio[k][i_prof] for k in ratio if k.startswith("sigmoid")}
    tanh_ratios = {k: ratio[k][i_prof] for k in ratio if k.startswith("tanh")}
    worst_sig = max(sig_ratios.values()) if sig_ratios else math.nan
    best_tanh = min(tanh_ratios.values()) if tanh_ratios else math.nan
    ok = worst_sig <= 0.5 ** 10 and best_tanh >= 100 * worst_sig
    checks.append(Check(
        "depth10_magnitude", ok,
        f"At depth {cfg.profile_depth} the sigmoid net's first layer receives at most 0.5^10 ≈ 0.001 "
        "of the last layer's gradient, while tanh (tanh′ ≤ 1) loses at least 100 times less.",
        f"깊이 {cfg.profile_depth}에서 sigmoid 신경망의 첫 층에는 마지막 층 기울기의 0.5^10 ≈ 0.001 이하만 "
        "도달하는 반면, tanh(tanh′ ≤ 1)는 그보다 100배 이상 덜 줄어든다.",
        "‖δ₁‖/‖δ_L‖: " + ", ".join(f"{k} {fmt(v)}" for k, v in {**sig_ratios, **tanh_ratios}.items())
        + f" (0.5^10 = {0.5 ** 10:.2e}).",
        "‖δ₁‖/‖δ_L‖: " + ", ".join(f"{k} {fmt(v)}" for k, v in {**sig_ratios, **tanh_ratios}.items())
        + f" (0.5^10 = {0.5 ** 10:.2e}).",
        f"sigmoid {fmt(worst_sig)} vs tanh {fmt(best_tanh)} (0.5^10 = 9.8e-04)",
        {"sigmoid_ratio_depth10": worst_sig, "tanh_ratio_depth10": best_tanh},
    ))

    step = max(1, len(grid) // 400)
    data = {
        "grid": grid.detach()[::step].tolist(),
        "sigmoid_derivative": d_sig[::step].tolist(),
        "tanh_derivative": d_tanh[::step].tolist(),
        "depths": depths,
        "ratio": ratio,
        "predicted": predicted,
        "profile": profile,
        "per_layer_factor": factor,
    }
    return Outcome(checks, data)


def plot(result: ExperimentResult) -> list:
    from gradguard.lab._plot import COLORS, figure

    d = result.data
    fig1, (a1, a2) = figure(2)
    a1.plot(d["grid"], d["sigmoid_derivative"], label="σ′(x)", color=COLORS[0])
    a1.plot(d["grid"], d["tanh_derivative"], label="tanh′(x)", color=COLORS[1])
    a1.axhline(0.25, ls=":", color=COLORS[0])
    a1.axhline(1.0, ls=":", color=COLORS[1])
    a1.set(xlabel="x", ylabel="derivative", title="σ′ ≤ 0.25, tanh′ ≤ 1")
    a1.legend()
    depth = result.config["profile_depth"]
    for i, (k, prof) in enumerate(d["profile"].items()):
        a2.semilogy(range(1, len(prof) + 1), prof, "o-", label=k, color=COLORS[i])
    a2.set(xlabel="hidden layer", ylabel="‖δ_l‖ (grad w.r.t. pre-activation)",
           title=f"Error signal per layer at init, depth {depth}")
    a2.legend(fontsize=8)
    fig2, ax = figure(1, width=6)
    for i, k in enumerate(d["ratio"]):
        ax.semilogy(d["depths"], d["ratio"][k], "o-", color=COLORS[i], label=f"{k} measured")
        ax.semilogy(d["depths"], d["predicted"][k], "x--", color=COLORS[i], alpha=0.7,
                    label=f"{k} product of layer gains")
    ax.semilogy(d["depths"], [0.5 ** (n - 1) for n in d["depths"]], ":", color="k", label="0.5^(depth−1)")
    ax.set(xlabel="depth (hidden layers)", ylabel="‖δ₁‖ / ‖δ_L‖",
           title="Gradient reaching layer 1 vs depth")
    ax.legend(fontsize=7)
    return [fig1, fig2]


INFO = ExperimentInfo(
    name="sigmoid_derivative",
    title_en="The sigmoid's derivative and the product over depth",
    title_ko="sigmoid 도함수와 깊이에 따른 곱",
    claim_en="σ′ ≤ 0.25 and tanh′ ≤ 1, so the gradient that reaches layer 1 shrinks like the "
             "product of the per-layer factors over depth (0.5¹⁰ ≈ 0.001).",
    claim_ko="σ′ ≤ 0.25, tanh′ ≤ 1이므로 첫 번째 층까지 전달되는 기울기는 층마다 곱해지는 계수의 곱만큼 "
             "줄어든다 (0.5¹⁰ ≈ 0.001).",
    source="Hochreiter (1991), diploma thesis, TU München; Glorot & Bengio (2010), "
           "\"Understanding the difficulty of training deep feedforward neural networks\", AISTATS, §4.2",
    setup_en="Autograd derivatives on a grid; then MLPs of 64 units, 2 to 20 hidden layers, on a "
             "batch of scikit-learn digits, measured at initialisation: the gradient with respect "
             "to each hidden layer's pre-activation, against the product of the per-layer gains.",
    setup_ko="먼저 격자 위에서 autograd로 도함수를 구한다. 그다음 폭 64, 은닉층 2–20개짜리 MLP를 scikit-learn "
             "digits 한 배치에 대해 초기화 직후 그대로 측정한다. 각 은닉층 pre-activation에 대한 기울기를 "
             "층별 이득의 곱과 비교한다.",
    config=Config(),
    quick_config=Config(depths=(2, 5, 10), n_seeds=2, batch_size=256),
    seconds_quick=1.5,
    seconds_full=3.0,
    runner=run,
    plotter=plot,
)
