"""Too high a learning rate diverges; decaying the rate (×0.98 per epoch, step, cosine) ends
better than keeping a high rate constant.

A constant rate that is large enough to learn fast keeps SGD bouncing at a noise floor set by
the rate; shrinking the rate later lets it settle. The experiment trains the same net on MNIST-1D
from the same seeds with each schedule.

References:
    Bengio (2012), "Practical Recommendations for Gradient-Based Training of Deep Architectures",
    Section 3.1; Loshchilov & Hutter (2017), "SGDR: Stochastic Gradient Descent with Warm
    Restarts", ICLR (cosine); Goodfellow, Bengio & Courville (2016), Deep Learning, Section 8.3.1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from gradguard.lab._result import Check, ExperimentResult
from gradguard.lab._train import train_classifier
from gradguard.lab._util import fmt, mean, seed_list
from gradguard.lab.datasets import mnist1d
from gradguard.lab.models import MLP
from gradguard.lab.registry import ExperimentInfo, Outcome

__all__ = ["Config", "INFO", "plot", "run", "schedule"]

SCHEDULES = ("constant", "exponential", "step", "cosine")


def schedule(kind: str, base_lr: float, epoch: int, epochs: int, gamma: float = 0.98) -> float:
    """The learning rate of ``kind`` at ``epoch`` (0-based) of ``epochs``.

    ``exponential``: base · gamma^epoch; ``step``: base, ×0.1 from half-way, ×0.01 from three
    quarters; ``cosine``: base · (1 + cos(π · epoch / epochs)) / 2.
    """
    if kind == "constant":
        return base_lr
    if kind == "exponential":
        return base_lr * gamma ** epoch
    if kind == "step":
        return base_lr * (0.1 if epoch >= epochs / 2 else 1.0) * (0.1 if epoch >= 3 * epochs / 4 else 1.0)
    if kind == "cosine":
        return base_lr * 0.5 * (1 + math.cos(math.pi * epoch / epochs))
    raise ValueError(f"`kind` must be one of {', '.join(SCHEDULES)}; got {kind!r}.")


@dataclass(frozen=True)
class Config:
    """Set-up: an MLP (``depth`` hidden ReLU layers of ``width``, He init) on MNIST-1D, SGD.

    Attributes:
        base_lr: the starting rate of every schedule (high enough to learn fast).
        sweep_lrs, sweep_epochs: constant rates for the divergence sweep.
        n_train: training examples used (MNIST-1D has 4000).
    """

    base_lr: float = 0.5
    gamma: float = 0.98
    epochs: int = 30
    batch_size: int = 32
    width: int = 100
    depth: int = 2
    n_train: int = 4000
    sweep_lrs: tuple[float, ...] = (0.05, 0.5, 10.0)
    sweep_epochs: int = 3
    n_seeds: int = 2
    seed: int = 0


def run(cfg: Config) -> Outcome:
    full = mnist1d()
    data_split = full.subset(cfg.n_train, cfg.seed) if cfg.n_train < len(full.y_train) else full
    steps_per_epoch = len(data_split.y_train) // cfg.batch_size

    def train(lr_of_epoch: list[float], seed: int, epochs: int) -> tuple[list[int], list[float], list[float], list[float], int | None]:
        torch.manual_seed(seed)
        model = MLP(data_split.n_features, 10, cfg.width, cfg.depth, "relu", "he")
        opt = torch.optim.SGD(model.parameters(), lr=lr_of_epoch[0])

        def set_lr(epoch: int) -> None:
            for group in opt.param_groups:
                group["lr"] = lr_of_epoch[min(epoch, len(lr_of_epoch) - 1)]

        hist = train_classifier(model, data_split, opt, steps=epochs * steps_per_epoch,
                                batch_size=cfg.batch_size, generator=torch.Generator().manual_seed(seed),
                                eval_every=steps_per_epoch, scheduler=set_lr)
        return hist.steps, hist.train_loss, hist.test_loss, hist.test_acc, hist.diverged_at

    sweep: dict[str, dict[str, object]] = {}
    for lr in cfg.sweep_lrs:
        steps, tr, _, _, div = train([lr] * cfg.sweep_epochs, cfg.seed, cfg.sweep_epochs)
        sweep[fmt(lr)] = {"steps": steps, "train_loss": tr, "diverged_at": div}

    lrs = {k: [schedule(k, cfg.base_lr, e, cfg.epochs, cfg.gamma) for e in range(cfg.epochs)] for k in SCHEDULES}
    curves: dict[str, list[float]] = {}
    final_train: dict[str, float] = {}
    final_acc: dict[str, float] = {}
    final_test: dict[str, float] = {}
    steps_axis: list[int] = []
    for kind in SCHEDULES:
        runs = [train(lrs[kind], s, cfg.epochs) for s in seed_list(cfg)]
        steps_axis = runs[0][0]
        curves[kind] = [mean(c) for c in zip(*(r[1] for r in runs))]
        final_train[kind] = mean(r[1][-1] for r in runs)
        final_test[kind] = mean(r[2][-1] for r in runs)
        final_acc[kind] = mean(r[3][-1] for r in runs)

    checks: list[Check] = []
    top = fmt(max(cfg.sweep_lrs))
    s_top = sweep[top]
    first, last = s_top["train_loss"][0], s_top["train_loss"][-1]
    ok = s_top["diverged_at"] is not None or not last < first
    base = sweep.get(fmt(cfg.base_lr))
    checks.append(Check(
        "too_high_diverges", ok,
        f"Too high a constant rate ({top}) diverges: the loss becomes NaN or ends above where it started.",
        f"너무 높은 학습률({top})을 그대로 쓰면 발산한다. 손실이 NaN이 되거나 시작할 때보다 높게 끝난다.",
        ", ".join(
            f"lr {k}: " + (f"NaN at step {v['diverged_at']}" if v["diverged_at"] is not None
                           else f"loss {fmt(v['train_loss'][0])} → {fmt(v['train_loss'][-1])}")
            for k, v in sweep.items()) + f" ({cfg.sweep_epochs} epochs).",
        ", ".join(
            f"lr {k}: " + (f"{v['diverged_at']} 스텝에서 NaN" if v["diverged_at"] is not None
                           else f"손실 {fmt(v['train_loss'][0])} → {fmt(v['train_loss'][-1])}")
            for k, v in sweep.items()) + f" ({cfg.sweep_epochs} 에포크).",
        f"lr {top}: " + ("NaN" if s_top["diverged_at"] is not None else f"{fmt(first)} → {fmt(last)}")
        + (f"; lr {fmt(cfg.base_lr)} trains" if base and base["diverged_at"] is None else ""),
        {f"diverged_lr_{top}": 1.0 if s_top["diverged_at"] is not None else 0.0},
    ))
    names = {"exponential": f"×{cfg.gamma:g} per epoch", "step": "step (×0.1 at 1/2 and 3/4)",
             "cosine": "cosine"}
    names_ko = {"exponential": f"에포크마다 ×{cfg.gamma:g}", "step": "계단식 (1/2, 3/4 지점에서 ×0.1)",
                "cosine": "코사인"}
    c_tr, c_acc = final_train["constant"], final_acc["constant"]
    for kind in ("exponential", "step", "cosine"):
        tr, acc = final_train[kind], final_acc[kind]
        ok = tr == tr and tr < c_tr and acc >= c_acc
        checks.append(Check(
            f"{kind}_beats_constant", ok,
            f"Decay {names[kind]} beats the constant rate {cfg.base_lr:g}: lower final training loss and "
            "test accuracy at least as high.",
            f"{names_ko[kind]} 감쇠가 고정 학습률 {cfg.base_lr:g}보다 낫다. 최종 학습 손실이 더 낮고 테스트 "
            "정확도는 같거나 더 높다.",
            f"after {cfg.epochs} epochs (mean over {len(seed_list(cfg))} seeds): training loss {fmt(tr)} vs "
            f"{fmt(c_tr)}, test accuracy {acc:.3f} vs {c_acc:.3f}, test loss {fmt(final_test[kind])} vs "
            f"{fmt(final_test['constant'])}; final rate {fmt(lrs[kind][-1])}.",
            f"{cfg.epochs} 에포크 뒤 (시드 {len(seed_list(cfg))}개 평균): 학습 손실 {fmt(tr)} 대 {fmt(c_tr)}, 테스트 "
            f"정확도 {acc:.3f} 대 {c_acc:.3f}, 테스트 손실 {fmt(final_test[kind])} 대 "
            f"{fmt(final_test['constant'])}. 마지막 학습률 {fmt(lrs[kind][-1])}.",
            f"{kind}: loss {fmt(tr)} vs {fmt(c_tr)}, acc {acc:.2f} vs {c_acc:.2f}",
            {f"{kind}_train_loss": tr, f"{kind}_test_acc": acc},
        ))
    data = {"steps": steps_axis, "curves": curves, "lrs": lrs, "final_train_loss": final_train,
            "final_test_acc": final_acc, "final_test_loss": final_test, "sweep": sweep,
            "steps_per_epoch": steps_per_epoch}
    return Outcome(checks, data)


def plot(result: ExperimentResult) -> list:
    from gradguard.lab._plot import COLORS, figure, finite

    d = result.data
    fig, axes = figure(3, width=4.0)
    for i, (k, v) in enumerate(d["sweep"].items()):
        axes[0].plot(v["steps"], finite(v["train_loss"]), "o-", color=COLORS[i], label=f"lr {k}"
                     + (" (NaN)" if v["diverged_at"] is not None else ""))
    axes[0].set(xlabel="step", ylabel="training loss", yscale="log", title="constant rates")
    axes[0].legend(fontsize=8)
    for i, (k, curve) in enumerate(d["curves"].items()):
        axes[1].plot(d["steps"], finite(curve), color=COLORS[i], label=k)
        axes[2].plot(range(len(d["lrs"][k])), d["lrs"][k], color=COLORS[i], label=k)
    axes[1].set(xlabel="step", ylabel="training loss", yscale="log", title="schedules")
    axes[1].legend(fontsize=8)
    axes[2].set(xlabel="epoch", ylabel="learning rate", title="the schedules")
    return [fig]


INFO = ExperimentInfo(
    name="learning_rate",
    title_en="Learning rate: divergence and decay",
    title_ko="학습률: 발산과 감쇠",
    claim_en="Too high a learning rate diverges; decaying the rate (×0.98 per epoch, step, cosine) "
             "ends better than keeping it constant.",
    claim_ko="학습률이 너무 높으면 발산한다. 학습률을 줄여 가면(에포크마다 ×0.98, 계단식, 코사인) 고정된 "
             "학습률보다 결과가 좋다.",
    source="Bengio (2012), \"Practical Recommendations for Gradient-Based Training of Deep "
           "Architectures\", §3.1; Loshchilov & Hutter (2017), SGDR, ICLR (cosine)",
    setup_en="An MLP (2 hidden ReLU layers of 100, He init) on MNIST-1D generated offline (4000 "
             "training examples), plain SGD, batch 32: constant rates 0.05/0.5/10 for 3 epochs; then "
             "30 epochs from lr 0.5 with each schedule; 2 seeds.",
    setup_ko="MLP(ReLU 은닉층 100 × 2, He 초기화)를 오프라인으로 생성한 MNIST-1D(학습 예제 4000개)로 학습한다. "
             "배치 32의 순수 SGD로, 먼저 고정 학습률 0.05/0.5/10을 3 에포크씩 돌리고, 다음으로 lr 0.5에서 "
             "시작해 스케줄마다 30 에포크를 돈다. 시드는 2개.",
    config=Config(),
    quick_config=Config(epochs=12, sweep_epochs=1, n_seeds=1),
    seconds_quick=4.0,
    seconds_full=20.0,
    runner=run,
    plotter=plot,
)
