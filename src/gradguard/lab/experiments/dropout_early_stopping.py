"""On a small training set, a big net overfits; dropout and early stopping cut the overfitting.

The baseline drives its training loss to ~0 while its test loss climbs. Dropout (p = 0.5 on every
hidden layer) trains a thinned net at each step. Early stopping watches the loss on a held-out
validation set, stops after ``patience`` epochs without improvement and restores the best epoch's
weights; it is read off the baseline run (same weights, same batches).

References:
    Srivastava, Hinton, Krizhevsky, Sutskever & Salakhutdinov (2014), "Dropout: A Simple Way to
    Prevent Neural Networks from Overfitting", JMLR; Prechelt (1998), "Early Stopping — But
    When?", Neural Networks: Tricks of the Trade.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from gradguard.lab._result import Check, ExperimentResult
from gradguard.lab._train import evaluate, train_classifier
from gradguard.lab._util import fmt, mean, seed_list
from gradguard.lab.datasets import Split, mnist1d
from gradguard.lab.models import MLP
from gradguard.lab.registry import ExperimentInfo, Outcome

__all__ = ["Config", "INFO", "early_stop", "plot", "run"]


@dataclass(frozen=True)
class Config:
    """Set-up: MNIST-1D, ``n_train`` training and ``n_val`` validation examples taken from its
    training split (the 1000-example test split is the test set); an MLP of ``depth`` hidden ReLU
    layers of ``width``, Adam, ``epochs`` epochs.

    Attributes:
        acc_tolerance: "no worse" allows a test accuracy this much below the baseline's.
    """

    n_train: int = 500
    n_val: int = 500
    width: int = 256
    depth: int = 2
    dropout: float = 0.5
    epochs: int = 60
    batch_size: int = 32
    lr: float = 1e-3
    patience: int = 10
    acc_tolerance: float = 0.01
    n_seeds: int = 2
    seed: int = 0


def early_stop(val_loss: list[float], patience: int) -> tuple[int, int]:
    """(epoch restored, epoch stopped): stop once ``patience`` epochs pass without a new minimum."""
    best, stopped = 0, len(val_loss) - 1
    for e, v in enumerate(val_loss):
        if v < val_loss[best]:
            best = e
        elif e - best >= patience:
            stopped = e
            break
    return best, stopped


def run(cfg: Config) -> Outcome:
    full = mnist1d()
    if cfg.n_train + cfg.n_val > len(full.y_train):
        raise ValueError(
            f"`n_train` + `n_val` = {cfg.n_train + cfg.n_val} exceeds the {len(full.y_train)} "
            "MNIST-1D training examples; lower one of them."
        )
    curves: dict[str, dict[str, list[list[float]]]] = {
        k: {"train": [], "test": [], "val": [], "acc": []} for k in ("baseline", "dropout")}
    epochs_axis: list[int] = []
    for s in seed_list(cfg):
        perm = torch.randperm(len(full.y_train), generator=torch.Generator().manual_seed(s))
        tr, va = perm[: cfg.n_train], perm[cfg.n_train: cfg.n_train + cfg.n_val]
        small = Split(full.x_train[tr], full.y_train[tr], full.x_test, full.y_test, 10)
        x_val, y_val = full.x_train[va], full.y_train[va]
        steps_per_epoch = math.ceil(cfg.n_train / cfg.batch_size)
        for kind in curves:
            torch.manual_seed(s)
            model = MLP(full.n_features, 10, cfg.width, cfg.depth, "relu", "he",
                        dropout=cfg.dropout if kind == "dropout" else 0.0)
            val: list[float] = [evaluate(model, x_val, y_val)[0]]

            def after(step: int, _loss: float, model: MLP = model, val: list[float] = val) -> None:
                if (step + 1) % steps_per_epoch == 0:
                    val.append(evaluate(model, x_val, y_val)[0])

            hist = train_classifier(model, small, torch.optim.Adam(model.parameters(), lr=cfg.lr),
                                    steps=cfg.epochs * steps_per_epoch, batch_size=cfg.batch_size,
                                    generator=torch.Generator().manual_seed(s),
                                    eval_every=steps_per_epoch, after_step=after)
            epochs_axis = [st // steps_per_epoch for st in hist.steps]
            curves[kind]["train"].append(hist.train_loss)
            curves[kind]["test"].append(hist.test_loss)
            curves[kind]["acc"].append(hist.test_acc)
            curves[kind]["val"].append(val)

    stops = [early_stop(v, cfg.patience) for v in curves["baseline"]["val"]]
    es_test = mean(t[b] for t, (b, _) in zip(curves["baseline"]["test"], stops))
    es_acc = mean(a[b] for a, (b, _) in zip(curves["baseline"]["acc"], stops))
    es_epoch = mean(float(b) for b, _ in stops)
    es_stopped = mean(float(e) for _, e in stops)
    avg = {k: {q: [mean(c) for c in zip(*runs)] for q, runs in v.items()} for k, v in curves.items()}
    b, dr = avg["baseline"], avg["dropout"]
    gap = {k: avg[k]["test"][-1] - avg[k]["train"][-1] for k in avg}
    checks: list[Check] = []
    ok = b["test"][-1] >= 1.2 * min(b["test"]) and b["train"][-1] < 0.1 * b["test"][-1]
    checks.append(Check(
        "baseline_overfits", ok,
        "On the small training set the plain net overfits: training loss near 0 while the test loss "
        "climbs (final ≥ 1.2× its minimum).",
        "작은 학습 세트에서 규제 없는 신경망은 과적합된다. 학습 손실은 0에 가까워지는데 테스트 손실은 올라간다 "
        "(최종값이 최솟값의 1.2배 이상).",
        f"baseline after {cfg.epochs} epochs: training loss {fmt(b['train'][-1])}, test loss {fmt(b['test'][-1])} "
        f"(minimum {fmt(min(b['test']))} at epoch {b['test'].index(min(b['test']))}).",
        f"기준 모델, {cfg.epochs} 에포크 뒤: 학습 손실 {fmt(b['train'][-1])}, 테스트 손실 {fmt(b['test'][-1])} "
        f"(최솟값 {fmt(min(b['test']))}, {b['test'].index(min(b['test']))} 에포크).",
        f"baseline test loss {fmt(min(b['test']))} → {fmt(b['test'][-1])}, train {fmt(b['train'][-1])}",
        {"baseline_final_test_loss": b["test"][-1], "baseline_min_test_loss": min(b["test"])},
    ))
    tol = cfg.acc_tolerance
    ok = dr["test"][-1] < b["test"][-1] and gap["dropout"] < gap["baseline"] and dr["acc"][-1] >= b["acc"][-1] - tol
    checks.append(Check(
        "dropout_cuts_overfitting", ok,
        f"Dropout (p = {cfg.dropout:g}) cuts overfitting: lower final test loss, a smaller gap "
        f"between test and training loss, and test accuracy no worse (within {tol:g}).",
        f"드롭아웃(p = {cfg.dropout:g})은 과적합을 줄인다. 최종 테스트 손실이 더 낮고, 테스트 손실과 학습 손실의 "
        f"차이도 더 작으며, 테스트 정확도는 떨어지지 않는다 ({tol:g} 이내).",
        f"final test loss: dropout {fmt(dr['test'][-1])} vs baseline {fmt(b['test'][-1])}; gap {fmt(gap['dropout'])} "
        f"vs {fmt(gap['baseline'])}; test accuracy {dr['acc'][-1]:.3f} vs {b['acc'][-1]:.3f}.",
        f"최종 테스트 손실: 드롭아웃 {fmt(dr['test'][-1])}, 기준 {fmt(b['test'][-1])}. 차이 {fmt(gap['dropout'])} 대 "
        f"{fmt(gap['baseline'])}. 테스트 정확도 {dr['acc'][-1]:.3f} 대 {b['acc'][-1]:.3f}.",
        f"dropout: test loss {fmt(dr['test'][-1])} vs {fmt(b['test'][-1])}, acc {dr['acc'][-1]:.3f} vs {b['acc'][-1]:.3f}",
        {"dropout_final_test_loss": dr["test"][-1], "dropout_gap": gap["dropout"], "baseline_gap": gap["baseline"]},
    ))
    ok = es_test < b["test"][-1] and es_stopped < cfg.epochs and es_acc >= b["acc"][-1] - tol
    checks.append(Check(
        "early_stopping_cuts_overfitting", ok,
        f"Early stopping (patience {cfg.patience} epochs on the validation loss, best weights restored) "
        f"ends with a lower test loss than training to the end, and test accuracy no worse (within {tol:g}).",
        f"조기 종료(검증 손실 기준 patience {cfg.patience} 에포크, 가장 좋았던 가중치 복원)는 끝까지 학습한 것보다 "
        f"테스트 손실이 낮고, 테스트 정확도는 떨어지지 않는다 ({tol:g} 이내).",
        f"restored epoch {fmt(es_epoch)}, stopped at epoch {fmt(es_stopped)} (mean over seeds); test loss "
        f"{fmt(es_test)} vs {fmt(b['test'][-1])} at epoch {cfg.epochs}; test accuracy {es_acc:.3f} vs {b['acc'][-1]:.3f}.",
        f"복원한 에포크 {fmt(es_epoch)}, 멈춘 에포크 {fmt(es_stopped)} (시드 평균). 테스트 손실 {fmt(es_test)}, "
        f"{cfg.epochs} 에포크까지 학습하면 {fmt(b['test'][-1])}. 테스트 정확도 {es_acc:.3f} 대 {b['acc'][-1]:.3f}.",
        f"early stop: test loss {fmt(es_test)} vs {fmt(b['test'][-1])}, acc {es_acc:.3f} vs {b['acc'][-1]:.3f}",
        {"early_stop_test_loss": es_test, "early_stop_epoch": es_epoch},
    ))
    data = {"epochs": epochs_axis, "curves": avg, "early_stop_epoch": es_epoch,
            "early_stop_stopped": es_stopped, "early_stop_test_loss": es_test}
    return Outcome(checks, data)


def plot(result: ExperimentResult) -> list:
    from gradguard.lab._plot import COLORS, figure, finite

    d = result.data
    fig, (a1, a2) = figure(2, width=4.8)
    for i, (k, c) in enumerate(d["curves"].items()):
        a1.plot(d["epochs"], finite(c["train"]), ls="--", color=COLORS[i], label=f"{k} train")
        a1.plot(d["epochs"], finite(c["test"]), color=COLORS[i], label=f"{k} test")
        a2.plot(d["epochs"], finite(c["acc"]), color=COLORS[i], label=k)
    for ax in (a1, a2):
        ax.axvline(d["early_stop_epoch"], ls=":", color="k", lw=1, label="early stop (restored)")
    a1.set(xlabel="epoch", ylabel="loss", yscale="log", title="small training set: loss")
    a2.set(xlabel="epoch", ylabel="test accuracy", title="test accuracy")
    a1.legend(fontsize=7)
    a2.legend(fontsize=7)
    return [fig]


INFO = ExperimentInfo(
    name="dropout_early_stopping",
    title_en="Dropout and early stopping on a small data set",
    title_ko="작은 데이터셋에서의 드롭아웃과 조기 종료",
    claim_en="On a small dataset, dropout and early stopping cut overfitting.",
    claim_ko="데이터셋이 작을 때 드롭아웃과 조기 종료는 과적합을 줄여 준다.",
    source="Srivastava et al. (2014), \"Dropout: A Simple Way to Prevent Neural Networks from "
           "Overfitting\", JMLR; Prechelt (1998), \"Early Stopping — But When?\"",
    setup_en="MNIST-1D generated offline: 500 training and 500 validation examples, the 1000-example "
             "test split; an MLP with 2 hidden ReLU layers of 256, Adam lr 1e-3, batch 32, 60 "
             "epochs, with and without dropout 0.5; early stopping with patience 10 on the "
             "validation loss; 2 seeds.",
    setup_ko="오프라인으로 생성한 MNIST-1D에서 학습 500개, 검증 500개, 테스트 1000개를 쓴다. ReLU 은닉층 256 × 2 "
             "MLP를 Adam(lr 1e-3, 배치 32)으로 60 에포크 학습하며, 드롭아웃 0.5가 있는 경우와 없는 경우를 "
             "비교한다. 조기 종료는 검증 손실 기준 patience 10. 시드는 2개.",
    config=Config(),
    quick_config=Config(n_train=300, n_val=300, width=128, epochs=30, n_seeds=1),
    seconds_quick=1.5,
    seconds_full=9.0,
    runner=run,
    plotter=plot,
)
