"""Initialisation scale decides whether signals explode, vanish or survive depth.

Four parts: (1) a ReLU net with N(0, 1) weights explodes and one with N(0, 0.01²) vanishes;
(2) Xavier keeps a tanh net's activations in range and He keeps a ReLU net's, while Xavier lets a
ReLU net's signal die; (3) He et al. (2015) Fig. 3: a 30-layer ReLU net stalls with Xavier init
and trains with He init; (4) Glorot & Bengio (2010) Fig. 2: with sigmoid and the "standard" init
U[±1/√fan_in], the top hidden layer saturates towards 0 while the lower layers stay near 0.5.

References:
    Glorot & Bengio (2010), "Understanding the difficulty of training deep feedforward neural
    networks", AISTATS, Fig. 2 and Section 4.2.1; He, Zhang, Ren & Sun (2015), "Delving Deep into
    Rectifiers", ICCV, Section 2.2 and Fig. 3.
"""

from __future__ import annotations

import math
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

_LN10 = math.log(10)


@dataclass(frozen=True)
class Config:
    """Set-up (digits, MLPs of ``width`` units).

    Attributes:
        scale_depth, scale_stds, scale_steps: the N(0, std²) sweep on a ReLU net.
        match_depth: depth at which activation scales are compared (tanh/ReLU x Xavier/He).
        he_depth, he_steps, he_lr: He et al. (2015) Fig. 3 analogue (SGD, momentum 0.9, batch 64).
        glorot_width, glorot_steps, glorot_lr, glorot_batch: Glorot & Bengio Fig. 2 analogue:
            4 hidden sigmoid layers with the standard init, plain SGD.
    """

    width: int = 64
    scale_depth: int = 10
    scale_stds: tuple[float, ...] = (0.01, 0.05, 0.177, 0.5, 1.0)
    scale_steps: int = 200
    match_depth: int = 30
    he_depth: int = 30
    he_steps: int = 800
    he_lr: float = 3e-3
    glorot_width: int = 512
    glorot_steps: int = 3000
    glorot_lr: float = 0.1
    glorot_batch: int = 10
    n_seeds: int = 2
    seed: int = 0


@torch.no_grad()
def _activation_stats(model: MLP, x: torch.Tensor) -> tuple[list[float], list[float], list[float]]:
    """Per hidden layer: std of the activations, their mean, and the fraction with |a| > 0.95."""
    stds, means, sat = [], [], []
    h = x
    for lin, act in zip(model.linears[:-1], model.acts):
        h = act(lin(h))
        stds.append(h.std().item())
        means.append(h.mean().item())
        sat.append((h.abs() > 0.95).float().mean().item())
    return stds, means, sat


