"""SGD, momentum, Adagrad, RMSProp and Adam on a deep tanh net.

Momentum accumulates a velocity along consistent directions; the adaptive methods divide each
parameter's step by a running size of its own gradient, so every parameter takes steps of a
similar size whatever the scale of its gradient. Every optimizer gets a small learning-rate grid around its customary rate and
is judged at its best rate (a fair comparison needs each method tuned: Wilson et al. 2017;
Choi et al. 2019).

References:
    Polyak (1964) and Sutskever et al. (2013), "On the importance of initialization and momentum
    in deep learning", ICML; Duchi, Hazan & Singer (2011), "Adaptive Subgradient Methods", JMLR
    (Adagrad); Tieleman & Hinton (2012), Coursera lecture 6.5 (RMSProp); Kingma & Ba (2015),
    "Adam: A Method for Stochastic Optimization", ICLR.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gradguard.lab._result import Check, ExperimentResult
from gradguard.lab._train import layer_grad_norms, train_classifier
from gradguard.lab._util import fmt, mean, seed_list, steps_to
from gradguard.lab.datasets import digits
from gradguard.lab.models import MLP
from gradguard.lab.registry import ExperimentInfo, Outcome

__all__ = ["Config", "INFO", "OPTIMIZERS", "plot", "run"]

OPTIMIZERS: dict[str, tuple[Callable[..., torch.optim.Optimizer], float]] = {
    "sgd": (lambda p, lr: torch.optim.SGD(p, lr=lr), 0.1),
    "momentum": (lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=0.9), 0.01),
    "adagrad": (lambda p, lr: torch.optim.Adagrad(p, lr=lr), 0.01),
    "rmsprop": (lambda p, lr: torch.optim.RMSprop(p, lr=lr), 1e-3),
    "adam": (lambda p, lr: torch.optim.Adam(p, lr=lr), 1e-3),
}
"""Optimizer factories ``f(params, lr)`` and their customary learning rates."""

_ADAPTIVE = ("adagrad", "rmsprop", "adam")


@dataclass(frozen=True)
class Config:
    """Set-up: an MLP of ``depth`` tanh layers with PyTorch's default init on digits.

    Attributes:
        lr_multipliers: each optimizer runs at its customary rate times each of these; the best
            final training loss (mean over seeds) represents it.
        target_loss: speed = steps until the training loss falls below this.
    """

    activation: str = "tanh"
    init: str = "default"
    depth: int = 10
    width: int = 64
    steps: int = 400
    batch_size: int = 64
    lr_multipliers: tuple[float, ...] = (0.3, 1.0, 3.0, 10.0)
    target_loss: float = 0.5
    n_seeds: int = 2
    seed: int = 0


def run(cfg: Config) -> Outcome:
    data_split = digits()
    x, y = data_split.x_train[:256], data_split.y_train[:256]
    torch.manual_seed(cfg.seed)
    probe = MLP(data_split.n_features, 10, cfg.width, cfg.depth, cfg.activation, cfg.init)
    F.cross_entropy(probe(x), y).backward()
    norms = layer_grad_norms(list(probe.linears[:-1]))
    ratio = norms[0] / norms[-1]

    best: dict[str, dict[str, object]] = {}
    grid: dict[str, dict[str, float]] = {}
    for name, (make, base) in OPTIMIZERS.items():
        grid[name] = {}
        for mult in cfg.lr_multipliers:
            lr = base * mult
            finals, curves = [], []
            steps_axis: list[int] = []
            for s in seed_list(cfg):
                torch.manual_seed(s)
                model = MLP(data_split.n_features, 10, cfg.width, cfg.depth, cfg.activation, cfg.init)
                hist = train_classifier(model, data_split, make(model.parameters(), lr), steps=cfg.steps,
                                        batch_size=cfg.batch_size, generator=torch.Generator().manual_seed(s),
                                        eval_every=max(1, cfg.steps // 20))
                finals.append(hist.final_train_loss)
                curves.append(hist.train_loss)
                steps_axis = hist.steps
            final = mean(finals)
            grid[name][fmt(lr)] = final
            score = final if final == final else math.inf
            if name not in best or score < best[name]["score"]:
                curve = [mean(c) for c in zip(*curves)]
                best[name] = {"lr": lr, "score": score, "final": final, "curve": curve, "steps": steps_axis,
                              "to_target": steps_to(steps_axis, curve, cfg.target_loss)}

    def describe(n: str) -> str:
        b = best[n]
        t = b["to_target"]
        return f"{n} {fmt(b['final'])} (lr {fmt(b['lr'])}, " + \
            (f"below {cfg.target_loss:g} at step {t})" if t is not None else f"never below {cfg.target_loss:g})")

    def describe_ko(n: str) -> str:
        b = best[n]
        t = b["to_target"]
        return f"{n} {fmt(b['final'])} (lr {fmt(b['lr'])}, 손실 < {cfg.target_loss:g} 도달: " + \
            (f"{t} 스텝)" if t is not None else "못 함)")

    checks: list[Check] = []
    sgd, mom = best["sgd"]["score"], best["momentum"]["score"]
    checks.append(Check(
        "momentum_beats_sgd", mom < sgd,
        "Momentum trains the deep net faster than plain SGD (lower final training loss, each at its best rate).",
        "모멘텀은 순수 SGD보다 깊은 신경망을 더 빨리 학습시킨다 (각자 가장 좋은 학습률에서 최종 학습 손실이 더 낮다).",
        f"final training loss after {cfg.steps} steps: {describe('sgd')}; {describe('momentum')}.",
        f"{cfg.steps} 스텝 뒤 최종 학습 손실: {describe_ko('sgd')}; {describe_ko('momentum')}.",
        f"momentum {fmt(best['momentum']['final'])} vs SGD {fmt(best['sgd']['final'])}",
        {"sgd_final_loss": best["sgd"]["final"], "momentum_final_loss": best["momentum"]["final"]},
    ))
    adaptive = [n for n in _ADAPTIVE if n in best]

    def adaptive_vs(ref: str) -> tuple[str, str]:
        """Evidence (en, ko): the adaptive methods' final losses next to ``ref``'s."""
        return ("final training loss: " + "; ".join(describe(n) for n in adaptive) + f"; {describe(ref)}.",
                "최종 학습 손실: " + "; ".join(describe_ko(n) for n in adaptive) + f"; {describe_ko(ref)}.")

    ok = all(best[n]["score"] < sgd for n in adaptive)
    checks.append(Check(
        "adaptive_beat_sgd", ok,
        "Each adaptive method (Adagrad, RMSProp, Adam) trains it faster than plain SGD.",
        "적응형 방법(Adagrad, RMSProp, Adam)은 모두 순수 SGD보다 빨리 학습시킨다.",
        *adaptive_vs("sgd"),
        "adaptive " + ", ".join(f"{n} {fmt(best[n]['final'])}" for n in adaptive) + f" vs SGD {fmt(best['sgd']['final'])}",
        {f"{n}_final_loss": best[n]["final"] for n in adaptive},
    ))
    ok = all(best[n]["score"] < mom for n in adaptive)
    checks.append(Check(
        "adaptive_beat_momentum", ok,
        "The adaptive methods also beat momentum (each at its best rate).",
        "적응형 방법은 모멘텀보다도 낫다 (각자 가장 좋은 학습률에서).",
        *adaptive_vs("momentum"),
        f"best adaptive {fmt(min(best[n]['final'] for n in adaptive))} vs momentum {fmt(best['momentum']['final'])}",
        {"momentum_final_loss": best["momentum"]["final"]},
    ))
    data = {
        "grad_ratio_at_init": ratio, "grid": grid,
        "best": {n: {k: v for k, v in b.items() if k != "score"} for n, b in best.items()},
    }
    return Outcome(checks, data)


def plot(result: ExperimentResult) -> list:
    from gradguard.lab._plot import COLORS, figure, finite

    d = result.data
    fig, (a1, a2) = figure(2, width=4.8)
    for i, (n, b) in enumerate(d["best"].items()):
        a1.plot(b["steps"], finite(b["curve"]), color=COLORS[i], label=f"{n} (lr {fmt(b['lr'])})")
        lrs = list(d["grid"][n])
        a2.plot([float(v) for v in lrs], finite([d["grid"][n][v] for v in lrs]), "o-", color=COLORS[i], label=n)
    a1.axhline(math.log(10), ls=":", color="k", lw=1)
    a1.set(xlabel="step", ylabel="training loss", yscale="log",
           title=f"{result.config['depth']}-layer {result.config['activation']} net, best rate each")
    a1.legend(fontsize=8)
    a2.set(xscale="log", yscale="log", xlabel="learning rate", ylabel=f"final training loss",
           title="the learning-rate grid")
    a2.legend(fontsize=8)
    return [fig]


INFO = ExperimentInfo(
    name="optimizers",
    title_en="Optimizers on a deep net",
    title_ko="깊은 신경망에서의 옵티마이저",
    claim_en="On a deep net, momentum trains faster than plain SGD, and the adaptive methods "
             "(Adagrad, RMSProp, Adam), which scale each parameter's step by its own gradient "
             "history, train faster still.",
    claim_ko="깊은 신경망에서는 모멘텀이 순수 SGD보다 빨리 학습되고, 파라미터마다 자기 기울기 이력으로 "
             "스텝 크기를 조절하는 적응형 방법(Adagrad, RMSProp, Adam)은 그보다 더 빠르다.",
    source="Sutskever et al. (2013), ICML (momentum); Duchi et al. (2011), JMLR (Adagrad); Tieleman "
           "& Hinton (2012), lecture 6.5 (RMSProp); Kingma & Ba (2015), \"Adam\", ICLR",
    setup_en="An MLP of 10 tanh layers of 64 with PyTorch's default init on scikit-learn digits, batch "
             "64, 400 steps; each optimizer at 0.3×, 1×, 3× and 10× its customary rate (SGD 0.1, momentum "
             "0.01 with 0.9, Adagrad 0.01, RMSProp 1e-3, Adam 1e-3), judged at its best; 2 seeds.",
    setup_ko="폭 64인 tanh 층 10개짜리 MLP를 PyTorch 기본 초기화로 scikit-learn digits에 학습한다. 배치 64, "
             "400 스텝. 옵티마이저마다 관례적인 학습률(SGD 0.1, 모멘텀 0.01/0.9, Adagrad 0.01, RMSProp 1e-3, "
             "Adam 1e-3)의 0.3배, 1배, 3배, 10배를 돌려서 가장 좋은 결과로 비교한다. 시드는 2개.",
    config=Config(),
    quick_config=Config(steps=120, lr_multipliers=(1.0, 3.0), n_seeds=1),
    seconds_quick=4.0,
    seconds_full=44.0,
    runner=run,
    plotter=plot,
)
