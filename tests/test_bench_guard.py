"""The Guard benchmark runs end to end in --quick mode (a crash check, not a timing)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_guard_quick() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_guard.py"), "--quick"],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert "guard full" in out
    for line in ("Guard + ZClip", "Guard + AGC", "Guard + spike ladder", "targets (issue 13)",
                 "AGC Guard / FixedClip Guard", "History bytes per (row, tensor)"):
        assert line in out, line
