"""GradGuardCallback in a real lightning.pytorch Trainer (CPU).

Ports Lightning's own clipping tests (specs/oracles.md 1f: test_gradient_clipping_by_norm at 0.05,
test_gradient_clipping_by_value at 1e-10, utilities/test_grads.py::test_grad_norm as the
per-parameter oracle) and runs them with the callback doing the clipping and the measuring.
"""

from __future__ import annotations

import logging
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

L = pytest.importorskip("lightning.pytorch")
from lightning.pytorch.loggers import Logger  # noqa: E402
from lightning.pytorch.utilities import grad_norm  # noqa: E402

import gradguard as gg  # noqa: E402
from gradguard.integrations.lightning import GradGuardCallback  # noqa: E402

torch.set_num_threads(1)
logging.getLogger("lightning").setLevel(logging.ERROR)
logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)


class CaptureLogger(Logger):
    """Keeps every logged metric: {name: [(step, value), ...]}."""

    def __init__(self) -> None:
        super().__init__()
        self.metrics: dict[str, list[tuple[int, float]]] = {}

    @property
    def name(self) -> str:
        return "capture"

    @property
    def version(self) -> str:
        return "0"

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        for k, v in metrics.items():
            self.metrics.setdefault(k, []).append((step, float(v)))


def _classif_loader(n: int = 64, batch: int = 16) -> torch.utils.data.DataLoader:
    """Lightning's ClassifDataModule, reduced: sklearn make_classification, offline."""
    from sklearn.datasets import make_classification

    x, y = make_classification(n_samples=n, n_features=32, n_informative=8, n_classes=3,
                               random_state=1234)
    ds = torch.utils.data.TensorDataset(torch.tensor(x, dtype=torch.float32), torch.tensor(y))
    return torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=False)


class ClassifModel(L.LightningModule):
    def __init__(self, opt: str = "sgd", lr: float = 0.1) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(32, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
        self.opt, self.lr = opt, lr
        self.seen: list[dict[str, Any]] = []  # filled by the module's own hooks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> Any:
        if self.opt == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.lr)
        if self.opt == "fused_adam":
            return torch.optim.Adam(self.parameters(), lr=self.lr, fused=True)
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def _trainer(callbacks: list[Any], **kw: Any) -> L.Trainer:
    base = dict(accelerator="cpu", devices=1, max_steps=1, logger=False,
                enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, num_sanity_val_steps=0)
    base.update(kw)
    return L.Trainer(callbacks=callbacks, **base)


def _grads(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p.grad for p in module.parameters() if p.grad is not None]


# --- oracles.md 1f: test_gradient_clipping_by_norm / _by_value, with the callback clipping -------
def test_gradient_clipping_by_norm_0_05() -> None:
    class M(ClassifModel):
        def configure_gradient_clipping(self, optimizer: Any, gradient_clip_val: Any = None,
                                        gradient_clip_algorithm: Any = None) -> None:
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
            # Lightning calls this right after on_before_optimizer_step: the callback has clipped
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in _grads(self)]))
            self.seen.append({"norm": norm})

    model = M()
    cb = GradGuardCallback(clip=gg.FixedClip(0.05))
    _trainer([cb]).fit(model, _classif_loader())
    assert len(model.seen) == 1
    torch.testing.assert_close(model.seen[0]["norm"], torch.tensor(0.05))
    assert float(cb.last_outcome.global_norm) > 0.05 and bool(cb.last_outcome.clipped)


def test_gradient_clipping_by_value_1e_10() -> None:
    class M(ClassifModel):
        def configure_gradient_clipping(self, optimizer: Any, gradient_clip_val: Any = None,
                                        gradient_clip_algorithm: Any = None) -> None:
            self.seen.append({"max": max(float(g.abs().max()) for g in _grads(self))})

    model = M()
    _trainer([GradGuardCallback(clip=gg.ValueClip(1e-10))]).fit(model, _classif_loader())
    assert model.seen == [{"max": pytest.approx(1e-10, rel=1e-6)}]


