"""gradguard in a Lightning Trainer: one callback, no change to the LightningModule.

    python examples/lightning_callback.py --quick

``GradGuardCallback`` measures the unscaled, accumulated gradients in ``on_before_optimizer_step``,
clips them through its policy, cancels steps whose gradients are NaN/Inf, writes
``gradguard/*`` charts to the Trainer's loggers (here a CSVLogger) and saves its state in the
checkpoint. Keep ``gradient_clip_val`` unset: the callback clips (it raises if both would).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
from torch import nn

import gradguard as gg


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a few seconds on a CPU")
    ap.add_argument("--out", default="runs/lightning")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)

    import lightning.pytorch as L
    from lightning.pytorch.loggers import CSVLogger

    from gradguard.integrations.lightning import GradGuardCallback

    class Regressor(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 1))

        def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
            x, y = batch
            loss = nn.functional.mse_loss(self.net(x), y)
            if self.global_step == 5:  # a poisoned batch: NaN loss, NaN gradients
                loss = loss * float("nan")
            return loss

        def configure_optimizers(self):  # type: ignore[no-untyped-def]
            return torch.optim.Adam(self.parameters(), lr=1e-2)

    torch.manual_seed(0)
    x = torch.randn(256, 16)
    ds = torch.utils.data.TensorDataset(x, x[:, :1].sin())
    loader = torch.utils.data.DataLoader(ds, batch_size=32)

    out = Path(args.out)
    callback = GradGuardCallback(clip=gg.ZClip(warmup=5), log_per_layer="auto", flush_every=10,
                                 sinks=[gg.JSONLSink(out / "run.jsonl")])
    trainer = L.Trainer(
        accelerator="cpu", max_steps=20 if args.quick else 500, callbacks=[callback],
        logger=CSVLogger(out, name="csv"), accumulate_grad_batches=2, precision="bf16-mixed",
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=out,
    )
    trainer.fit(Regressor(), loader)

    h = callback.guard.history
    print(f"{len(h)} optimizer steps: {sum(h.clipped)} clipped, skipped at steps "
          f"{[s for s, k in zip(h.step, h.skipped) if k]}; last loss {h.loss[-1]:.4f}")
    print(f"charts in {trainer.logger.log_dir}/metrics.csv; history in {out / 'run.jsonl'}")
    ckpt = Path(trainer.checkpoint_callback.best_model_path or "")
    if ckpt.is_file():
        state = torch.load(ckpt, weights_only=True)["callbacks"]["GradGuardCallback"]
        print(f"checkpoint {ckpt.name} holds the guard's state at step {state['guard']['step']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
