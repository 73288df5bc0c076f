"""Clipping rules compared on one spiky task, and the threshold trade-off of norm clipping.

The task is a character-level tanh RNN trained with SGD at a learning rate high enough that the
unclipped run blows up. Each rule gets the same seeds and batches; the experiment records the
held-out loss, the largest training loss after warm-up (stability), and the fraction of steps on
which the rule changed the gradient. A sweep of the norm threshold shows the trade-off: too low a
threshold clips every step and slows learning; too high a threshold never clips and does not
stabilise.

References:
    Pascanu, Mikolov & Bengio (2013), "On the difficulty of training recurrent neural networks",
    ICML (norm clipping; threshold heuristic 0.5–10× the average norm); Mikolov (2012), PhD thesis
    (value clipping); Brock, De, Smith & Simonyan (2021), "High-Performance Large-Scale Image
    Recognition Without Normalization", ICML (AGC); Seetharaman et al. (2020), "AutoClip:
    Adaptive Gradient Clipping for Source Separation Networks", MLSP; Kumar et al. (2025),
    "ZClip: Adaptive Spike Mitigation for LLM Pre-Training".
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch

from gradguard._plan import ParamPlan
from gradguard.clip import adaptive_clip_grad_, clip_grad_norm_, clip_grad_value_
from gradguard.lab._charlm import CharRun, smooth, train_char_rnn
from gradguard.lab._result import Check, ExperimentResult
from gradguard.lab._util import fmt, mean, seed_list
from gradguard.lab.datasets import char_corpus
from gradguard.lab.registry import ExperimentInfo, Outcome
from gradguard.policies import AutoClip, ClipPolicy, ZClip
from gradguard.stats import compute_stats

__all__ = ["Config", "INFO", "METHODS", "plot", "run"]

def _policy_rule(policy: ClipPolicy) -> Callable[[list[torch.nn.Parameter]], None]:
    """A stateful gradguard policy as an in-place rule: the same calls a Guard makes each step."""
    state: dict[str, ParamPlan] = {}

    def rule(params: list[torch.nn.Parameter]) -> None:
        if "plan" not in state:
            holder = torch.nn.ParameterList(params)
            state["plan"] = ParamPlan.from_module(holder)
            policy.bind(holder, state["plan"])
        plan = state["plan"]
        grads = plan.grads()
        stats = compute_stats(grads, policy.norm_type)
        policy.clip_(plan.params, grads, stats, stats.nonfinite)

    return rule


METHODS: dict[str, Callable[[float], Callable[[list[torch.nn.Parameter]], None] | None]] = {
    "none": lambda _t: None,
    "norm": lambda t: partial(clip_grad_norm_, max_norm=t),
    "value": lambda t: partial(clip_grad_value_, clip_value=t),
    "agc": lambda t: partial(adaptive_clip_grad_, clipping=t),
    "autoclip": lambda t: _policy_rule(AutoClip(percentile=t)),
    "zclip": lambda t: _policy_rule(ZClip(z_thresh=t)),
    # zclip 1.0.0 (PyPI) caps every step at max_grad_norm=1.0 unless told otherwise; this is that.
    "zclip_cap1": lambda t: _policy_rule(ZClip(z_thresh=t, max_norm=1.0)),
}
"""Clipping rules by name: each maps a threshold to a rule ``rule(params)`` that clips the
gradients in place (None = no clipping). The factory is called once per run, so a stateful rule
(a policy with a history) starts fresh for every seed and setting."""


@dataclass(frozen=True)
class Config:
    """Set-up: the char-RNN task of ``clipping_rnn``, smaller and at a higher learning rate.

    Attributes:
        methods: (rule, threshold) pairs compared; rules are the keys of :data:`METHODS`
            (``norm``: max_norm, ``value``: clip_value, ``agc``: lambda, ``autoclip``: the
            percentile p of the norm history, ``zclip``: the z-score threshold, ``zclip_cap1``: the
            same with the PyPI package's default cap of 1.0).
        thresholds: the norm-clipping thresholds of the trade-off sweep.
        warmup: fraction of the steps left out of the stability measure (largest loss).
    """

    methods: tuple[tuple[str, float], ...] = (
        ("none", 0.0), ("norm", 1.0), ("value", 0.1), ("agc", 0.01), ("autoclip", 10.0), ("zclip", 2.5),
        ("zclip_cap1", 2.5),
    )
    thresholds: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0, 100.0)
    text: str = "auto"
    embed: int = 32
    hidden: int = 64
    bptt: int = 25
    batch_size: int = 32
    steps: int = 300
    lr: float = 5.0
    warmup: float = 0.1
    n_seeds: int = 2
    seed: int = 0


def _label(method: str, threshold: float) -> str:
    return "none" if method == "none" else f"{method} {threshold:g}"


def run(cfg: Config) -> Outcome:
    for method, _ in cfg.methods:
        if method not in METHODS:
            raise ValueError(
                f"`methods` names an unknown rule {method!r}; known rules: {', '.join(METHODS)}."
            )
    if len(cfg.thresholds) < 2:
        raise ValueError(f"`thresholds` needs at least two values, got {cfg.thresholds}.")
    corpus = char_corpus(200_000, cfg.text)
    train, val = corpus.split(0.1)
    unigram = train.unigram_loss()
    common = dict(hidden=cfg.hidden, embed=cfg.embed, bptt=cfg.bptt, batch_size=cfg.batch_size,
                  steps=cfg.steps, lr=cfg.lr)
    setups = {_label(m, t): (m, t) for m, t in cfg.methods}
    for t in cfg.thresholds:
        setups.setdefault(_label("norm", t), ("norm", t))
    runs: dict[str, list[CharRun]] = {k: [] for k in setups}
    for s in seed_list(cfg):
        for key, (m, t) in setups.items():
            runs[key].append(train_char_rnn(train, val, clip=METHODS[m](t), seed=s, **common))

    start = int(cfg.steps * cfg.warmup)

    def worst(r: CharRun) -> float:
        return math.nan if r.diverged_at is not None else max(r.loss[start:], default=math.nan)

    val_loss = {k: mean(r.val_loss for r in v) for k, v in runs.items()}
    peak = {k: mean(worst(r) for r in v) for k, v in runs.items()}
    frac = {k: mean(r.clipped_fraction for r in v) for k, v in runs.items()}

    checks: list[Check] = []
    none = _label("none", 0)
    rules = [_label(m, t) for m, t in cfg.methods if m != "none"]
    if none in val_loss and rules:
        nv = val_loss[none]
        bad = [k for k in rules if not (val_loss[k] == val_loss[k] and val_loss[k] < unigram
                                        and (nv != nv or val_loss[k] < nv))]
        table = ", ".join(f"{k} {fmt(val_loss[k])} (peak {fmt(peak[k])}, {frac[k]:.0%} clipped)" for k in rules)
        checks.append(Check(
            "every_rule_stabilises", not bad,
            "On the same spiky task, every clipping rule keeps training stable: held-out loss below "
            "the unclipped run's and below the unigram loss.",
            "같은 불안정한 과제에서 모든 클리핑 방식이 학습을 안정시킨다. 검증 손실이 클리핑하지 않은 실행보다, "
            "그리고 유니그램 손실보다 낮다.",
            f"held-out loss (largest training loss after warm-up, steps clipped): no clipping {fmt(nv)} "
            f"(peak {fmt(peak[none])}); {table}; unigram {fmt(unigram)}.",
            f"검증 손실 (워밍업 이후 최대 학습 손실, 클리핑된 스텝 비율): 클리핑 없음 {fmt(nv)} "
            f"(최대 {fmt(peak[none])}); {table}; 유니그램 {fmt(unigram)}.",
            "loss " + ", ".join(f"{k} {fmt(val_loss[k])}" for k in [none, *rules]),
            {f"val_loss_{k}": val_loss[k] for k in [none, *rules]}
            | {f"clipped_fraction_{k}": frac[k] for k in rules},
        ))
    sweep = [_label("norm", t) for t in sorted(cfg.thresholds)]
    best = min(sweep, key=lambda k: val_loss[k] if val_loss[k] == val_loss[k] else math.inf)
    low, high = sweep[0], sweep[-1]
    shown = ", ".join(f"{k.split()[1]}: {fmt(val_loss[k])} ({frac[k]:.0%} clipped)" for k in sweep)
    ok = low != best and val_loss[low] >= val_loss[best] + 0.1 and frac[low] >= 0.9
    checks.append(Check(
        "too_low_slows", ok,
        "Too low a norm threshold clips every step and slows learning: it ends at least 0.1 nats "
        "above the best threshold.",
        "노름 임계값이 너무 낮으면 매 스텝 클리핑되어 학습이 느려진다. 가장 좋은 임계값보다 0.1 nats 이상 높은 "
        "손실로 끝난다.",
        f"held-out loss by norm threshold: {shown}; best {best.split()[1]}.",
        f"노름 임계값별 검증 손실: {shown}. 가장 좋은 값은 {best.split()[1]}.",
        f"threshold {low.split()[1]}: {fmt(val_loss[low])} vs best {fmt(val_loss[best])}",
        {f"val_loss_{k.replace(' ', '_')}": val_loss[k] for k in sweep},
    ))
    hv = val_loss[high]
    ok = high != best and (hv != hv or hv >= unigram or hv >= 1.5 * val_loss[best])
    checks.append(Check(
        "too_high_does_not_stabilise", ok,
        "Too high a threshold hardly ever clips and does not stabilise: it ends above the unigram "
        "loss or 1.5× the best threshold's loss.",
        "임계값이 너무 높으면 클리핑이 거의 일어나지 않아 학습이 안정되지 않는다. 유니그램 손실보다, 또는 가장 "
        "좋은 임계값 손실의 1.5배보다 높게 끝난다.",
        f"threshold {high.split()[1]}: held-out loss {fmt(hv)}, {frac[high]:.1%} of steps clipped, peak "
        f"training loss {fmt(peak[high])}; best threshold {fmt(val_loss[best])}; unigram {fmt(unigram)}.",
        f"임계값 {high.split()[1]}: 검증 손실 {fmt(hv)}, 클리핑된 스텝 {frac[high]:.1%}, 최대 학습 손실 "
        f"{fmt(peak[high])}. 가장 좋은 임계값은 {fmt(val_loss[best])}, 유니그램은 {fmt(unigram)}.",
        f"threshold {high.split()[1]}: {fmt(hv)} ({frac[high]:.0%} clipped)",
        {"val_loss_high_threshold": hv, "clipped_fraction_high_threshold": frac[high]},
    ))
    window = max(1, cfg.steps // 30)
    data = {
        "unigram_loss": unigram, "val_loss": val_loss, "peak_loss": peak, "clipped_fraction": frac,
        "methods": [_label(m, t) for m, t in cfg.methods], "sweep": sweep,
        "thresholds": sorted(cfg.thresholds),
        "loss_curve": {k: smooth(v[0].loss, window) for k, v in runs.items()},
    }
    return Outcome(checks, data)


def plot(result: ExperimentResult) -> list:
    from gradguard.lab._plot import COLORS, figure, finite

    d = result.data
    fig, (a1, a2) = figure(2, width=4.8)
    for i, k in enumerate(d["methods"]):
        a1.plot(finite(d["loss_curve"][k]), color=COLORS[i],
                label=f"{k}: {d['clipped_fraction'][k]:.0%} clipped")
    a1.axhline(d["unigram_loss"], ls=":", color="k", lw=1, label="unigram loss")
    a1.set(xlabel="step", ylabel="training loss (running mean)", yscale="log",
           title="clipping rules on one spiky task (seed 0)")
    a1.legend(fontsize=7)
    a2.plot(d["thresholds"], finite([d["val_loss"][k] for k in d["sweep"]]), "o-", color=COLORS[0],
            label="held-out loss")
    a2.axhline(d["unigram_loss"], ls=":", color="k", lw=1, label="unigram loss")
    a2.set(xscale="log", yscale="log", xlabel="norm-clipping threshold", ylabel="held-out loss",
           title="the threshold trade-off")
    ax2 = a2.twinx()
    ax2.plot(d["thresholds"], [d["clipped_fraction"][k] for k in d["sweep"]], "s--", color=COLORS[1],
             label="fraction of steps clipped")
    ax2.set(ylabel="fraction of steps clipped", ylim=(-0.05, 1.05))
    a2.legend(loc="upper left", fontsize=7)
    ax2.legend(loc="upper right", fontsize=7)
    return [fig]


INFO = ExperimentInfo(
    name="clipping_methods",
    title_en="Clipping rules and the threshold trade-off",
    title_ko="클리핑 방식과 임계값의 트레이드오프",
    claim_en="Norm, value and adaptive (AGC, AutoClip, ZClip) clipping compared on the same spiky "
             "task: stability, final loss, fraction of steps clipped. The threshold is a trade-off: "
             "too low slows learning, too high does not stabilise it.",
    claim_ko="노름·값·적응형(AGC, AutoClip, ZClip) 클리핑을 같은 불안정한 과제에서 비교한다. 안정성, 최종 "
             "손실, 클리핑된 스텝 비율을 본다. 임계값은 트레이드오프다. 너무 낮으면 학습이 느려지고, 너무 높으면 "
             "안정되지 않는다.",
    source="Pascanu, Mikolov & Bengio (2013), ICML; Brock et al. (2021), \"High-Performance "
           "Large-Scale Image Recognition Without Normalization\", ICML (AGC); Seetharaman et al. "
           "(2020), AutoClip, MLSP; Kumar et al. (2025), ZClip",
    setup_en="A tanh RNN (embedding 32, 64 units) on the Tiny Shakespeare slice, plain SGD at lr 5, "
             "bptt 25, batch 32, 300 steps; no clipping, norm (1), value (0.1), AGC (0.01), "
             "AutoClip (10th percentile) and ZClip (z 2.5, without and with the zclip package's "
             "default cap of 1.0), then norm thresholds 0.01–100; 2 seeds.",
    setup_ko="tanh RNN(임베딩 32, 유닛 64)을 Tiny Shakespeare 일부로 학습한다. lr 5의 순수 SGD, bptt 25, "
             "배치 32, 300 스텝. 클리핑 없음, 노름(1), 값(0.1), AGC(0.01), AutoClip(10번째 백분위수), "
             "ZClip(z 2.5, zclip 패키지 기본값인 상한 1.0 없이/있이)을 비교한 뒤 노름 임계값을 0.01부터 100까지 바꿔 본다. 시드는 2개.",
    config=Config(),
    quick_config=Config(thresholds=(0.01, 1.0, 100.0), steps=120, n_seeds=1),
    seconds_quick=3.0,
    seconds_full=18.0,
    runner=run,
    plotter=plot,
)