@pytest.mark.parametrize("algo", ["norm", "value"])
def test_double_clipping_is_refused(algo: str) -> None:
    trainer = _trainer([GradGuardCallback(clip=gg.FixedClip(1.0))], gradient_clip_val=0.5,
                       gradient_clip_algorithm=algo)
    with pytest.raises(ValueError, match="gradient_clip_val=0.5") as e:
        trainer.fit(ClassifModel(), _classif_loader())
    fix = "ValueClip(0.5)" if algo == "value" else "FixedClip(0.5)"
    assert fix in str(e.value) and "clip=None" in str(e.value)


def test_trainer_clipping_allowed_when_callback_only_measures() -> None:
    class M(ClassifModel):
        def configure_gradient_clipping(self, optimizer: Any, gradient_clip_val: Any = None,
                                        gradient_clip_algorithm: Any = None) -> None:
            before = float(torch.linalg.vector_norm(torch.stack([g.norm() for g in _grads(self)])))
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
            after = float(torch.linalg.vector_norm(torch.stack([g.norm() for g in _grads(self)])))
            self.seen.append({"before": before, "after": after})

    model = M()
    cb = GradGuardCallback(clip=None)
    _trainer([cb], gradient_clip_val=0.05).fit(model, _classif_loader())
    # the callback measured the pre-clip norm; Lightning then clipped to 0.05
    assert model.seen[0]["before"] == pytest.approx(float(cb.last_outcome.global_norm), rel=1e-6)
    assert model.seen[0]["after"] == pytest.approx(0.05, rel=1e-4)


# --- utilities/test_grads.py::test_grad_norm: the per-parameter oracle ---------------------------
class OracleModel(L.LightningModule):
    def __init__(self, dtype: torch.dtype = torch.float32, big: bool = False) -> None:
        super().__init__()
        self.param0 = torch.nn.Parameter(torch.zeros(3, dtype=dtype))
        self.param1 = torch.nn.Parameter(torch.zeros(2, 1, dtype=dtype))
        self.param2 = torch.nn.Parameter(torch.zeros(1, dtype=dtype))  # never gets a gradient
        self.big = big
        self.lightning_norms: dict[str, torch.Tensor] = {}
        self.norm_type = 2.0

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return (self.param0.sum() + self.param1.sum()) * 0.0

    def on_after_backward(self) -> None:
        dt = self.param0.dtype
        self.param0.grad = torch.tensor([-1.0, 2.0, -3.0], dtype=dt)
        self.param1.grad = torch.tensor([[-4.0], [5.0]], dtype=dt)
        if self.big:
            self.param0.grad = torch.tensor([1e23, 0.0, 0.0], dtype=dt)

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        self.lightning_norms = grad_norm(self, self.norm_type)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.0)


def _oracle_loader() -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(1, 1)), batch_size=1)


@pytest.mark.parametrize(
    "norm_type,expected",
    [
        (1.0, (6.0, 9.0, 15.0)),
        (2.0, (math.sqrt(14), math.sqrt(41), math.sqrt(55))),
        (3.14, (3.2708, 5.6847, 5.9863)),
        (math.inf, (3.0, 5.0, 5.0)),
    ],
)
def test_per_parameter_norm_oracle(norm_type: float, expected: tuple[float, float, float]) -> None:
    model = OracleModel()
    model.norm_type = norm_type
    logger = CaptureLogger()
    # a threshold no gradient reaches: the policy only sets the norm's order
    cb = GradGuardCallback(clip=gg.FixedClip(1e9, norm_type=norm_type), log_per_layer=True)
    _trainer([cb], logger=logger).fit(model, _oracle_loader())
    p0, p1, total = expected
    assert logger.metrics["gradguard/grad_norm/param0"] == [(0, pytest.approx(p0, rel=1e-4))]
    assert logger.metrics["gradguard/grad_norm/param1"] == [(0, pytest.approx(p1, rel=1e-4))]
    assert logger.metrics["gradguard/grad_norm/param2"] == [(0, 0.0)]  # no gradient: 0
    assert logger.metrics["gradguard/global_norm"] == [(0, pytest.approx(total, rel=1e-4))]
    # and against lightning.pytorch.utilities.grad_norm, computed on the same gradients
    ln = model.lightning_norms
    key = f"grad_{float(norm_type)}_norm"
    assert float(ln[f"{key}/param0"]) == pytest.approx(p0, rel=1e-4)
    assert float(ln[f"{key}_total"]) == pytest.approx(total, rel=1e-4)
    assert f"{key}/param2" not in ln  # Lightning drops gradient-less params; gradguard logs 0