def run(cfg: Config) -> Outcome:
    data_split = digits()
    x, y = data_split.x_train[:256], data_split.y_train[:256]
    seeds = seed_list(cfg)
    n_in = data_split.n_features

    # 1. Scale sweep: ReLU, N(0, std^2).
    sweep_std: dict[str, list[float]] = {}
    sweep_train: dict[str, dict[str, object]] = {}
    for std in cfg.scale_stds:
        key = fmt(std)
        torch.manual_seed(cfg.seed)
        model = MLP(n_in, 10, cfg.width, cfg.scale_depth, "relu", "normal", init_std=std)
        sweep_std[key] = _activation_stats(model, x)[0]
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        grad_norm = math.sqrt(sum(p.grad.pow(2).sum().item() for p in model.parameters()))
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        hist = train_classifier(model, data_split, opt, steps=cfg.scale_steps, batch_size=64,
                                generator=torch.Generator().manual_seed(cfg.seed),
                                eval_every=max(1, cfg.scale_steps // 4))
        sweep_train[key] = {"grad_norm": grad_norm, "final_loss": hist.final_train_loss,
                            "diverged_at": hist.diverged_at, "first_loss": hist.train_loss[0]}
    big, small = fmt(max(cfg.scale_stds)), fmt(min(cfg.scale_stds))

    # 2. Matched pairs at match_depth.
    match: dict[str, dict[str, list[float]]] = {}
    for act, init in (("tanh", "xavier"), ("tanh", "he"), ("relu", "xavier"), ("relu", "he")):
        torch.manual_seed(cfg.seed)
        model = MLP(n_in, 10, cfg.width, cfg.match_depth, act, init)
        stds, _, sat = _activation_stats(model, x)
        match[f"{act}+{init}"] = {"std": stds, "saturated": sat}

    # 3. He et al. 2015 Fig. 3 analogue.
    he_curves: dict[str, list[float]] = {}
    he_final: dict[str, float] = {}
    he_steps: list[int] = []
    for init in ("xavier", "he"):
        runs, finals = [], []
        for s in seeds:
            torch.manual_seed(s)
            model = MLP(n_in, 10, cfg.width, cfg.he_depth, "relu", init)
            opt = torch.optim.SGD(model.parameters(), lr=cfg.he_lr, momentum=0.9)
            hist = train_classifier(model, data_split, opt, steps=cfg.he_steps, batch_size=64,
                                    generator=torch.Generator().manual_seed(s),
                                    eval_every=max(1, cfg.he_steps // 20))
            runs.append(hist.train_loss)
            finals.append(hist.final_train_loss)
            he_steps = hist.steps
        he_curves[init] = [mean(c) for c in zip(*runs)]
        he_final[init] = mean(finals)

    # 4. Glorot & Bengio 2010 Fig. 2 analogue: mean activation per layer during training.
    torch.manual_seed(cfg.seed)
    model = MLP(n_in, 10, cfg.glorot_width, 4, "sigmoid", "default")
    opt = torch.optim.SGD(model.parameters(), lr=cfg.glorot_lr)
    probe = data_split.x_test[:300]
    marks = sorted({0, *(int(round(cfg.glorot_steps * f)) for f in
                         (0.01, 0.02, 0.05, 0.1, 0.2, 0.33, 0.5, 0.67, 0.83, 1.0))} - {0})
    glorot_steps, glorot_means = [0], [_activation_stats(model, probe)[1]]

    def after(step: int, _loss: float) -> None:
        if step + 1 in marks:
            glorot_steps.append(step + 1)
            glorot_means.append(_activation_stats(model, probe)[1])

    ghist = train_classifier(model, data_split, opt, steps=cfg.glorot_steps, batch_size=cfg.glorot_batch,
                             generator=torch.Generator().manual_seed(cfg.seed),
                             eval_every=cfg.glorot_steps, after_step=after)

    checks: list[Check] = []
    b = sweep_train[big]
    growth = sweep_std[big][-1] / sweep_std[big][0]
    ok = growth >= 1e3 and (b["diverged_at"] is not None or not b["final_loss"] < 10 * _LN10)
    div = f"diverged (NaN) at step {b['diverged_at']}" if b["diverged_at"] is not None else \
        f"final loss {fmt(b['final_loss'])}"
    div_ko = f"{b['diverged_at']} 스텝에서 발산(NaN)" if b["diverged_at"] is not None else \
        f"최종 손실 {fmt(b['final_loss'])}"
    checks.append(Check(
        "normal_init_explodes", ok,
        f"With N(0, {big}²) weights a {cfg.scale_depth}-layer ReLU net explodes: the activations grow "
        "by orders of magnitude with depth and training blows up.",
        f"가중치를 N(0, {big}²)로 초기화한 {cfg.scale_depth}층 ReLU 신경망은 폭주한다. 활성값이 깊이에 따라 "
        "몇 자릿수씩 커지고 학습이 터져 버린다.",
        f"activation std layer 1 → {cfg.scale_depth}: {fmt(sweep_std[big][0])} → {fmt(sweep_std[big][-1])} "
        f"(×{fmt(growth)}); gradient norm at init {fmt(b['grad_norm'])}; training {div}.",
        f"활성값 표준편차가 1층 → {cfg.scale_depth}층에서 {fmt(sweep_std[big][0])} → {fmt(sweep_std[big][-1])} "
        f"(×{fmt(growth)}). 초기 기울기 노름 {fmt(b['grad_norm'])}. 학습: {div_ko}.",
        f"N(0,{big}²): act ×{fmt(growth)}, {'NaN' if b['diverged_at'] is not None else fmt(b['final_loss'])}",
        {"big_init_growth": growth, "big_init_grad_norm": b["grad_norm"]},
    ))
    sm = sweep_train[small]
    shrink = sweep_std[small][-1] / sweep_std[small][0]
    ok = shrink <= 1e-3 and sm["final_loss"] >= 0.9 * _LN10
    checks.append(Check(
        "small_init_vanishes", ok,
        f"With N(0, {small}²) weights the signal and the gradients vanish and training stalls near ln 10.",
        f"가중치를 N(0, {small}²)로 초기화하면 신호와 기울기가 사라지고, 손실은 ln 10 근처에서 멈춘다.",
        f"activation std layer 1 → {cfg.scale_depth}: {fmt(sweep_std[small][0])} → {fmt(sweep_std[small][-1])} "
        f"(×{fmt(shrink)}); gradient norm at init {fmt(sm['grad_norm'])}; training loss "
        f"{fmt(sm['first_loss'], 4)} → {fmt(sm['final_loss'], 4)} after {cfg.scale_steps} steps.",
        f"활성값 표준편차가 1층 → {cfg.scale_depth}층에서 {fmt(sweep_std[small][0])} → {fmt(sweep_std[small][-1])} "
        f"(×{fmt(shrink)}). 초기 기울기 노름 {fmt(sm['grad_norm'])}. 학습 손실은 {cfg.scale_steps} 스텝 동안 "
        f"{fmt(sm['first_loss'], 4)} → {fmt(sm['final_loss'], 4)}.",
        f"N(0,{small}²): act ×{fmt(shrink)}, loss {fmt(sm['final_loss'], 4)}",
        {"small_init_shrink": shrink, "small_init_final_loss": sm["final_loss"]},
    ))
    keep = {k: v["std"][-1] / v["std"][0] for k, v in match.items()}
    ok = (0.1 <= keep["tanh+xavier"] <= 10 and 0.1 <= keep["relu+he"] <= 10
          and keep["relu+xavier"] <= 1e-2)
    checks.append(Check(
        "matched_init", ok,
        f"Xavier suits tanh and He suits ReLU: over {cfg.match_depth} layers each keeps the activation "
        "scale within 10× of the first layer's, while Xavier lets a ReLU net's signal shrink over 100×.",
        f"tanh에는 Xavier, ReLU에는 He가 맞는다. {cfg.match_depth}개 층을 지나도 활성값 크기가 첫 층의 10배 "
        "이내로 유지되지만, ReLU에 Xavier를 쓰면 신호가 100배 넘게 줄어든다.",
        f"activation std, layer {cfg.match_depth} / layer 1: " + ", ".join(f"{k} {fmt(v)}" for k, v in keep.items())
        + f"; fraction |tanh| > 0.95 at layer {cfg.match_depth}: Xavier {fmt(match['tanh+xavier']['saturated'][-1])}, "
        f"He {fmt(match['tanh+he']['saturated'][-1])}.",
        f"{cfg.match_depth}층 / 1층 활성값 표준편차: " + ", ".join(f"{k} {fmt(v)}" for k, v in keep.items())
        + f". {cfg.match_depth}층에서 |tanh| > 0.95인 비율: Xavier {fmt(match['tanh+xavier']['saturated'][-1])}, "
        f"He {fmt(match['tanh+he']['saturated'][-1])}.",
        f"scale kept: tanh+Xavier {fmt(keep['tanh+xavier'])}, ReLU+He {fmt(keep['relu+he'])}, "
        f"ReLU+Xavier {fmt(keep['relu+xavier'])}",
        {f"scale_kept_{k}": v for k, v in keep.items()},
    ))
    xa, he = he_final["xavier"], he_final["he"]
    ok = he < xa and xa >= 0.9 * _LN10 and he <= 0.5 * _LN10
    checks.append(Check(
        "he_beats_xavier", ok,
        f"He et al. 2015, Fig. 3: a {cfg.he_depth}-layer ReLU net stalls with Xavier init and trains with He init.",
        f"He et al. 2015, Fig. 3: {cfg.he_depth}층 ReLU 신경망은 Xavier 초기화로는 학습이 멈추고, He 초기화로는 학습된다.",
        f"final training loss after {cfg.he_steps} steps (mean over {len(seeds)} seed{'s' * (len(seeds) > 1)}): Xavier {fmt(xa, 4)}, "
        f"He {fmt(he, 4)} (ln 10 = 2.303).",
        f"{cfg.he_steps} 스텝 뒤 최종 학습 손실 (시드 {len(seeds)}개 평균): Xavier {fmt(xa, 4)}, He {fmt(he, 4)} "
        "(ln 10 = 2.303).",
        f"depth {cfg.he_depth}: He {fmt(he)} < Xavier {fmt(xa, 4)}",
        {"xavier_final_loss": xa, "he_final_loss": he},
    ))
    top0, top_end = glorot_means[0][-1], glorot_means[-1][-1]
    lower_end = glorot_means[-1][:-1]
    ok = top_end < 0.5 * top0 and all(0.4 <= v <= 0.8 for v in lower_end)
    checks.append(Check(
        "glorot_top_saturation", ok,
        "Glorot & Bengio 2010, Fig. 2: with sigmoid and the standard init the top hidden layer's "
        "mean activation sinks towards 0 (saturation) while the lower layers stay near 0.5.",
        "Glorot & Bengio 2010, Fig. 2: sigmoid에 표준 초기화를 쓰면 맨 위 은닉층의 평균 활성값은 0 쪽으로 "
        "가라앉아 포화되고, 아래층들은 0.5 근처에 머문다.",
        f"top layer mean activation {fmt(top0)} → {fmt(top_end)} after {cfg.glorot_steps} steps; layers 1–3 "
        f"end at {', '.join(fmt(v) for v in lower_end)}; training loss {fmt(ghist.train_loss[0], 4)} → "
        f"{fmt(ghist.final_train_loss, 4)}.",
        f"{cfg.glorot_steps} 스텝 동안 맨 위층의 평균 활성값 {fmt(top0)} → {fmt(top_end)}. 1–3층은 "
        f"{', '.join(fmt(v) for v in lower_end)}에서 끝난다. 학습 손실 {fmt(ghist.train_loss[0], 4)} → "
        f"{fmt(ghist.final_train_loss, 4)}.",
        f"top sigmoid layer {fmt(top0)} → {fmt(top_end)}",
        {"glorot_top_mean_start": top0, "glorot_top_mean_end": top_end},
    ))
    data = {
        "sweep_std": sweep_std, "sweep_train": sweep_train, "match": match,
        "he_steps": he_steps, "he_curves": he_curves, "he_final": he_final,
        "glorot_steps": glorot_steps, "glorot_means": glorot_means,
        "glorot_loss": [ghist.train_loss[0], ghist.final_train_loss],
        "he_std": math.sqrt(2 / cfg.width), "geomean_keep": geomean(keep.values()),
    }
    return Outcome(checks, data)


def plot(result: ExperimentResult) -> list:
    from gradguard.lab._plot import COLORS, figure, finite

    d = result.data
    fig1, (a1, a2) = figure(2, width=4.8)
    for i, (k, stds) in enumerate(d["sweep_std"].items()):
        a1.semilogy(range(1, len(stds) + 1), stds, "o-", color=COLORS[i], label=f"N(0, {k}²)")
    a1.set(xlabel="hidden layer", ylabel="activation std", title="ReLU net at init: weight scale")
    a1.legend(fontsize=7)
    for i, (k, v) in enumerate(d["match"].items()):
        a2.semilogy(range(1, len(v["std"]) + 1), v["std"], color=COLORS[i], label=k)
    a2.set(xlabel="hidden layer", ylabel="activation std", title="matched and mismatched inits")
    a2.legend(fontsize=7)
    fig2, (b1, b2) = figure(2, width=4.8)
    for i, (k, curve) in enumerate(d["he_curves"].items()):
        b1.plot(d["he_steps"], finite(curve), color=COLORS[i], label=k)
    b1.axhline(math.log(10), ls=":", color="k", lw=1)
    b1.set(xlabel="step", ylabel="training loss",
           title=f"{result.config['he_depth']}-layer ReLU net (He 2015, Fig. 3)")
    b1.legend()
    means = list(zip(*d["glorot_means"]))
    for i, layer in enumerate(means):
        b2.plot(d["glorot_steps"], layer, "o-", ms=3, color=COLORS[i], label=f"layer {i + 1}")
    b2.set(xscale="symlog", xlabel="step", ylabel="mean sigmoid activation",
           title="Glorot & Bengio 2010, Fig. 2 analogue")
    b2.legend(fontsize=8)
    return [fig1, fig2]


INFO = ExperimentInfo(
    name="init_schemes",
    title_en="Initialisation: too big, too small, Xavier and He",
    title_ko="초기화: 너무 크게, 너무 작게, Xavier와 He",
    claim_en="N(0, 1) weights explode and a too-small init vanishes; Xavier suits tanh and He suits "
             "ReLU (He 2015: a 30-layer ReLU net stalls with Xavier and trains with He); with the "
             "standard init, the top sigmoid layer saturates (Glorot 2010, Fig. 2).",
    claim_ko="N(0, 1)로 초기화하면 폭주하고, 너무 작게 초기화하면 소실된다. tanh에는 Xavier, ReLU에는 He가 맞는다 "
             "(He 2015: 30층 ReLU 신경망은 Xavier로는 멈추고 He로는 학습된다). 표준 초기화를 쓰면 맨 위 "
             "sigmoid 층이 포화된다 (Glorot 2010, Fig. 2).",
    source="Glorot & Bengio (2010), \"Understanding the difficulty of training deep feedforward "
           "neural networks\", AISTATS, Fig. 2; He, Zhang, Ren & Sun (2015), \"Delving Deep into "
           "Rectifiers\", ICCV, Fig. 3",
    setup_en="scikit-learn digits. A 10-layer ReLU net with N(0, σ²) weights for σ from 0.01 to 1 "
             "(200 SGD steps); activation scales of 30-layer tanh/ReLU nets under Xavier and He; "
             "30 layers of 64 ReLU units trained 800 steps with SGD-momentum, lr 3e-3, Xavier vs He "
             "(2 seeds); 4 sigmoid layers of 512 with the standard init, SGD lr 0.1, batch 10, 3000 steps.",
    setup_ko="scikit-learn digits를 쓴다. 10층 ReLU 신경망을 σ = 0.01–1인 N(0, σ²)로 초기화해 SGD로 200 스텝 "
             "돌리고, 30층 tanh/ReLU 신경망의 활성값 크기를 Xavier와 He로 비교한다. 폭 64의 30층 ReLU 신경망을 "
             "SGD-momentum(lr 3e-3)으로 800 스텝 학습해 Xavier와 He를 비교하고 (시드 2개), 폭 512의 sigmoid "
             "4층을 표준 초기화로 SGD(lr 0.1, 배치 10) 3000 스텝 학습한다.",
    config=Config(),
    quick_config=Config(scale_steps=60, he_steps=260, glorot_steps=300, n_seeds=1),
    seconds_quick=3.5,
    seconds_full=24.0,
    runner=run,
    plotter=plot,
)
