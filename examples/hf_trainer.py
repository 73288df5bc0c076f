"""gradguard in a Hugging Face Trainer: a tiny GPT-2, built from a config, learns text bytes.

    python examples/hf_trainer.py --quick

Set ``max_grad_norm=0`` and let the callback clip: the Trainer clips *before*
``on_pre_optimizer_step``, so with its default of 1.0 the gradients would be clipped twice (the
callback refuses). The Trainer still logs its own pre-clip ``grad_norm``; the callback's
``gradguard/grad_norm`` next to it is the same number, plus what gradguard adds:
``gradguard/clipped``, ``/skipped``, ``/threshold`` and, here, per-module norms. A skipped step
leaves the LR schedule where it was. ``gradguard.pt`` goes into every checkpoint folder.
"""

from __future__ import annotations

import argparse
import logging
import sysconfig
from pathlib import Path

import torch

import gradguard as gg


def byte_blocks(n_blocks: int, block: int) -> list[dict[str, torch.Tensor]]:
    """Bytes of the Python standard library's sources, in fixed-length blocks."""
    src = Path(sysconfig.get_paths()["stdlib"]) / "argparse.py"
    data = torch.tensor(list(src.read_bytes()[: n_blocks * block]), dtype=torch.long)
    return [{"input_ids": b, "labels": b} for b in data.view(-1, block)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a few seconds on a CPU")
    ap.add_argument("--out", default="runs/hf_trainer")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    import transformers
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    from gradguard.integrations.transformers import GradGuardCallback

    transformers.logging.set_verbosity_error()
    logging.getLogger("gradguard").setLevel(logging.WARNING)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=64, vocab_size=256,
                                       n_positions=64, loss_type="ForCausalLM"))
    callback = GradGuardCallback(clip=gg.ZClip(warmup=5), log_per_layer="auto")
    steps = 12 if args.quick else 600
    targs = TrainingArguments(
        output_dir=args.out, max_steps=steps, per_device_train_batch_size=8,
        gradient_accumulation_steps=2, learning_rate=3e-3, max_grad_norm=0.0,
        logging_steps=max(1, steps // 4), save_steps=steps, report_to=[], use_cpu=True,
        disable_tqdm=True, seed=0,
    )
    trainer = Trainer(model=model, args=targs, train_dataset=byte_blocks(512, 64),
                      callbacks=[callback])
    trainer.train()

    for row in trainer.state.log_history:
        if "grad_norm" in row:
            print(f"step {row['step']:>4}: loss {row['loss']:.3f}  Trainer grad_norm "
                  f"{row['grad_norm']:.4f}  gradguard/grad_norm {row['gradguard/grad_norm']:.4f}  "
                  f"clipped {row['gradguard/clipped']:.0f}  skipped {row['gradguard/skipped']:.0f}")
    print(f"guard state saved to {Path(args.out) / f'checkpoint-{steps}' / 'gradguard.pt'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