def test_float64_big_gradient_stays_finite() -> None:
    model = OracleModel(dtype=torch.float64, big=True)
    cb = GradGuardCallback(clip=None)
    _trainer([cb]).fit(model, _oracle_loader())
    norm = float(cb.last_outcome.global_norm)
    assert math.isfinite(norm) and norm == pytest.approx(1e23, rel=1e-9)
    assert not bool(cb.last_outcome.skipped)


def test_per_layer_norms_match_lightning_grad_norm_over_steps() -> None:
    class M(ClassifModel):
        def on_before_optimizer_step(self, optimizer: Any) -> None:
            self.seen.append({k: float(v) for k, v in grad_norm(self, 2).items()})

    model = M()
    cb = GradGuardCallback(clip=None, flush_every=2)
    _trainer([cb], max_steps=4).fit(model, _classif_loader())
    hist = cb.guard.history
    assert len(hist) == 4 and len(model.seen) == 4
    for i, row in enumerate(model.seen):
        assert hist.global_norm[i] == pytest.approx(row["grad_2.0_norm_total"], rel=1e-5)
        for name in hist.names:
            assert hist.layer_series(name)[i] == pytest.approx(row[f"grad_2.0_norm/{name}"], rel=1e-5)


# --- skipping ------------------------------------------------------------------------------------
class NaNAt(ClassifModel):
    def __init__(self, nan_steps: tuple[int, ...], opt: str = "adam") -> None:
        super().__init__(opt=opt, lr=0.01)
        self.nan_steps = nan_steps
        self.snap: list[dict[str, Any]] = []

    def on_after_backward(self) -> None:
        if self.trainer.global_step in self.nan_steps:
            self.net[0].weight.grad[0, 0] = float("nan")

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        opt = self.trainer.optimizers[0]
        self.snap.append({
            "params": [p.detach().clone() for p in self.parameters()],
            "opt": {k: {kk: vv.clone() if torch.is_tensor(vv) else vv for kk, vv in v.items()}
                    for k, v in opt.state_dict()["state"].items()},
        })


@pytest.mark.parametrize("opt", ["adam", "sgd"])
def test_nonfinite_step_is_cancelled_and_state_untouched(opt: str) -> None:
    model = NaNAt(nan_steps=(2,), opt=opt)
    logger = CaptureLogger()
    cb = GradGuardCallback(clip=gg.FixedClip(1.0), flush_every=2)
    _trainer([cb], max_steps=4, logger=logger).fit(model, _classif_loader())
    s = model.snap
    for a, b in zip(s[1]["params"], s[2]["params"]):  # step 2 was skipped: nothing moved
        assert torch.equal(a, b)
    for k in s[1]["opt"]:
        for name, v in s[1]["opt"][k].items():
            w = s[2]["opt"][k][name]
            assert torch.equal(v, w) if torch.is_tensor(v) else v == w
    assert not all(torch.equal(a, b) for a, b in zip(s[2]["params"], s[3]["params"]))
    assert all(math.isfinite(float(p.detach().sum())) for p in model.parameters())
    assert [v for _, v in logger.metrics["gradguard/skipped"]] == [0.0, 0.0, 1.0, 0.0]
    assert cb.guard.history.skipped == [False, False, True, False]


