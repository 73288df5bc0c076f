"""He et al. (2016): deeper *plain* nets train worse than shallower ones (degradation: a higher
*training* loss, so it is not overfitting), while residual nets of the same depth do not.

Both nets use the paper's recipe (BN after every weight layer, He init, SGD with momentum and
weight decay), so vanishing gradients from a bad init are ruled out; only the skip connections
differ.

References:
    He, Zhang, Ren & Sun (2016), "Deep Residual Learning for Image Recognition", CVPR, Fig. 1,
    Fig. 6 and Table 6.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gradguard.lab._result import Check, ExperimentResult
from gradguard.lab._train import train_classifier
from gradguard.lab._util import fmt, mean, seed_list
from gradguard.lab.datasets import digits
from gradguard.lab.models import MLP
from gradguard.lab.registry import ExperimentInfo, Outcome

__all__ = ["Config", "INFO", "plot", "run"]


@dataclass(frozen=True)
class Config:
    """Set-up: MLPs of ``width`` units with BN and He init; ``depth`` counts weight layers
    (the first layer, 2-layer blocks, the output layer).

    Attributes:
        acc_tolerance: "no degradation" allows the deepest residual net's test accuracy to trail
            the shallowest one's by at most this much.
    """

    depths: tuple[int, ...] = (8, 20, 56)
    width: int = 32
    steps: int = 300
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 1e-4
    acc_tolerance: float = 0.02
    n_seeds: int = 2
    seed: int = 0


def run(cfg: Config) -> Outcome:
    data_split = digits()
    depths = sorted(cfg.depths)
    if len(depths) < 2:
        raise ValueError(f"`depths` needs at least two depths to compare, got {cfg.depths}.")
    loss: dict[str, list[float]] = {"plain": [], "residual": []}
    acc: dict[str, list[float]] = {"plain": [], "residual": []}
    curves: dict[str, dict[str, list[float]]] = {"plain": {}, "residual": {}}
    steps_axis: list[int] = []
    for kind in ("plain", "residual"):
        for depth in depths:
            losses, accs, runs = [], [], []
            for s in seed_list(cfg):
                torch.manual_seed(s)
                model = MLP(data_split.n_features, 10, cfg.width, depth - 1, "relu", "he",
                            batch_norm=True, residual=kind == "residual")
                opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                      weight_decay=cfg.weight_decay)
                hist = train_classifier(model, data_split, opt, steps=cfg.steps,
                                        batch_size=cfg.batch_size,
                                        generator=torch.Generator().manual_seed(s),
                                        eval_every=max(1, cfg.steps // 15))
                losses.append(hist.final_train_loss)
                accs.append(hist.test_acc[-1])
                runs.append(hist.train_loss)
                steps_axis = hist.steps
            loss[kind].append(mean(losses))
            acc[kind].append(mean(accs))
            curves[kind][str(depth)] = [mean(c) for c in zip(*runs)]

    lo, hi = depths[0], depths[-1]
    row = lambda v: ", ".join(f"{d}: {fmt(x)}" for d, x in zip(depths, v))  # noqa: E731
    checks: list[Check] = []
    pl, rs = loss["plain"], loss["residual"]
    ok = all(b > a for a, b in zip(pl, pl[1:])) and pl[-1] >= 10 * pl[0]
    checks.append(Check(
        "plain_degrades", ok,
        "Deeper plain nets reach a higher training loss (it rises with depth, ≥ 10× from the "
        "shallowest to the deepest): degradation, not overfitting.",
        "평범한(plain) 신경망은 깊을수록 학습 손실이 더 높다 (깊이에 따라 오르고, 가장 얕은 것과 가장 깊은 것이 "
        "10배 이상 차이 난다). 과적합이 아니라 성능 저하(degradation)다.",
        f"final training loss of plain nets by depth: {row(pl)}; test accuracy: {row(acc['plain'])}.",
        f"plain 신경망의 깊이별 최종 학습 손실: {row(pl)}. 테스트 정확도: {row(acc['plain'])}.",
        f"plain loss {fmt(pl[0])} → {fmt(pl[-1])} (depth {lo} → {hi})",
        {f"plain_loss_depth{d}": v for d, v in zip(depths, pl)},
    ))
    rise_plain, rise_res = pl[-1] - pl[0], rs[-1] - rs[0]
    ok = rs[-1] < pl[-1] and rise_res < 0.1 * rise_plain
    checks.append(Check(
        "residual_removes_degradation", ok,
        "Residual nets of the same depths remove most of it: their training loss rises by less than "
        "a tenth of the plain nets' rise.",
        "같은 깊이의 잔차(residual) 신경망은 이 저하를 대부분 없앤다. 학습 손실이 오르는 폭이 plain 신경망의 "
        "1/10도 안 된다.",
        f"final training loss of residual nets by depth: {row(rs)}; rise from depth {lo} to {hi}: "
        f"residual {fmt(rise_res)}, plain {fmt(rise_plain)}.",
        f"잔차 신경망의 깊이별 최종 학습 손실: {row(rs)}. 깊이 {lo} → {hi}에서 오른 폭: 잔차 {fmt(rise_res)}, "
        f"plain {fmt(rise_plain)}.",
        f"depth {hi}: residual {fmt(rs[-1])} vs plain {fmt(pl[-1])}",
        {f"residual_loss_depth{d}": v for d, v in zip(depths, rs)},
    ))
    ra = acc["residual"]
    ok = ra[-1] >= ra[0] - cfg.acc_tolerance
    checks.append(Check(
        "residual_no_degradation", ok,
        f"The deepest residual net is as good as the shallowest (test accuracy within "
        f"{cfg.acc_tolerance:.0%}), as ResNets were in the paper.",
        f"논문의 ResNet처럼, 가장 깊은 잔차 신경망도 가장 얕은 것만큼 좋다 (테스트 정확도 차이 "
        f"{cfg.acc_tolerance:.0%} 이내).",
        f"residual test accuracy by depth: {row(ra)} ({cfg.steps} steps).",
        f"잔차 신경망의 깊이별 테스트 정확도: {row(ra)} ({cfg.steps} 스텝).",
        f"residual acc {ra[0]:.3f} → {ra[-1]:.3f}",
        {f"residual_acc_depth{d}": v for d, v in zip(depths, ra)},
    ))
    return Outcome(checks, {"depths": depths, "final_loss": loss, "test_acc": acc,
                            "steps": steps_axis, "curves": curves})


def plot(result: ExperimentResult) -> list:
    from gradguard.lab._plot import COLORS, figure, finite

    d = result.data
    fig, axes = figure(3, width=4.0)
    for ax, kind in zip(axes[:2], ("plain", "residual")):
        for i, (depth, curve) in enumerate(d["curves"][kind].items()):
            ax.plot(d["steps"], finite(curve), color=COLORS[i], label=f"{depth} layers")
        ax.set(xlabel="step", ylabel="training loss", yscale="log", title=f"{kind} nets")
        ax.legend(fontsize=8)
    for i, kind in enumerate(("plain", "residual")):
        axes[2].plot(d["depths"], finite(d["final_loss"][kind]), "o-", color=COLORS[i + 3], label=kind)
    axes[2].set(xlabel="depth (weight layers)", ylabel="final training loss", yscale="log",
                title="degradation")
    axes[2].legend()
    return [fig]


INFO = ExperimentInfo(
    name="residual",
    title_en="Residual connections and the degradation problem",
    title_ko="잔차 연결과 성능 저하 문제",
    claim_en="Deeper plain nets train worse than shallower ones (degradation: a higher training "
             "loss); residual nets of the same depth do not.",
    claim_ko="plain 신경망은 깊을수록 오히려 학습이 더 안 된다 (성능 저하: 학습 손실 자체가 높다). 같은 깊이의 "
             "잔차 신경망에서는 그런 일이 없다.",
    source="He, Zhang, Ren & Sun (2016), \"Deep Residual Learning for Image Recognition\", CVPR, "
           "Fig. 1, Fig. 6, Table 6",
    setup_en="MLPs of 32 units with BN after every weight layer and He init, 8/20/56 weight layers, "
             "plain versus 2-layer residual blocks, on scikit-learn digits; SGD momentum 0.9, lr "
             "0.05, weight decay 1e-4, batch 64, 300 steps (15 epochs); 2 seeds.",
    setup_ko="폭 32, 모든 가중치 층 뒤에 BN, He 초기화를 쓴 MLP를 가중치 층 8/20/56개로 만들고, plain 구조와 "
             "2층짜리 잔차 블록 구조를 scikit-learn digits에서 비교한다. SGD(momentum 0.9, lr 0.05, weight "
             "decay 1e-4, 배치 64)로 300 스텝(15 에포크), 시드 2개.",
    config=Config(),
    quick_config=Config(depths=(6, 24), steps=150, n_seeds=1),
    seconds_quick=2.0,
    seconds_full=22.0,
    runner=run,
    plotter=plot,
)
