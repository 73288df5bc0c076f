"""The benchmark runs: each ``benchmarks/<script> --quick`` exits 0 (a crash check; bench_clip's
own assertions compare every result with torch's) and prints its sections."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _quick(script: str, timeout: int) -> str:
    """Run ``benchmarks/<script> --quick`` with this checkout's source first; its stdout."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), "--quick"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_bench_clip_quick_runs():
    out = _quick("bench_clip.py", 120)
    for name in ("gg.clip_grad_norm_", "gg.grad_stats", "gg.adaptive_clip_grad_", "torch clip_grad_norm_"):
        assert name in out
    assert "gpt2-tiny / float32" in out and "many-small / bfloat16" in out
    assert "results equal torch's (checked)" in out


def test_recovery_benchmark_quick_runs():
    out = _quick("recovery.py", 300)
    for name in ("stock clip", "zclip", "recovery", "tuned", "lr x100", "garbage", "nan loss", "lr creep"):
        assert name in out
    assert "undisturbed recovery: bit-identical to the plain torch loop: True; 0 rollbacks, 0 skips" in out


def test_doctor_real_quick_runs():
    """benchmarks/doctor_real.py --quick: a crash check of the realistic gallery (two twins)."""
    out = _quick("doctor_real.py", 300)
    for row in ("codes right", "layers right", "first remedy appropriate", "strict",
                "false alarms", "seconds per patient"):
        assert row in out
    assert "wine_unscaled" in out and "fp32_mse" in out
