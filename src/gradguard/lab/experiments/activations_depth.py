"""At depth 10–20, sigmoid and tanh nets stall while the ReLU family trains.

Every activation gets the initialisation its own paper recommends (Glorot & Bengio's normalized
init for sigmoid and tanh, He et al.'s for the ReLU family), so the activation is the only change.
The first/last gradient ratio ``‖∇W₁‖ / ‖∇W_L‖`` (first hidden layer over last hidden layer) is
measured at initialisation.

References:
    Glorot, Bordes & Bengio (2011), "Deep Sparse Rectifier Neural Networks", AISTATS;
    Maas, Hannun & Ng (2013), "Rectifier Nonlinearities Improve Neural Network Acoustic Models"
    (LeakyReLU); Clevert, Unterthiner & Hochreiter (2016), "Fast and Accurate Deep Network Learning
    by Exponential Linear Units", ICLR; He et al. (2015), "Delving Deep into Rectifiers", ICCV
    (PReLU); Hendrycks & Gimpel (2016), "Gaussian Error Linear Units".
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from gradguard.lab._result import Check, ExperimentResult
from gradguard.lab._train import grad_ratio, train_classifier
from gradguard.lab._util import fmt, geomean, mean, seed_list
from gradguard.lab.datasets import digits
from gradguard.lab.models import MLP
from gradguard.lab.registry import ExperimentInfo, Outcome

__all__ = ["Config", "INFO", "plot", "run"]

_SATURATING = ("sigmoid", "tanh")
_RELU_FAMILY = ("relu", "leaky_relu", "elu", "gelu", "prelu")
_LN10 = math.log(10)


@dataclass(frozen=True)
class Config:
    """Set-up: MLPs of ``width`` units on digits, SGD with momentum, ``steps`` minibatch steps.

    Attributes:
        init: ``"recommended"`` (Xavier for sigmoid/tanh, He for the ReLU family) or one init
            name from :data:`gradguard.lab.models.INITS` used for every activation.
        stall_fraction: a run "stalls" if its final training loss stays above this fraction of
            the chance-level loss ln 10.
        train_loss: a run "trains" if its final training loss is below this.
    """

    depths: tuple[int, ...] = (10, 20)
    activations: tuple[str, ...] = _SATURATING + _RELU_FAMILY
    init: str = "recommended"
    width: int = 64
    steps: int = 600
    batch_size: int = 64
    lr: float = 0.01
    momentum: float = 0.9
    stall_fraction: float = 0.9
    train_loss: float = 0.5
    n_seeds: int = 2
    seed: int = 0


def _init_for(cfg: Config, act: str) -> str:
    if cfg.init != "recommended":
        return cfg.init
    return "xavier" if act in _SATURATING else "he"


def run(cfg: Config) -> Outcome:
    data_split = digits()
    probe_x, probe_y = data_split.x_train[:256], data_split.y_train[:256]
    curves: dict[str, dict[str, list[float]]] = {}
    final: dict[str, dict[str, float]] = {}
    ratio: dict[str, dict[str, float]] = {}
    test_acc: dict[str, dict[str, float]] = {}
    steps_axis: list[int] = []
    for depth in cfg.depths:
        dk = str(depth)
        curves[dk], final[dk], ratio[dk], test_acc[dk] = {}, {}, {}, {}
        for act in cfg.activations:
            losses, ratios, accs, runs = [], [], [], []
            for s in seed_list(cfg):
                torch.manual_seed(s)
                model = MLP(data_split.n_features, 10, cfg.width, depth, act, _init_for(cfg, act))
                ratios.append(grad_ratio(model, probe_x, probe_y))
                opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)
                hist = train_classifier(
                    model, data_split, opt, steps=cfg.steps, batch_size=cfg.batch_size,
                    generator=torch.Generator().manual_seed(s), eval_every=max(1, cfg.steps // 20),
                )
                steps_axis = hist.steps
                losses.append(hist.final_train_loss)
                accs.append(hist.test_acc[-1])
                runs.append(hist.train_loss)
            curves[dk][act] = [mean(col) for col in zip(*runs)]
            final[dk][act] = mean(losses)
            ratio[dk][act] = geomean(ratios)
            test_acc[dk][act] = mean(accs)

    stall = cfg.stall_fraction * _LN10
    deep = str(max(cfg.depths))
    checks: list[Check] = []
    for act in (a for a in _SATURATING if a in cfg.activations):
        losses = {d: final[d][act] for d in final}
        ok = all(v != v or v >= stall for v in losses.values())
        shown = ", ".join(f"depth {d}: {fmt(v, 4)}" for d, v in losses.items())
        shown_ko = ", ".join(f"깊이 {d}: {fmt(v, 4)}" for d, v in losses.items())
        checks.append(Check(
            f"{act}_stalls", ok,
            f"{act} nets stall: the final training loss stays near chance (≥ {fmt(stall, 3)}, "
            f"{cfg.stall_fraction:g} × ln 10) at every depth.",
            f"{act} 신경망은 학습이 멈춘다. 어느 깊이에서든 최종 학습 손실이 무작위 추측 수준"
            f"(ln 10의 {cfg.stall_fraction:g}배 = {fmt(stall, 3)} 이상)에 머문다.",
            f"final training loss {shown} (ln 10 = 2.303); ‖∇W₁‖/‖∇W_L‖ at init, depth {deep}: "
            f"{fmt(ratio[deep][act])}.",
            f"최종 학습 손실 {shown_ko} (ln 10 = 2.303). 깊이 {deep}에서 초기화 직후 ‖∇W₁‖/‖∇W_L‖ = "
            f"{fmt(ratio[deep][act])}.",
            f"{act} loss {fmt(final[deep][act], 3)} @ depth {deep}",
            {f"{act}_loss_depth{d}": v for d, v in losses.items()},
        ))
    relus = [a for a in _RELU_FAMILY if a in cfg.activations]
    if relus:
        worst = max(((d, a) for d in final for a in relus), key=lambda da: (
            math.inf if final[da[0]][da[1]] != final[da[0]][da[1]] else final[da[0]][da[1]]))
        worst_loss = final[worst[0]][worst[1]]
        ok = worst_loss == worst_loss and worst_loss < cfg.train_loss
        checks.append(Check(
            "relu_family_trains", ok,
            f"ReLU, LeakyReLU, ELU, GELU and PReLU nets train at every depth (final training loss "
            f"< {cfg.train_loss:g}).",
            f"ReLU, LeakyReLU, ELU, GELU, PReLU 신경망은 모든 깊이에서 학습된다 (최종 학습 손실 < {cfg.train_loss:g}).",
            f"worst final training loss {fmt(worst_loss)} ({worst[1]}, depth {worst[0]}); at depth {deep}: "
            + ", ".join(f"{a} {fmt(final[deep][a])}" for a in relus) + ".",
            f"가장 나쁜 최종 학습 손실 {fmt(worst_loss)} ({worst[1]}, 깊이 {worst[0]}). 깊이 {deep}에서는 "
            + ", ".join(f"{a} {fmt(final[deep][a])}" for a in relus) + ".",
            f"ReLU family worst loss {fmt(worst_loss)}",
            {f"{a}_loss_depth{deep}": final[deep][a] for a in relus},
        ))
        if "sigmoid" in cfg.activations:
            sig = ratio[deep]["sigmoid"]
            lowest_relu = min(ratio[deep][a] for a in relus)
            ok = sig < 1e-3 and lowest_relu > 0.1
            checks.append(Check(
                "gradient_ratio", ok,
                f"At depth {deep} the first layer of the sigmoid net gets under 1/1000 of the last "
                "layer's gradient, while every ReLU-family net keeps more than 1/10.",
                f"깊이 {deep}에서 sigmoid 신경망의 첫 층은 마지막 층 기울기의 1/1000도 받지 못하지만, "
                "ReLU 계열은 모두 1/10 이상을 유지한다.",
                f"‖∇W₁‖/‖∇W_L‖ at init: " + ", ".join(f"{a} {fmt(ratio[deep][a])}" for a in cfg.activations) + ".",
                f"초기화 직후 ‖∇W₁‖/‖∇W_L‖: " + ", ".join(f"{a} {fmt(ratio[deep][a])}" for a in cfg.activations) + ".",
                f"ratio sigmoid {fmt(sig)} vs ReLU family ≥ {fmt(lowest_relu)}",
                {f"ratio_{a}": ratio[deep][a] for a in cfg.activations},
            ))
    data = {"steps": steps_axis, "curves": curves, "final_loss": final, "grad_ratio": ratio,
            "test_acc": test_acc, "inits": {a: _init_for(cfg, a) for a in cfg.activations}}
    return Outcome(checks, data)


def plot(result: ExperimentResult) -> list:
    from gradguard.lab._plot import COLORS, figure, finite

    d = result.data
    depths = list(d["curves"])
    fig, axes = figure(len(depths) + 1, width=4.3)
    axes = axes if isinstance(axes, list) else [axes]
    for ax, dk in zip(axes, depths):
        for i, (act, curve) in enumerate(d["curves"][dk].items()):
            ax.plot(d["steps"], finite(curve), color=COLORS[i], label=f"{act} ({d['inits'][act]})")
        ax.axhline(math.log(10), ls=":", color="k", lw=1)
        ax.set(xlabel="step", ylabel="training loss", title=f"depth {dk}", yscale="log")
    axes[0].legend(fontsize=7)
    ax = axes[-1]
    acts = list(d["grad_ratio"][depths[-1]])
    width = 0.8 / len(depths)
    for j, dk in enumerate(depths):
        ax.bar([i + j * width for i in range(len(acts))], [d["grad_ratio"][dk][a] for a in acts],
               width=width, label=f"depth {dk}", color=COLORS[j])
    ax.set_yscale("log")
    ax.set_xticks([i + width * (len(depths) - 1) / 2 for i in range(len(acts))], acts, rotation=45, fontsize=8)
    ax.set(ylabel="‖∇W₁‖ / ‖∇W_L‖ at init", title="first/last gradient ratio")
    ax.legend(fontsize=7)
    return [fig]


INFO = ExperimentInfo(
    name="activations_depth",
    title_en="Activations at depth 10–20",
    title_ko="깊이 10–20에서의 활성화 함수",
    claim_en="At depth 10–20, sigmoid and tanh nets stall while ReLU, LeakyReLU, ELU, GELU and "
             "PReLU nets train; the first/last gradient ratio shows why.",
    claim_ko="깊이가 10–20 정도 되면 sigmoid와 tanh 신경망은 학습이 멈추고, ReLU, LeakyReLU, ELU, GELU, "
             "PReLU 신경망은 학습된다. 첫 층과 마지막 층의 기울기 비율이 그 이유를 보여 준다.",
    source="Glorot, Bordes & Bengio (2011), \"Deep Sparse Rectifier Neural Networks\", AISTATS; "
           "Clevert et al. (2016), ELU, ICLR; He et al. (2015), PReLU, ICCV; Hendrycks & Gimpel (2016), GELU",
    setup_en="MLPs of 64 units, 10 and 20 hidden layers, on scikit-learn digits; SGD with momentum "
             "0.9, lr 0.01, batch 64, 600 steps; each activation with its recommended init "
             "(Xavier for sigmoid/tanh, He for the ReLU family); 2 seeds.",
    setup_ko="폭 64, 은닉층 10개와 20개인 MLP를 scikit-learn digits로 학습한다. SGD(momentum 0.9, lr 0.01, "
             "배치 64)로 600 스텝을 돌리고, 활성화 함수마다 권장 초기화(sigmoid/tanh는 Xavier, ReLU 계열은 He)를 "
             "쓴다. 시드는 2개.",
    config=Config(),
    quick_config=Config(depths=(10,), steps=150, n_seeds=1),
    seconds_quick=3.0,
    seconds_full=45.0,
    runner=run,
    plotter=plot,
)
