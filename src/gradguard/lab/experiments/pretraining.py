"""Greedy layer-wise autoencoder pre-training rescues a deep sigmoid net that does not train
from a random initialisation.

Each hidden layer is trained in turn as the encoder of a tied-weight autoencoder
(``x̂ = Wᵀ σ(W x + b) + c``) on the codes of the layers below it, then frozen into place; the
whole net is then fine-tuned with the same plain SGD as the randomly initialised nets. Each
layer's input is standardised for its autoencoder, and the standardisation is folded back into
the layer's weights, so the pre-trained net computes exactly what its autoencoders learned.

References:
    Hinton, Osindero & Teh (2006), "A Fast Learning Algorithm for Deep Belief Nets", Neural
    Computation; Bengio, Lamblin, Popovici & Larochelle (2007), "Greedy Layer-Wise Training of
    Deep Networks", NIPS; Erhan et al. (2010), "Why Does Unsupervised Pre-training Help Deep
    Learning?", JMLR.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gradguard.lab._result import Check, ExperimentResult
from gradguard.lab._train import grad_ratio, minibatches, train_classifier
from gradguard.lab._util import fmt, geomean, mean, seed_list
from gradguard.lab.datasets import digits
from gradguard.lab.models import MLP
from gradguard.lab.registry import ExperimentInfo, Outcome

__all__ = ["Config", "INFO", "plot", "pretrain_", "run"]

_LN10 = math.log(10)


@dataclass(frozen=True)
class Config:
    """Set-up: ``depth`` sigmoid layers of ``width`` on digits; fine-tuning with plain SGD.

    Attributes:
        random_inits: the random initialisations the pre-trained net is compared with.
        pretrain_epochs, pretrain_lr: per-layer autoencoder training (SGD with momentum 0.9).
        trains_below: "rescued" = final training loss below this fraction of ln 10.
    """

    depth: int = 6
    width: int = 128
    steps: int = 1500
    batch_size: int = 32
    lr: float = 0.1
    random_inits: tuple[str, ...] = ("default", "xavier")
    pretrain_epochs: int = 3
    pretrain_lr: float = 0.1
    stall_fraction: float = 0.9
    trains_below: float = 0.25
    n_seeds: int = 2
    seed: int = 0


@torch.no_grad()
def _fold_standardisation_(layer: torch.nn.Linear, mean_: torch.Tensor, std: torch.Tensor) -> None:
    """Make ``layer(x)`` equal what it computed on ``(x - mean_) / std``."""
    layer.bias -= layer.weight @ (mean_ / std)
    layer.weight /= std


def pretrain_(model: MLP, x: torch.Tensor, *, epochs: int, lr: float, batch_size: int,
              generator: torch.Generator) -> list[float]:
    """Greedy layer-wise tied-weight autoencoder pre-training of ``model``'s hidden layers, in place.

    Returns each layer's final reconstruction loss (MSE on its standardised input).
    """
    losses = []
    h = x
    for layer, act in zip(model.linears[:-1], model.acts):
        mean_, std = h.mean(0), h.std(0).clamp_min(1e-6)
        hs = (h - mean_) / std
        c = torch.zeros(layer.in_features, requires_grad=True)
        opt = torch.optim.SGD([layer.weight, layer.bias, c], lr=lr, momentum=0.9)
        loss = torch.tensor(math.nan)
        for _ in range(epochs):
            for idx in minibatches(len(hs), batch_size, generator):
                xb = hs[idx]
                code = act(F.linear(xb, layer.weight, layer.bias))
                loss = F.mse_loss(F.linear(code, layer.weight.t(), c), xb)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        losses.append(loss.item())
        _fold_standardisation_(layer, mean_, std)
        with torch.no_grad():
            h = act(layer(h))
    return losses


def run(cfg: Config) -> Outcome:
    data_split = digits()
    probe_x, probe_y = data_split.x_train[:256], data_split.y_train[:256]
    kinds = [f"random ({init})" for init in cfg.random_inits] + ["pre-trained"]
    curves: dict[str, list[list[float]]] = {k: [] for k in kinds}
    final: dict[str, list[float]] = {k: [] for k in kinds}
    acc: dict[str, list[float]] = {k: [] for k in kinds}
    ratio: dict[str, list[float]] = {k: [] for k in kinds}
    rec_losses: list[list[float]] = []
    steps_axis: list[int] = []
    for s in seed_list(cfg):
        for kind, init in [(f"random ({i})", i) for i in cfg.random_inits] + [("pre-trained", "default")]:
            torch.manual_seed(s)
            model = MLP(data_split.n_features, 10, cfg.width, cfg.depth, "sigmoid", init)
            if kind == "pre-trained":
                rec_losses.append(pretrain_(model, data_split.x_train, epochs=cfg.pretrain_epochs,
                                            lr=cfg.pretrain_lr, batch_size=cfg.batch_size,
                                            generator=torch.Generator().manual_seed(s)))
            ratio[kind].append(grad_ratio(model, probe_x, probe_y))
            opt = torch.optim.SGD(model.parameters(), lr=cfg.lr)
            hist = train_classifier(model, data_split, opt, steps=cfg.steps, batch_size=cfg.batch_size,
                                    generator=torch.Generator().manual_seed(s),
                                    eval_every=max(1, cfg.steps // 15))
            steps_axis = hist.steps
            curves[kind].append(hist.train_loss)
            final[kind].append(hist.final_train_loss)
            acc[kind].append(hist.test_acc[-1])
    f = {k: mean(v) for k, v in final.items()}
    a = {k: mean(v) for k, v in acc.items()}
    r = {k: geomean(v) for k, v in ratio.items()}
    randoms = kinds[:-1]
    checks: list[Check] = []
    stall = cfg.stall_fraction * _LN10
    ok = all(f[k] != f[k] or f[k] >= stall for k in randoms)
    checks.append(Check(
        "random_init_fails", ok,
        f"From a random init (PyTorch's default, or Xavier) the {cfg.depth}-layer sigmoid net does not "
        f"train with plain SGD: its training loss stays near chance (≥ {fmt(stall)}).",
        f"무작위 초기화(PyTorch 기본값 또는 Xavier)에서 시작하면 {cfg.depth}층 sigmoid 신경망은 순수 SGD로 학습되지 "
        f"않는다. 학습 손실이 무작위 추측 수준({fmt(stall)} 이상)에 머문다.",
        f"final training loss after {cfg.steps} steps: " + ", ".join(f"{k} {fmt(f[k], 4)} (test acc {a[k]:.2f})" for k in randoms)
        + "; ‖∇W₁‖/‖∇W_L‖ at the start: " + ", ".join(f"{k} {fmt(r[k])}" for k in randoms) + ".",
        f"{cfg.steps} 스텝 뒤 최종 학습 손실: " + ", ".join(f"{k} {fmt(f[k], 4)} (테스트 정확도 {a[k]:.2f})" for k in randoms)
        + ". 시작 시점의 ‖∇W₁‖/‖∇W_L‖: " + ", ".join(f"{k} {fmt(r[k])}" for k in randoms) + ".",
        "random init loss " + ", ".join(fmt(f[k], 4) for k in randoms),
        {f"final_loss_{k}": f[k] for k in randoms},
    ))
    p = "pre-trained"
    ok = f[p] == f[p] and f[p] < cfg.trains_below * _LN10 and all(f[p] < f[k] for k in randoms)
    checks.append(Check(
        "pretraining_rescues", ok,
        f"After greedy layer-wise autoencoder pre-training the same net trains with the same SGD "
        f"(final training loss below {cfg.trains_below:g} × ln 10).",
        f"층별로 탐욕적인 오토인코더 사전 학습을 거치면 같은 신경망이 같은 SGD로 학습된다 (최종 학습 손실이 "
        f"ln 10의 {cfg.trains_below:g}배 미만).",
        f"pre-trained: final training loss {fmt(f[p])}, test accuracy {a[p]:.3f}; ‖∇W₁‖/‖∇W_L‖ at the start "
        f"{fmt(r[p])}; autoencoder reconstruction MSE per layer (standardised): "
        + ", ".join(fmt(v) for v in rec_losses[0]) + ".",
        f"사전 학습한 경우: 최종 학습 손실 {fmt(f[p])}, 테스트 정확도 {a[p]:.3f}. 시작 시점의 ‖∇W₁‖/‖∇W_L‖ = "
        f"{fmt(r[p])}. 층별 오토인코더 복원 MSE(표준화 기준): " + ", ".join(fmt(v) for v in rec_losses[0]) + ".",
        f"pre-trained loss {fmt(f[p])}, acc {a[p]:.2f}",
        {"final_loss_pretrained": f[p], "test_acc_pretrained": a[p]},
    ))
    data = {"steps": steps_axis, "curves": {k: [mean(c) for c in zip(*v)] for k, v in curves.items()},
            "final_loss": f, "test_acc": a, "grad_ratio": r, "reconstruction_mse": rec_losses[0]}
    return Outcome(checks, data)


def plot(result: ExperimentResult) -> list:
    from gradguard.lab._plot import COLORS, figure, finite

    d = result.data
    fig, (a1, a2) = figure(2, width=4.8)
    for i, (k, c) in enumerate(d["curves"].items()):
        a1.plot(d["steps"], finite(c), color=COLORS[i], label=f"{k}: acc {d['test_acc'][k]:.2f}")
    a1.axhline(math.log(10), ls=":", color="k", lw=1)
    a1.set(xlabel="fine-tuning step (SGD)", ylabel="training loss", yscale="log",
           title=f"{result.config['depth']} sigmoid layers of {result.config['width']}")
    a1.legend(fontsize=8)
    rec = d["reconstruction_mse"]
    a2.bar(range(1, len(rec) + 1), rec, color=COLORS[2])
    a2.set(xlabel="hidden layer", ylabel="reconstruction MSE (standardised input)",
           title="greedy autoencoder pre-training")
    return [fig]


INFO = ExperimentInfo(
    name="pretraining",
    title_en="Greedy layer-wise pre-training",
    title_ko="층별 탐욕적 사전 학습",
    claim_en="Greedy layer-wise autoencoder pre-training rescues a deep sigmoid net that fails to "
             "train from a random initialisation.",
    claim_ko="무작위 초기화로는 학습되지 않는 깊은 sigmoid 신경망도, 층별로 오토인코더를 먼저 학습시키는 탐욕적 "
             "사전 학습을 거치면 학습된다.",
    source="Hinton, Osindero & Teh (2006), Neural Computation; Bengio, Lamblin, Popovici & "
           "Larochelle (2007), \"Greedy Layer-Wise Training of Deep Networks\", NIPS; Erhan et al. "
           "(2010), JMLR",
    setup_en="6 sigmoid layers of 128 on scikit-learn digits, fine-tuned with plain SGD lr 0.1, "
             "batch 32, 1500 steps, from PyTorch's default init, from Xavier init, and after 3 "
             "epochs per layer of tied-weight autoencoder pre-training; 2 seeds.",
    setup_ko="폭 128인 sigmoid 층 6개를 scikit-learn digits로 학습한다. 순수 SGD(lr 0.1, 배치 32)로 1500 스텝 "
             "미세 조정하며, PyTorch 기본 초기화, Xavier 초기화, 그리고 층마다 3 에포크씩 가중치를 공유하는 "
             "오토인코더로 사전 학습한 경우를 비교한다. 시드는 2개.",
    config=Config(),
    quick_config=Config(steps=400, pretrain_epochs=2, n_seeds=1),
    seconds_quick=2.0,
    seconds_full=12.0,
    runner=run,
    plotter=plot,
)
