"""Every script in examples/ runs with --quick and does what its docstring says.

Single-process examples run in this process (runpy: the heavy imports are paid once per test
worker); ddp.py spawns its own workers, so it runs as a subprocess.
"""

from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def _run(name: str, args: list[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [name, "--quick", *args])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(str(EXAMPLES / name), run_name="__main__")
    assert e.value.code == 0


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_every_example_is_tested() -> None:
    tested = {"plain_loop.py", "amp.py", "accumulation.py", "lightning_callback.py",
              "hf_trainer.py", "ddp.py", "char_rnn.py"}
    assert {p.name for p in EXAMPLES.glob("*.py")} == tested


def test_plain_loop(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _run("plain_loop.py", ["--out", "out"], monkeypatch, tmp_path)
    rows = _jsonl(tmp_path / "out" / "run.jsonl")
    assert len(rows) == 60 and sum(r["skipped"] for r in rows) == 1
    assert "1 skipped (step 30)" in capsys.readouterr().out


def test_amp(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _run("amp.py", [], monkeypatch, tmp_path)
    out = capsys.readouterr().out
    assert "bf16 autocast" in out and "fp16 autocast + GradScaler" in out and "loss scale" in out


def test_accumulation(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _run("accumulation.py", [], monkeypatch, tmp_path)
    assert "global norms match one big batch" in capsys.readouterr().out


def test_lightning_callback(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("lightning")
    _run("lightning_callback.py", ["--out", "out"], monkeypatch, tmp_path)
    out = capsys.readouterr().out
    assert "skipped at steps [5]" in out and "holds the guard's state at step 20" in out
    metrics = next((tmp_path / "out" / "csv").rglob("metrics.csv")).read_text()
    assert "gradguard/global_norm" in metrics and "gradguard/grad_norm/net.0.weight" in metrics


def test_hf_trainer(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("transformers")
    _run("hf_trainer.py", ["--out", "out"], monkeypatch, tmp_path)
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "Trainer grad_norm" in ln]
    assert len(lines) == 4
    for ln in lines:  # the two numbers printed side by side are equal
        words = ln.split()
        assert words[words.index("grad_norm") + 1] == words[words.index("gradguard/grad_norm") + 1]
    assert (tmp_path / "out" / "checkpoint-12" / "gradguard.pt").exists()


def test_char_rnn_explodes_without_and_trains_with_a_guard(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _run("char_rnn.py", ["--out", "out"], monkeypatch, tmp_path)
    out = capsys.readouterr().out
    assert "without protection: the loss became non-finite" in out
    assert "gradguard report" in out
    rows = _jsonl(tmp_path / "out" / "guarded.jsonl")
    assert len(rows) == 200
    losses = [r["loss"] for r in rows]
    assert all(isinstance(v, float) for v in losses)  # finite: non-finite would be strings
    assert sum(losses[-20:]) / 20 < 3.0  # learned something (uniform guessing is ~4.5)
    from gradguard.history import History

    hist = History.from_jsonl(tmp_path / "out" / "guarded.jsonl")  # what `gradguard report` reads
    assert len(hist) == 200 and "rnn.weight_hh_l0" in hist.names


def test_ddp(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "ddp.py"), "--quick", "--out", str(tmp_path / "out")],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "skipped at steps [10]" in proc.stdout
    assert "identical on every rank: True" in proc.stdout
    assert len(_jsonl(tmp_path / "out" / "run.jsonl")) == 20
