"""L1 and L2 weight penalties keep the weights small and change the scale of the gradients;
L1 drives many weights to zero.

At a stationary point of ``data loss + penalty`` the data gradient equals minus the penalty
gradient, so the penalty sets the size of the gradient that keeps flowing late in training:
``2λw`` for L2 (it shrinks with the weights) and ``λ·sign(w)`` for L1 (the same size for every
non-zero weight, which pushes small weights all the way to zero).

References:
    Krogh & Hertz (1992), "A Simple Weight Decay Can Improve Generalization", NIPS;
    Tibshirani (1996), "Regression Shrinkage and Selection via the Lasso", JRSS B;
    Goodfellow, Bengio & Courville (2016), Deep Learning, Sections 7.1.1–7.1.2.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gradguard.lab._result import Check, ExperimentResult
from gradguard.lab._train import train_classifier
from gradguard.lab._util import fmt, geomean, mean, seed_list
from gradguard.lab.datasets import digits
from gradguard.lab.models import MLP
from gradguard.lab.registry import ExperimentInfo, Outcome

__all__ = ["Config", "INFO", "plot", "run"]

_KINDS = ("none", "l2", "l1")


@dataclass(frozen=True)
class Config:
    """Set-up: an MLP (``depth`` hidden ReLU layers of ``width``, He init) on digits, SGD with
    momentum; penalties ``l2 · Σw²`` and ``l1 · Σ|w|`` over the weight matrices.

    Attributes:
        zero_tol: a weight with ``|w| <`` this counts as zeroed (SGD's subgradient makes L1
            weights hover around zero within about ``lr · l1`` rather than sit at exactly 0).
    """

    width: int = 256
    depth: int = 2
    steps: int = 1000
    batch_size: int = 64
    lr: float = 0.01
    momentum: float = 0.9
    l2: float = 1e-2
    l1: float = 1e-3
    zero_tol: float = 1e-3
    n_seeds: int = 2
    seed: int = 0


def _penalty(kind: str, weights: list[torch.Tensor], cfg: Config) -> Callable[[], torch.Tensor] | None:
    if kind == "l2":
        return lambda: cfg.l2 * sum(w.pow(2).sum() for w in weights)
    if kind == "l1":
        return lambda: cfg.l1 * sum(w.abs().sum() for w in weights)
    return None


def run(cfg: Config) -> Outcome:
    data_split = digits()
    stats: dict[str, dict[str, list[float]]] = {k: {} for k in _KINDS}
    hist_w: dict[str, list[float]] = {}
    for kind in _KINDS:
        acc: dict[str, list[float]] = {"weight_norm": [], "zero_fraction": [], "data_grad": [],
                                       "penalty_grad": [], "train_loss": [], "test_acc": []}
        for s in seed_list(cfg):
            torch.manual_seed(s)
            model = MLP(data_split.n_features, 10, cfg.width, cfg.depth, "relu", "he")
            weights = [lin.weight for lin in model.linears]
            penalty = _penalty(kind, weights, cfg)
            opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)
            hist = train_classifier(model, data_split, opt, steps=cfg.steps, batch_size=cfg.batch_size,
                                    generator=torch.Generator().manual_seed(s),
                                    eval_every=cfg.steps, extra_loss=penalty)
            with torch.no_grad():
                flat = torch.cat([w.detach().flatten() for w in weights])
            acc["weight_norm"].append(flat.norm().item())
            acc["zero_fraction"].append((flat.abs() < cfg.zero_tol).float().mean().item())
            acc["train_loss"].append(hist.final_train_loss)
            acc["test_acc"].append(hist.test_acc[-1])
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(data_split.x_train), data_split.y_train).backward()
            acc["data_grad"].append(math.sqrt(sum(w.grad.pow(2).sum().item() for w in weights)))
            model.zero_grad(set_to_none=True)
            # The penalty's gradient where it is smooth: 2λw for L2; λ·sign(w) on the weights that
            # are not zeroed for L1 (at a zeroed weight the subgradient is any value in [-λ, λ]).
            if kind == "l2":
                acc["penalty_grad"].append(2 * cfg.l2 * flat.norm().item())
            elif kind == "l1":
                active = (flat.abs() >= cfg.zero_tol).sum().item()
                acc["penalty_grad"].append(cfg.l1 * math.sqrt(active))
            else:
                acc["penalty_grad"].append(0.0)
            if s == cfg.seed:
                mags = flat.abs().clamp_min(1e-8).log10()
                counts = torch.histc(mags, bins=40, min=-8.0, max=0.5)
                hist_w[kind] = (counts / counts.sum()).tolist()
        stats[kind] = {k: v for k, v in acc.items()}
    m = {k: {q: (geomean(v) if q in ("data_grad",) else mean(v)) for q, v in stats[k].items()} for k in _KINDS}

    checks: list[Check] = []
    n0 = m["none"]["weight_norm"]
    for kind, label, label_ko in (("l2", "L2", "L2"), ("l1", "L1", "L1")):
        wn = m[kind]["weight_norm"]
        checks.append(Check(
            f"{kind}_keeps_weights_small", wn < 0.7 * n0,
            f"The {label} penalty keeps the weights small (total weight norm under 0.7× the unpenalised run's).",
            f"{label_ko} 규제는 가중치를 작게 유지한다 (전체 가중치 노름이 규제 없는 경우의 0.7배 미만).",
            f"weight norm after {cfg.steps} steps: {label} {fmt(wn)} vs none {fmt(n0)} (×{fmt(wn / n0)}).",
            f"{cfg.steps} 스텝 뒤 가중치 노름: {label_ko} {fmt(wn)}, 규제 없음 {fmt(n0)} (×{fmt(wn / n0)}).",
            f"‖W‖ {label} {fmt(wn)} vs none {fmt(n0)}",
            {f"weight_norm_{kind}": wn, "weight_norm_none": n0},
        ))
    z = {k: m[k]["zero_fraction"] for k in _KINDS}
    ok = z["l1"] >= 10 * max(z["none"], 1e-4) and z["l1"] >= 5 * max(z["l2"], 1e-4)
    checks.append(Check(
        "l1_zeroes_weights", ok,
        f"L1 zeroes weights: the fraction with |w| < {cfg.zero_tol:g} is at least 10× the unpenalised "
        "run's and 5× the L2 run's.",
        f"L1은 가중치를 0으로 만든다. |w| < {cfg.zero_tol:g}인 가중치의 비율이 규제 없는 경우의 10배, L2의 5배 이상이다.",
        f"fraction of weights with |w| < {cfg.zero_tol:g}: L1 {z['l1']:.1%}, L2 {z['l2']:.1%}, none {z['none']:.1%}.",
        f"|w| < {cfg.zero_tol:g}인 가중치 비율: L1 {z['l1']:.1%}, L2 {z['l2']:.1%}, 규제 없음 {z['none']:.1%}.",
        f"zeroed L1 {z['l1']:.0%} vs L2 {z['l2']:.0%}, none {z['none']:.1%}",
        {f"zero_fraction_{k}": z[k] for k in _KINDS},
    ))
    g0 = m["none"]["data_grad"]
    ratios = {k: m[k]["data_grad"] / g0 for k in ("l2", "l1")}
    balance = {k: m[k]["data_grad"] / m[k]["penalty_grad"] for k in ("l2", "l1")}
    ok = all(abs(math.log10(r)) >= math.log10(1.5) for r in ratios.values()) and \
        all(1 / 3 <= b <= 3 for b in balance.values())
    checks.append(Check(
        "gradient_scale_changes", ok,
        "The penalties change the gradient scale: late in training the data-loss gradient differs "
        "by more than 1.5× from the unpenalised run's and is balanced by the penalty's gradient "
        "(their norms within 3× of each other, counting for L1 only the weights that are not zeroed).",
        "규제는 기울기의 크기를 바꾼다. 학습 후반 데이터 손실의 기울기가 규제 없는 경우와 1.5배 넘게 "
        "차이 나고, 규제 항의 기울기와 균형을 이룬다 (두 노름이 서로 3배 이내. L1은 0이 되지 않은 가중치만 센다).",
        f"‖∇ data loss‖ on the training set: none {fmt(g0)}, L2 {fmt(m['l2']['data_grad'])} (×{fmt(ratios['l2'])}), "
        f"L1 {fmt(m['l1']['data_grad'])} (×{fmt(ratios['l1'])}); ‖∇ penalty‖ (2λw; λ·sign(w) on non-zeroed weights): L2 {fmt(m['l2']['penalty_grad'])}, "
        f"L1 {fmt(m['l1']['penalty_grad'])}; final training loss none {fmt(m['none']['train_loss'])}, "
        f"L2 {fmt(m['l2']['train_loss'])}, L1 {fmt(m['l1']['train_loss'])}.",
        f"학습 세트에서 ‖∇ 데이터 손실‖: 규제 없음 {fmt(g0)}, L2 {fmt(m['l2']['data_grad'])} (×{fmt(ratios['l2'])}), "
        f"L1 {fmt(m['l1']['data_grad'])} (×{fmt(ratios['l1'])}). ‖∇ 규제 항‖ (2λw, L1은 0이 아닌 가중치의 λ·sign(w)): L2 {fmt(m['l2']['penalty_grad'])}, "
        f"L1 {fmt(m['l1']['penalty_grad'])}. 최종 학습 손실: 규제 없음 {fmt(m['none']['train_loss'])}, "
        f"L2 {fmt(m['l2']['train_loss'])}, L1 {fmt(m['l1']['train_loss'])}.",
        f"‖∇data‖ ×{fmt(ratios['l2'])} (L2), ×{fmt(ratios['l1'])} (L1)",
        {"data_grad_none": g0, "data_grad_l2": m["l2"]["data_grad"], "data_grad_l1": m["l1"]["data_grad"]},
    ))
    return Outcome(checks, {"summary": m, "log10_abs_w_hist": hist_w, "hist_range": [-8.0, 0.5]})


def plot(result: ExperimentResult) -> list:
    from gradguard.lab._plot import COLORS, figure

    d = result.data
    fig, (a1, a2) = figure(2, width=4.8)
    lo, hi = d["hist_range"]
    for i, (k, h) in enumerate(d["log10_abs_w_hist"].items()):
        step = (hi - lo) / len(h)
        a1.plot([lo + step * (j + 0.5) for j in range(len(h))], h, color=COLORS[i], label=k)
    a1.axvline(math.log10(result.config["zero_tol"]), ls=":", color="k", lw=1)
    a1.set(xlabel="log10 |w|", ylabel="fraction of weights", title="weight magnitudes after training")
    a1.legend()
    kinds = list(d["summary"])
    a2.bar([i - 0.2 for i in range(len(kinds))], [d["summary"][k]["data_grad"] for k in kinds], width=0.4,
           color=COLORS[0], label="‖∇ data loss‖")
    pen = [(i, d["summary"][k]["penalty_grad"]) for i, k in enumerate(kinds) if d["summary"][k]["penalty_grad"] > 0]
    a2.bar([i + 0.2 for i, _ in pen], [v for _, v in pen], width=0.4, color=COLORS[1], label="‖∇ penalty‖")
    a2.set_xticks(range(len(kinds)), kinds)
    a2.set(yscale="log", ylabel="gradient norm at the end", title="who sets the gradient scale")
    a2.legend(fontsize=8)
    return [fig]


INFO = ExperimentInfo(
    name="regularization",
    title_en="L1 and L2 penalties",
    title_ko="L1, L2 규제",
    claim_en="L1 and L2 penalties keep the weights small and change the scale of the gradients; L1 "
             "drives many weights to zero.",
    claim_ko="L1, L2 규제는 가중치를 작게 유지하고 기울기의 크기를 바꾼다. L1은 많은 가중치를 0으로 만든다.",
    source="Krogh & Hertz (1992), \"A Simple Weight Decay Can Improve Generalization\", NIPS; "
           "Tibshirani (1996), \"Regression Shrinkage and Selection via the Lasso\", JRSS B",
    setup_en="An MLP (2 hidden ReLU layers of 256, He init) on scikit-learn digits, SGD lr 0.01 with "
             "momentum 0.9, batch 64, 1000 steps: no penalty, 0.01·Σw² and 0.001·Σ|w|; 2 seeds.",
    setup_ko="MLP(ReLU 은닉층 256 × 2, He 초기화)를 scikit-learn digits로 학습한다. SGD(lr 0.01, momentum 0.9, "
             "배치 64) 1000 스텝. 규제 없음, 0.01·Σw², 0.001·Σ|w|를 비교한다. 시드는 2개.",
    config=Config(),
    quick_config=Config(steps=400, n_seeds=1),
    seconds_quick=2.0,
    seconds_full=9.0,
    runner=run,
    plotter=plot,
)
