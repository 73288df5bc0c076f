"""Ioffe & Szegedy (2015), Fig. 1: batch normalization trains faster and reaches a higher
accuracy, and the distribution of a sigmoid's input (its 15th/50th/85th percentiles) drifts
during training without BN and stays put with it (internal covariate shift).

References:
    Ioffe & Szegedy (2015), "Batch Normalization: Accelerating Deep Network Training by Reducing
    Internal Covariate Shift", ICML, Section 4.1 and Fig. 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gradguard.lab._result import Check, ExperimentResult
from gradguard.lab._train import train_classifier
from gradguard.lab._util import fmt, mean, seed_list, steps_to
from gradguard.lab.datasets import digits
from gradguard.lab.models import MLP
from gradguard.lab.registry import ExperimentInfo, Outcome

__all__ = ["Config", "INFO", "plot", "run"]

_QUANTILES = (0.15, 0.5, 0.85)


@dataclass(frozen=True)
class Config:
    """Set-up after Ioffe & Szegedy's MNIST net: 3 fully-connected sigmoid layers of ``width``,
    weights N(0, ``init_std``²), plain SGD, batch 60; digits instead of MNIST.

    Attributes:
        records: number of evaluation points (test accuracy and the sigmoid input's percentiles).
        target_acc: "faster" = fewer steps to reach this test accuracy.
    """

    width: int = 100
    depth: int = 3
    init_std: float = 0.01
    lr: float = 0.5
    batch_size: int = 60
    steps: int = 3000
    records: int = 30
    target_acc: float = 0.9
    n_seeds: int = 2
    seed: int = 0


def _train(cfg: Config, batch_norm: bool, seed: int) -> dict[str, list]:
    data_split = digits()
    torch.manual_seed(seed)
    model = MLP(data_split.n_features, 10, cfg.width, cfg.depth, "sigmoid", "normal",
                batch_norm=batch_norm, init_std=cfg.init_std)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr)
    seen: dict[str, torch.Tensor] = {}
    # The input of the last hidden layer's sigmoid (after BN when BN is on), as in Fig. 1(b, c).
    hook = model.acts[-1].register_forward_hook(lambda _m, inp, _o: seen.__setitem__("z", inp[0].detach()))
    every = max(1, cfg.steps // cfg.records)
    q = torch.tensor(_QUANTILES)
    pct_steps: list[int] = []
    pct: list[list[float]] = []

    def after(step: int, _loss: float) -> None:
        if (step + 1) % every == 0:
            model.eval()
            with torch.no_grad():
                model(data_split.x_test)
            model.train()
            pct_steps.append(step + 1)
            pct.append(torch.quantile(seen["z"][:, 0], q).tolist())

    hist = train_classifier(model, data_split, opt, steps=cfg.steps, batch_size=cfg.batch_size,
                            generator=torch.Generator().manual_seed(seed), eval_every=every,
                            after_step=after, eval_train=False)
    hook.remove()
    return {"steps": hist.steps, "test_acc": hist.test_acc, "pct_steps": pct_steps, "pct": pct}


def _drift(pct: list[list[float]]) -> float:
    """Mean range over time of the three percentiles, in units of their mean 15–85 spread."""
    cols = list(zip(*pct))
    spread = mean(hi - lo for lo, hi in zip(cols[0], cols[-1]))
    ranges = mean(max(c) - min(c) for c in cols)
    return ranges / spread if spread > 0 else float("inf")


def run(cfg: Config) -> Outcome:
    runs = {"plain": [], "bn": []}
    for s in seed_list(cfg):
        for key in runs:
            runs[key].append(_train(cfg, key == "bn", s))
    steps = runs["plain"][0]["steps"]
    acc = {k: [mean(c) for c in zip(*(r["test_acc"] for r in v))] for k, v in runs.items()}
    reach = {k: steps_to(steps, [-a for a in acc[k]], -cfg.target_acc) for k in acc}
    drift = {k: mean(_drift(r["pct"]) for r in v) for k, v in runs.items()}
    first = next(i for i, st in enumerate(steps) if st > 0)
    checks: list[Check] = []

    never = cfg.steps * 10  # "never reached" counts as far beyond the run
    r_plain = reach["plain"] if reach["plain"] is not None else never
    r_bn = reach["bn"] if reach["bn"] is not None else never
    ok = reach["bn"] is not None and r_bn * 5 <= r_plain
    shown = {k: (f"step {v}" if v is not None else f"not within {cfg.steps} steps") for k, v in reach.items()}
    shown_ko = {k: (f"{v} 스텝" if v is not None else f"{cfg.steps} 스텝 안에 도달 못 함") for k, v in reach.items()}
    checks.append(Check(
        "faster", ok,
        f"With BN the net reaches {cfg.target_acc:.0%} test accuracy at least 5× sooner.",
        f"BN을 쓰면 테스트 정확도 {cfg.target_acc:.0%}에 5배 이상 빨리 도달한다.",
        f"{cfg.target_acc:.0%} test accuracy reached: with BN {shown['bn']}, without {shown['plain']}; "
        f"at step {steps[first]}: {acc['bn'][first]:.2f} vs {acc['plain'][first]:.2f}.",
        f"테스트 정확도 {cfg.target_acc:.0%} 도달: BN 있음 {shown_ko['bn']}, 없음 {shown_ko['plain']}. "
        f"{steps[first]} 스텝 시점 정확도: {acc['bn'][first]:.2f} 대 {acc['plain'][first]:.2f}.",
        f"{cfg.target_acc:.0%} acc at step {reach['bn']} (BN) vs {reach['plain'] if reach['plain'] is not None else 'never'}",
        {"steps_to_target_bn": reach["bn"], "steps_to_target_plain": reach["plain"]},
    ))
    ok = acc["bn"][-1] > acc["plain"][-1]
    checks.append(Check(
        "higher_accuracy", ok,
        "With BN the final test accuracy is higher.",
        "BN을 쓰면 최종 테스트 정확도가 더 높다.",
        f"test accuracy after {cfg.steps} steps: with BN {acc['bn'][-1]:.3f}, without {acc['plain'][-1]:.3f}.",
        f"{cfg.steps} 스텝 뒤 테스트 정확도: BN 있음 {acc['bn'][-1]:.3f}, 없음 {acc['plain'][-1]:.3f}.",
        f"final acc {acc['bn'][-1]:.3f} vs {acc['plain'][-1]:.3f}",
        {"final_acc_bn": acc["bn"][-1], "final_acc_plain": acc["plain"][-1]},
    ))
    ok = drift["bn"] < 0.5 * drift["plain"]
    checks.append(Check(
        "stable_sigmoid_input", ok,
        "The 15/50/85th percentiles of a sigmoid's input drift during training without BN and stay "
        "put with it (drift with BN under half of the drift without).",
        "sigmoid 입력의 15/50/85번째 백분위수는 BN이 없으면 학습 중에 계속 움직이고, BN이 있으면 제자리에 "
        "머문다 (BN이 있을 때의 이동량이 없을 때의 절반 미만).",
        f"drift (range over training of each percentile, in units of the 15–85 spread): without BN "
        f"{fmt(drift['plain'])}, with BN {fmt(drift['bn'])}.",
        f"이동량 (학습 동안 각 백분위수가 움직인 폭을 15–85 간격으로 나눈 값): BN 없음 {fmt(drift['plain'])}, "
        f"BN 있음 {fmt(drift['bn'])}.",
        f"drift {fmt(drift['bn'])} (BN) vs {fmt(drift['plain'])}",
        {"drift_bn": drift["bn"], "drift_plain": drift["plain"]},
    ))
    data = {"steps": steps, "test_acc": acc, "drift": drift,
            "pct_steps": runs["plain"][0]["pct_steps"],
            "percentiles": {k: v[0]["pct"] for k, v in runs.items()}}
    return Outcome(checks, data)


def plot(result: ExperimentResult) -> list:
    from gradguard.lab._plot import COLORS, figure

    d = result.data
    fig, axes = figure(3, width=4.0)
    labels = {"plain": "without BN", "bn": "with BN"}
    for i, (k, acc) in enumerate(d["test_acc"].items()):
        axes[0].plot(d["steps"], acc, color=COLORS[i], label=labels[k])
    axes[0].set(xlabel="step", ylabel="test accuracy", title="(a) test accuracy")
    axes[0].legend()
    for ax, k, tag in ((axes[1], "plain", "(b) without BN"), (axes[2], "bn", "(c) with BN")):
        cols = list(zip(*d["percentiles"][k]))
        for j, (col, qq) in enumerate(zip(cols, _QUANTILES)):
            ax.plot(d["pct_steps"], col, color=COLORS[j + 2], label=f"{int(qq * 100)}th pct")
        ax.set(xlabel="step", ylabel="sigmoid input", title=f"{tag}: one sigmoid's input")
        ax.legend(fontsize=8)
    lo = min(min(min(r) for r in d["percentiles"][k]) for k in d["percentiles"])
    hi = max(max(max(r) for r in d["percentiles"][k]) for k in d["percentiles"])
    axes[1].set_ylim(lo - 0.2, hi + 0.2)
    axes[2].set_ylim(lo - 0.2, hi + 0.2)
    return [fig]


INFO = ExperimentInfo(
    name="batchnorm",
    title_en="Batch normalization",
    title_ko="배치 정규화",
    claim_en="Batch normalization trains faster and reaches a higher accuracy; the 15/50/85th "
             "percentiles of a sigmoid's input drift during training without BN and stay put with it.",
    claim_ko="배치 정규화를 쓰면 더 빨리 학습되고 정확도도 더 높다. sigmoid 입력의 15/50/85번째 백분위수는 "
             "BN이 없으면 학습 중에 계속 움직이고, BN이 있으면 제자리에 머문다.",
    source="Ioffe & Szegedy (2015), \"Batch Normalization: Accelerating Deep Network Training by "
           "Reducing Internal Covariate Shift\", ICML, Fig. 1",
    setup_en="The paper's MNIST net on scikit-learn digits: 3 fully-connected sigmoid layers of 100, "
             "weights N(0, 0.01²), SGD lr 0.5, batch 60, 3000 steps, with and without BN; the "
             "percentiles of one sigmoid's input in the last hidden layer, on the test set; 2 seeds.",
    setup_ko="논문의 MNIST 신경망을 scikit-learn digits에 옮겼다. 폭 100의 완전연결 sigmoid 3층, 가중치 "
             "N(0, 0.01²), SGD(lr 0.5, 배치 60)로 3000 스텝 학습하며 BN이 있는 경우와 없는 경우를 비교한다. "
             "마지막 은닉층 sigmoid 하나의 입력 백분위수를 테스트 세트에서 잰다. 시드는 2개.",
    config=Config(),
    quick_config=Config(steps=500, records=20, n_seeds=1),
    seconds_quick=1.0,
    seconds_full=12.0,
    runner=run,
    plotter=plot,
)
