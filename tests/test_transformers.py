"""GradGuardCallback in a real transformers.Trainer, on a tiny GPT-2 built from a config (CPU)."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments  # noqa: E402

import gradguard as gg  # noqa: E402
from gradguard.integrations.transformers import CHECKPOINT_FILE, GradGuardCallback  # noqa: E402

torch.set_num_threads(1)
transformers.logging.set_verbosity_error()
logging.getLogger("gradguard").setLevel(logging.ERROR)


def _model() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=100,
                                      n_positions=32, loss_type="ForCausalLM"))


def _data(n: int = 32) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 100, (16,), generator=g)
        out.append({"input_ids": ids, "labels": ids})
    return out


def _trainer(tmp: Path, callbacks: list[Any], **kw: Any) -> Trainer:
    base = dict(output_dir=str(tmp), max_steps=4, per_device_train_batch_size=4, logging_steps=1,
                report_to=[], use_cpu=True, save_strategy="no", max_grad_norm=0.0,
                learning_rate=1e-3, disable_tqdm=True, seed=0, data_seed=0)
    base.update(kw)
    return Trainer(model=_model(), args=TrainingArguments(**base), train_dataset=_data(),
                   callbacks=callbacks)


class GradProbe(TrainerCallback):
    """Runs after GradGuardCallback in on_pre_optimizer_step: sees what the optimizer will get."""

    def __init__(self) -> None:
        self.norms: list[float | None] = []
        self.lrs: list[float] = []

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        self.norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))
                          if grads else None)

    def on_step_end(self, args: Any, state: Any, control: Any, lr_scheduler: Any = None, **kw: Any) -> None:
        self.lrs.append(lr_scheduler.get_last_lr()[0])


class PlantNaN(TrainerCallback):
    """Runs before GradGuardCallback: a NaN gradient at the given optimizer steps."""

    def __init__(self, steps: tuple[int, ...]) -> None:
        self.steps = steps
        self.snapshots: list[dict[str, Any]] = []

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
        if state.global_step in self.steps:
            next(model.parameters()).grad.view(-1)[0] = float("nan")

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None, **kw: Any) -> None:
        self.snapshots.append({
            "params": [p.detach().clone() for p in model.parameters()],
            "opt": {k: {n: v.clone() if torch.is_tensor(v) else v for n, v in st.items()}
                    for k, st in optimizer.state_dict()["state"].items()},
        })


@pytest.mark.parametrize("accumulation", [1, 2])
def test_logged_grad_norm_matches_the_trainers_own(tmp_path: Path, accumulation: int) -> None:
    cb, probe = GradGuardCallback(clip=gg.FixedClip(0.5), log_per_layer="auto"), GradProbe()
    tr = _trainer(tmp_path, [cb, probe], gradient_accumulation_steps=accumulation)
    tr.train()
    rows = [h for h in tr.state.log_history if "grad_norm" in h]
    assert len(rows) == 4
    for h in rows:
        # the Trainer's grad_norm (torch's clip_grad_norm_ at inf) and gradguard's: same pre-clip norm
        assert h["gradguard/grad_norm"] == pytest.approx(h["grad_norm"], rel=1e-6)
        assert h["gradguard/clipped"] == 1.0 and h["gradguard/threshold"] == 0.5
        assert h["gradguard/skipped"] == 0.0
        # 32 tensors > 16: one chart per block or module, each the 2-norm of its tensors' norms
        groups = {k.split("/", 2)[2] for k in h if k.startswith("gradguard/grad_norm/")}
        assert groups == {"transformer.wte", "transformer.wpe", "transformer.h.0",
                          "transformer.h.1", "transformer.ln_f"}
    hist = cb.guard.history
    block0 = [hist.layer_series(n)[-1] for n in hist.names if n.startswith("transformer.h.0.")]
    assert rows[-1]["gradguard/grad_norm/transformer.h.0"] == pytest.approx(
        math.sqrt(sum(v * v for v in block0)), rel=1e-6)
    # and the optimizer got the clipped gradients
    assert probe.norms == [pytest.approx(0.5, rel=1e-4)] * 4
    assert cb.guard.history.global_norm == pytest.approx([h["grad_norm"] for h in rows], rel=1e-6)


def test_double_clipping_is_refused(tmp_path: Path) -> None:
    tr = _trainer(tmp_path, [GradGuardCallback(clip=gg.ZClip())], max_grad_norm=1.0)
    with pytest.raises(ValueError, match=r"max_grad_norm=1.0\).*Set max_grad_norm=0"):
        tr.train()


def test_measure_only_keeps_the_trainers_clipping(tmp_path: Path) -> None:
    cb = GradGuardCallback(clip=None)
    tr = _trainer(tmp_path, [cb], max_grad_norm=0.1, max_steps=2)
    tr.train()
    # the Trainer clipped to 0.1 before the hook: the callback records post-clip norms
    assert cb.guard.history.global_norm == pytest.approx([0.1, 0.1], rel=1e-4)
    assert all(h["grad_norm"] > 0.1 for h in tr.state.log_history if "grad_norm" in h)


def test_nonfinite_step_cancelled_and_scheduler_held(tmp_path: Path) -> None:
    plant, probe = PlantNaN(steps=(1,)), GradProbe()
    cb = GradGuardCallback(clip=gg.FixedClip(1.0))
    tr = _trainer(tmp_path, [plant, cb, probe], max_steps=4, weight_decay=0.1)
    tr.train()
    s = plant.snapshots
    assert all(torch.equal(a, b) for a, b in zip(s[0]["params"], s[1]["params"]))  # step 1 skipped
    for k, st in s[0]["opt"].items():
        for n, v in st.items():
            assert torch.equal(v, s[1]["opt"][k][n]) if torch.is_tensor(v) else v == s[1]["opt"][k][n]
    assert not all(torch.equal(a, b) for a, b in zip(s[1]["params"], s[2]["params"]))
    assert probe.norms[1] is None  # the optimizer saw no gradient at the skipped step
    # linear decay over 4 steps: the skipped step did not advance the schedule
    assert probe.lrs == pytest.approx([7.5e-4, 7.5e-4, 5e-4, 2.5e-4])
    assert cb.guard.history.skipped == [False, True, False, False]
    assert [h["gradguard/skipped"] for h in tr.state.log_history if "gradguard/skipped" in h] == [0, 1, 0, 0]
    assert all(math.isfinite(float(p.detach().sum())) for p in tr.model.parameters())


def _state_equal(a: Any, b: Any) -> bool:
    if torch.is_tensor(a):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_state_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_state_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and math.isnan(a):
        return math.isnan(b)
    return a == b


def test_checkpoint_and_resume_restore_the_guard(tmp_path: Path) -> None:
    kw = dict(max_steps=4, save_strategy="steps", save_steps=2, logging_steps=2)
    straight = GradGuardCallback(clip=gg.ZClip(warmup=1))
    _trainer(tmp_path / "a", [straight], **kw).train()

    first = GradGuardCallback(clip=gg.ZClip(warmup=1))
    _trainer(tmp_path / "b", [first], **kw).train()
    ckpt = tmp_path / "b" / "checkpoint-2"
    assert (ckpt / CHECKPOINT_FILE).exists()
    saved = torch.load(ckpt / CHECKPOINT_FILE, weights_only=True)
    assert saved["step"] == 2

    resumed = GradGuardCallback(clip=gg.ZClip(warmup=1))
    _trainer(tmp_path / "b", [resumed], **kw).train(resume_from_checkpoint=str(ckpt))
    assert resumed.guard.step_count == 4
    assert _state_equal(resumed.guard.state_dict()["policy"], straight.guard.state_dict()["policy"])

    manual = GradGuardCallback(clip=gg.ZClip(warmup=1))
    manual.load_checkpoint(ckpt)
    assert _state_equal(manual.state_dict(), saved)
    with pytest.raises(FileNotFoundError, match="gradguard.pt"):
        manual.load_checkpoint(tmp_path)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="log_per_layer"):
        GradGuardCallback(log_per_layer="yes")


def test_double_registration_is_refused(tmp_path: Path) -> None:
    cb = GradGuardCallback(clip=gg.FixedClip(0.5))
    tr = _trainer(tmp_path, [cb], max_steps=1)
    tr.callback_handler.callbacks.insert(0, cb)  # the old docs recipe on top of callbacks=[cb]
    with pytest.raises(ValueError, match="registered 2 times on one Trainer"):
        tr.train()
    two = _trainer(tmp_path, [GradGuardCallback(), GradGuardCallback()], max_steps=1)
    with pytest.raises(ValueError, match="2 GradGuardCallbacks are registered"):
        two.train()


def test_metrics_reach_the_report_to_loggers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """report_to=["tensorboard"] is registered before user callbacks, yet it logs gradguard's
    keys, with no reordering by hand; a callback listed before the Guard still runs first."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb_dir = tmp_path / "tb"
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tb_dir))
    plant = PlantNaN(steps=(1,))
    cb = GradGuardCallback(clip=gg.FixedClip(0.5))
    tr = _trainer(tmp_path / "out", [plant, cb], report_to=["tensorboard"], max_steps=3)
    tr.train()
    events = [p for p in tb_dir.rglob("events.out.tfevents.*")]
    assert events, f"no TensorBoard event file under {tb_dir}"
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert "train/gradguard/grad_norm" in tags and "train/gradguard/skipped" in tags
    assert [e.value for e in acc.Scalars("train/gradguard/skipped")] == [0.0, 1.0, 0.0]
    # the keys are in log_history once per logging step, and the NaN planted before the Guard ran
    assert cb.guard.history.skipped == [False, True, False]
