"""Saxe et al. (2014): with orthogonal initial weights, the learning time of a deep *linear* net
does not depend on its depth; with scaled Gaussian weights it grows with depth.

Saxe et al.'s analysis sets the learning rate ∝ 1/depth (the largest stable rate shrinks as
1/depth), and with it the number of steps to a given loss stays constant for orthogonal
(dynamical-isometry) initial conditions. The experiment runs that regime and, as a second view,
one fixed learning rate for every depth, where orthogonal nets even get *faster* with depth
(the gradient's effective step grows with the number of layers).

References:
    Saxe, McClelland & Ganguli (2014), "Exact solutions to the nonlinear dynamics of learning in
    deep linear neural networks", ICLR, Section 3 and Fig. 6.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from gradguard.lab._result import Check, ExperimentResult
from gradguard.lab._train import train_classifier
from gradguard.lab._util import fmt, geomean, seed_list, steps_to
from gradguard.lab.datasets import digits
from gradguard.lab.models import MLP
from gradguard.lab.registry import ExperimentInfo, Outcome

__all__ = ["Config", "INFO", "plot", "run"]


@dataclass(frozen=True)
class Config:
    """Set-up: linear nets (no bias, no activation) of ``width`` units on digits, plain SGD.

    Attributes:
        depths: numbers of weight layers.
        lr: the learning rate at depth 2; the scaled regime uses ``lr * 2 / depth``.
        target_loss: learning time = steps until the full training loss falls below this.
        max_steps: a run that never gets there counts as ``max_steps`` (a lower bound).
    """

    depths: tuple[int, ...] = (2, 4, 8, 16, 32, 64)
    width: int = 64
    lr: float = 0.01
    batch_size: int = 64
    target_loss: float = 0.5
    eval_every: int = 25
    max_steps: int = 2500
    n_seeds: int = 2
    seed: int = 0


def _learning_time(cfg: Config, depth: int, init: str, lr: float, seed: int) -> int:
    data_split = digits()
    torch.manual_seed(seed)
    model = MLP(data_split.n_features, 10, cfg.width, depth - 1, "identity", init, bias=False,
                init_std=1.0 / math.sqrt(cfg.width))
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    hist = train_classifier(
        model, data_split, opt, steps=cfg.max_steps, batch_size=cfg.batch_size,
        generator=torch.Generator().manual_seed(seed), eval_every=cfg.eval_every,
        stop=lambda h: h.train_loss[-1] < cfg.target_loss,
    )
    reached = steps_to(hist.steps, hist.train_loss, cfg.target_loss)
    return cfg.max_steps if reached is None else reached


def run(cfg: Config) -> Outcome:
    depths = sorted(cfg.depths)
    if len(depths) < 2:
        raise ValueError(f"`depths` needs at least two depths to compare, got {cfg.depths}.")
    times: dict[str, dict[str, list[float]]] = {}
    for regime in ("scaled", "fixed"):
        times[regime] = {}
        for init in ("orthogonal", "normal"):
            row = []
            for depth in depths:
                lr = cfg.lr * 2 / depth if regime == "scaled" else cfg.lr
                row.append(geomean(_learning_time(cfg, depth, init, lr, s) for s in seed_list(cfg)))
            times[regime][init] = row
    lo, hi = depths[0], depths[-1]
    so, sn = times["scaled"]["orthogonal"], times["scaled"]["normal"]
    fo, fn = times["fixed"]["orthogonal"], times["fixed"]["normal"]
    capped = any(t >= cfg.max_steps for r in times.values() for row in r.values() for t in row)
    cap_en = f" (runs capped at {cfg.max_steps} steps count as {cfg.max_steps})" if capped else ""
    cap_ko = f" ({cfg.max_steps} 스텝 안에 도달하지 못한 경우는 {cfg.max_steps}으로 셈)" if capped else ""
    row_en = lambda r: ", ".join(f"{d}: {fmt(t)}" for d, t in zip(depths, r))  # noqa: E731

    checks: list[Check] = []
    spread = max(so) / min(so)
    checks.append(Check(
        "orthogonal_depth_independent", spread <= 1.5,
        "With orthogonal init and the learning rate ∝ 1/depth (Saxe et al.'s regime), the number of "
        "steps to reach the target loss does not depend on depth (all within a factor 1.5).",
        "직교 초기화에 학습률을 깊이에 반비례하게(Saxe et al.의 설정) 두면, 목표 손실까지 걸리는 스텝 수가 "
        "깊이와 무관하다 (모두 1.5배 이내).",
        f"steps to loss < {cfg.target_loss:g}, orthogonal, lr = {cfg.lr:g}·2/depth, by depth: {row_en(so)}{cap_en}.",
        f"손실 < {cfg.target_loss:g}까지의 스텝 수 (직교, lr = {cfg.lr:g}·2/depth), 깊이별: {row_en(so)}{cap_ko}.",
        f"orthogonal {fmt(min(so))}–{fmt(max(so))} steps over depths {lo}–{hi}",
        {f"orthogonal_scaled_depth{d}": t for d, t in zip(depths, so)},
    ))
    growth = sn[-1] / sn[0]
    ok = growth >= 2 and sn[-1] >= 2 * so[-1]
    checks.append(Check(
        "gaussian_slows_with_depth", ok,
        "With scaled Gaussian init N(0, 1/fan_in) in the same regime, learning slows down with depth "
        "(at least 2× more steps at the deepest depth, and 2× more than orthogonal there).",
        "같은 설정에서 크기를 맞춘 가우시안 초기화 N(0, 1/fan_in)은 깊어질수록 느려진다 (가장 깊은 곳에서 "
        "2배 이상 더 걸리고, 거기서 직교 초기화보다도 2배 이상 더 걸린다).",
        f"steps, Gaussian, by depth: {row_en(sn)}{cap_en}; depth {hi}: Gaussian/orthogonal = {fmt(sn[-1] / so[-1])}.",
        f"가우시안의 깊이별 스텝 수: {row_en(sn)}{cap_ko}. 깊이 {hi}에서 가우시안/직교 = {fmt(sn[-1] / so[-1])}.",
        f"Gaussian {fmt(sn[0])} → {fmt(sn[-1])} steps (depth {lo} → {hi})",
        {f"normal_scaled_depth{d}": t for d, t in zip(depths, sn)},
    ))
    ok = fo[-1] <= fo[0] and fn[-1] >= 4 * fo[-1]
    checks.append(Check(
        "fixed_lr", ok,
        "With one fixed learning rate for every depth, orthogonal nets get no slower with depth, "
        "while Gaussian ones need at least 4× more steps than orthogonal at the deepest depth.",
        "모든 깊이에 같은 학습률을 쓰면 직교 초기화 신경망은 깊어져도 느려지지 않지만, 가우시안은 가장 깊은 "
        "곳에서 직교보다 4배 이상의 스텝이 필요하다.",
        f"lr = {cfg.lr:g} at every depth; steps by depth, orthogonal: {row_en(fo)}; Gaussian: {row_en(fn)}{cap_en}.",
        f"모든 깊이에서 lr = {cfg.lr:g}. 깊이별 스텝 수, 직교: {row_en(fo)}; 가우시안: {row_en(fn)}{cap_ko}.",
        f"fixed lr, depth {hi}: orthogonal {fmt(fo[-1])} vs Gaussian {fmt(fn[-1])} steps",
        {f"orthogonal_fixed_depth{hi}": fo[-1], f"normal_fixed_depth{hi}": fn[-1]},
    ))
    return Outcome(checks, {"depths": depths, "steps_to_target": times})


def plot(result: ExperimentResult) -> list:
    from gradguard.lab._plot import COLORS, figure

    d = result.data
    fig, axes = figure(2, width=4.6)
    titles = {"scaled": "lr ∝ 1/depth (Saxe et al.)", "fixed": "one fixed lr"}
    for ax, (regime, rows) in zip(axes, d["steps_to_target"].items()):
        for i, (init, row) in enumerate(rows.items()):
            ax.plot(d["depths"], row, "o-", color=COLORS[i],
                    label="orthogonal" if init == "orthogonal" else "Gaussian N(0, 1/fan_in)")
        ax.set(xscale="log", yscale="log", xlabel="depth (weight layers)",
               ylabel=f"steps to loss < {result.config['target_loss']}", title=titles[regime])
        ax.set_xticks(d["depths"], [str(x) for x in d["depths"]])
        ax.legend(fontsize=8)
    return [fig]


INFO = ExperimentInfo(
    name="orthogonal_init",
    title_en="Orthogonal init: depth-independent learning time",
    title_ko="직교 초기화: 깊이와 무관한 학습 시간",
    claim_en="In deep linear nets with orthogonal initial weights, the learning time is independent "
             "of depth; with scaled Gaussian weights it grows with depth.",
    claim_ko="직교 행렬로 초기화한 깊은 선형 신경망은 학습 시간이 깊이와 무관하다. 크기만 맞춘 가우시안 "
             "초기화는 깊어질수록 학습이 느려진다.",
    source="Saxe, McClelland & Ganguli (2014), \"Exact solutions to the nonlinear dynamics of "
           "learning in deep linear neural networks\", ICLR",
    setup_en="Linear nets (no bias) of 64 units, 2 to 64 weight layers, on scikit-learn digits; plain "
             "SGD, batch 64; learning time = steps until the training cross-entropy is below 0.5; "
             "lr = 0.01·2/depth (Saxe's regime) and, separately, lr = 0.01 at every depth; 2 seeds.",
    setup_ko="폭 64, 가중치 층 2–64개인 선형 신경망(bias 없음)을 scikit-learn digits로 학습한다. 배치 64의 "
             "순수 SGD를 쓰고, 학습 시간은 학습 cross-entropy가 0.5 밑으로 내려갈 때까지의 스텝 수로 잰다. "
             "lr = 0.01·2/depth(Saxe의 설정)와, 깊이와 상관없이 lr = 0.01인 경우를 따로 돌린다. 시드는 2개.",
    config=Config(),
    quick_config=Config(depths=(2, 40), n_seeds=1, max_steps=1500),
    seconds_quick=3.0,
    seconds_full=38.0,
    runner=run,
    plotter=plot,
)