class ReadsItsGradients(NaNAt):
    """A module whose own on_before_optimizer_step reads every gradient (after the callbacks)."""

    def __init__(self, nan_steps: tuple[int, ...], opt: str = "sgd") -> None:
        super().__init__(nan_steps=nan_steps, opt=opt)
        self.read: list[bool] = []

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        self.read.append(all(p.grad is not None for p in self.parameters()))


class PlantAfterUnscale(L.Callback):
    """Listed before the GradGuardCallback: a NaN after the GradScaler has unscaled (so the
    scaler itself finds nothing and calls optimizer.step(), which the Guard must cancel)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        if trainer.global_step == self.step:
            pl_module.net[0].weight.grad[0, 0] = float("nan")


@pytest.mark.parametrize("precision", ["32", "16-mixed"])
def test_the_modules_own_hook_reads_the_gradients_of_a_cancelled_step(precision: str) -> None:
    from lightning.pytorch.plugins.precision import MixedPrecision

    cb = GradGuardCallback(flush_every=2)
    kw: dict[str, Any] = {}
    if precision == "16-mixed":
        model = ReadsItsGradients(nan_steps=())
        callbacks = [PlantAfterUnscale(step=2), cb]
        kw["plugins"] = [MixedPrecision("16-mixed", "cpu")]
    else:
        model = ReadsItsGradients(nan_steps=(2,))
        callbacks = [cb]
    _trainer(callbacks, max_steps=4, **kw).fit(model, _classif_loader())
    assert model.read == [True] * 4  # the cancelled step's gradients were readable there
    assert cb.guard.history.skipped == [False, False, True, False]
    s = model.snap
    assert all(torch.equal(a, b) for a, b in zip(s[1]["params"], s[2]["params"]))  # cancelled
    assert not all(torch.equal(a, b) for a, b in zip(s[2]["params"], s[3]["params"]))
    for k in s[1]["opt"]:
        for name, v in s[1]["opt"][k].items():
            w = s[2]["opt"][k][name]
            assert torch.equal(v, w) if torch.is_tensor(v) else v == w
    assert all(math.isfinite(float(p.detach().sum())) for p in model.parameters())


# --- AMP and accumulation ------------------------------------------------------------------------
def _fp32_first_norm() -> float:
    model = ClassifModel()
    x, y = next(iter(_classif_loader()))
    torch.nn.functional.cross_entropy(model(x), y).backward()
    return float(gg.grad_stats(model.parameters()).global_norm)


@pytest.mark.parametrize("opt", ["sgd", "fused_adam"])
def test_16_mixed_measures_unscaled_gradients(opt: str) -> None:
    from lightning.pytorch.plugins.precision import MixedPrecision

    model = ClassifModel(opt=opt, lr=1e-3)
    cb = GradGuardCallback(clip=gg.FixedClip(1e6))
    # precision="16-mixed" alone falls back to bf16 on CPU; the plugin keeps fp16 + GradScaler
    trainer = _trainer([cb], plugins=[MixedPrecision("16-mixed", "cpu")], max_steps=2)
    trainer.fit(model, _classif_loader())
    assert trainer.precision_plugin.scaler.get_scale() == 65536.0
    # scaled gradients would be 65536x larger; fp16 autocast moves the norm by well under 1%
    assert cb.guard.history.global_norm[0] == pytest.approx(_fp32_first_norm(), rel=0.01)
    assert cb.guard.history.skipped == [False, False]
    assert 0.5 < cb.guard.history.loss[0] < 3.0  # the loss is unscaled too


def test_bf16_mixed_and_accumulation_loss_is_the_window_mean() -> None:
    model = ClassifModel()
    cb = GradGuardCallback(clip=gg.FixedClip(10.0))
    _trainer([cb], precision="bf16-mixed", max_steps=2, accumulate_grad_batches=2).fit(
        model, _classif_loader())
    hist = cb.guard.history
    assert len(hist) == 2  # two optimizer steps from four micro-batches
    assert all(math.isfinite(v) and 0.5 < v < 3.0 for v in hist.loss)


# --- checkpoint / resume -------------------------------------------------------------------------
def _fit_epochs(tmp: Path, epochs: int, ckpt: str | None = None) -> tuple[GradGuardCallback, ClassifModel, L.Trainer]:
    model = ClassifModel(opt="adam", lr=0.05)
    cb = GradGuardCallback(clip=gg.ZClip(warmup=2), flush_every=100)
    trainer = _trainer([cb], max_steps=-1, max_epochs=epochs, default_root_dir=str(tmp))
    trainer.fit(model, _classif_loader(n=48), ckpt_path=ckpt)
    return cb, model, trainer


def _assert_state_equal(a: Any, b: Any) -> None:
    if torch.is_tensor(a):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_state_equal(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_state_equal(x, y)
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b)
    else:
        assert a == b


def test_checkpoint_resume_restores_guard_state(tmp_path: Path) -> None:
    straight_cb, straight_model, _ = _fit_epochs(tmp_path / "a", epochs=2)
    first_cb, _, trainer = _fit_epochs(tmp_path / "b", epochs=1)
    ckpt = tmp_path / "one_epoch.ckpt"
    trainer.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=True)["callbacks"]["GradGuardCallback"]
    _assert_state_equal(saved["guard"], first_cb.guard.state_dict())
    resumed_cb, resumed_model, _ = _fit_epochs(tmp_path / "c", epochs=2, ckpt=str(ckpt))
    # the resumed run continues exactly where the first stopped: same state as a straight run
    _assert_state_equal(resumed_cb.guard.state_dict(), straight_cb.guard.state_dict())
    for a, b in zip(resumed_model.parameters(), straight_model.parameters()):
        assert torch.equal(a, b)


def test_state_loaded_before_guard_exists_is_applied_at_fit_start() -> None:
    cb = GradGuardCallback(clip=gg.ZClip(warmup=1))
    _trainer([cb], max_steps=3).fit(ClassifModel(), _classif_loader())
    state = cb.state_dict()
    cb2 = GradGuardCallback(clip=gg.ZClip(warmup=1))
    cb2.load_state_dict(state)
    assert cb2.state_dict() == state  # held until the guard exists
    cb2.on_fit_start(_trainer([]), ClassifModel())
    _assert_state_equal(cb2.guard.state_dict(), cb.guard.state_dict())


def test_logging_charts_and_arguments() -> None:
    logger = CaptureLogger()
    cb = GradGuardCallback(clip=gg.FixedClip(0.5), log_per_layer=False, flush_every=3)
    _trainer([cb], max_steps=4, logger=logger).fit(ClassifModel(), _classif_loader())
    keys = set(logger.metrics)
    assert {"gradguard/global_norm", "gradguard/clipped", "gradguard/skipped",
            "gradguard/threshold", "gradguard/loss"} <= keys
    assert not any("grad_norm/" in k for k in keys)  # few charts unless asked
    assert [s for s, _ in logger.metrics["gradguard/global_norm"]] == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="log_per_layer"):
        GradGuardCallback(log_per_layer="all")


def test_importing_gradguard_imports_no_framework() -> None:
    code = ("import sys, gradguard, gradguard.integrations, gradguard.distributed; "
            "bad = [m for m in ('lightning', 'pytorch_lightning', 'transformers') if m in sys.modules]; "
            "assert not bad, bad")
    src = str(Path(__file__).resolve().parents[1] / "src")
    subprocess.run([sys.executable, "-c", code], check=True, env={"PYTHONPATH": src, "PATH": ""})
