"""The exit-status contract of every command (docs/cli.md): 0 fine, 1 an error finding, 2 bad
usage or input, including any unexpected exception (one line; --debug shows the traceback)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from gradguard.cli import main
from gradguard.history import History

torch.set_num_threads(1)

FACTORIES = textwrap.dedent('''
    import pathlib, torch
    from torch import nn
    import torch.nn.functional as F

    MARK = pathlib.Path(__file__).with_name("factory_ran")

    def healthy():
        MARK.write_text("ran")
        torch.manual_seed(1)
        net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        g = torch.Generator().manual_seed(0)
        return net, F.cross_entropy, (torch.randn(16, 4, generator=g), torch.randint(0, 2, (16,), generator=g))

    class Broken(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 2)

        def forward(self, x):
            raise RuntimeError("the user's forward is broken\\nsecond line")

    def broken():
        return Broken(), F.cross_entropy, (torch.randn(4, 4), torch.zeros(4, dtype=torch.long))
''')


@pytest.fixture()
def factories(tmp_path: Path) -> Path:
    p = tmp_path / "setups.py"
    p.write_text(FACTORIES, encoding="utf-8")
    return p


def _history_file(path: Path, steps: int = 20) -> Path:
    h = History(["a.weight", "b.weight"])
    for s in range(steps):
        h.step.append(s)
        h.loss.append(1.0 / (s + 1))
        h.global_norm.append(1.0)
        h.threshold.append(float("inf"))
        h.clipped.append(False)
        h.skipped.append(False)
        h.lr_scale.append(1.0)
        h.lr.append(0.1)
        h.layer_norm.append([0.7, 0.7])
        h.update_ratio.append([float("nan")] * 2)
    h.to_jsonl(path)
    return path


def test_bare_command_prints_help_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    out = capsys.readouterr().out
    assert "usage: gradguard" in out and "doctor" in out and "exit status" in out


def test_bad_option_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["doctor", "--no-such-flag"])
    assert e.value.code == 2


def test_python_dash_m_gradguard(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    r = subprocess.run([sys.executable, "-m", "gradguard", "report", str(tmp_path)],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2 and "is a directory" in r.stderr
    r = subprocess.run([sys.executable, "-m", "gradguard"], capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode == 2 and "usage: gradguard" in r.stdout


@pytest.mark.parametrize("content, message", [
    (None, "is a directory"),
    ("", "Too few steps to judge"),
    ("\n\n", "Too few steps to judge"),
    ("this is not json\n", "run.jsonl:1: not JSON"),
    ('{"no_step": 1}\n', "run.jsonl:1: not a gradguard history record"),
    (b"\xff\xfe\x00garbage", "is not a gradguard history"),
])
def test_report_bad_input_exits_2(tmp_path: Path, content: str | bytes | None, message: str,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "run.jsonl"
    if content is None:
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    assert main(["report", str(path)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_report_healthy_exits_0(tmp_path: Path) -> None:
    assert main(["report", str(_history_file(tmp_path / "run.jsonl"))]) == 0


@pytest.mark.parametrize("flag, where, message", [
    ("--html", "missing_dir/r.html", "does not exist; create it first"),
    ("--json", "missing_dir/r.json", "does not exist; create it first"),
    ("--html", ".", "is a directory"),
])
def test_unwritable_output_is_refused_before_the_diagnosis(
        factories: Path, flag: str, where: str, message: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    target = factories.parent / where
    rc = main(["doctor", f"{factories}:healthy", flag, str(target)])
    assert rc == 2 and message in capsys.readouterr().err
    assert not (factories.parent / "factory_ran").exists(), "the diagnosis ran before the check"


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_folder_that_refuses_new_files_is_refused(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    # /proc refuses new files even to root (a chmod'ed folder would not stop root)
    rc = main(["report", str(_history_file(tmp_path / "run.jsonl")), "--json", "/proc/r.json"])
    assert rc == 2 and "--json: cannot write '/proc/r.json'" in capsys.readouterr().err


def test_output_check_leaves_no_file_behind(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    assert main(["report", str(tmp_path / "none.jsonl"), "--json", str(out)]) == 2
    assert not out.exists()


def test_lab_out_that_is_a_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    assert main(["lab", "sigmoid_derivative", "--quick", "-o", str(f)]) == 2
    assert "is not a directory" in capsys.readouterr().err


def test_user_file_that_raises_on_import_exits_2(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("import torch\n1 / 0\n", encoding="utf-8")
    assert main(["doctor", f"{bad}:make"]) == 2
    err = capsys.readouterr().err
    assert "importing" in err and "ZeroDivisionError" in err and "Traceback" not in err


def test_unexpected_exception_is_one_line_and_exit_2(factories: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["doctor", f"{factories}:broken"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    assert "RuntimeError: the user's forward is broken" in err and "--debug" in err
    # --debug, before or after the command: the traceback, and still 2
    for argv in (["--debug", "doctor", f"{factories}:broken"],
                 ["doctor", f"{factories}:broken", "--debug"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "Traceback (most recent call last)" in err and "the user's forward is broken" in err


def test_error_finding_exits_1_and_lab_unknown_name_exits_2(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    h = _history_file(tmp_path / "run.jsonl")
    rows = h.read_text(encoding="utf-8").splitlines()
    # a run whose gradients turn non-finite: an error-level finding
    bad = [r.replace('"global_norm": 1.0', '"global_norm": "nan"') for r in rows]
    bad = [r.replace('"a.weight": 0.7', '"a.weight": "nan"') for r in bad]
    (tmp_path / "bad.jsonl").write_text("\n".join(bad) + "\n", encoding="utf-8")
    assert main(["report", str(tmp_path / "bad.jsonl")]) == 1
    assert main(["lab", "no_such_experiment"]) == 2


@pytest.mark.parametrize("missing", ["rich", "matplotlib"])
def test_core_only_install_names_the_extra_in_one_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, missing: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    path = _history_file(tmp_path / "run.jsonl")
    monkeypatch.setitem(sys.modules, missing, None)  # `import rich` now fails as if not installed
    for name in [m for m in sys.modules if m.startswith(missing + ".")]:
        monkeypatch.setitem(sys.modules, name, None)
    argv = ["report", str(path), "--html", str(tmp_path / "r.html")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: ") and missing in err
    assert err.endswith('pip install "gradguard[report]"')


LONG_NAMES = textwrap.dedent('''
    import math, torch
    from torch import nn
    import torch.nn.functional as F

    class Block(nn.Module):
        def __init__(self, n):
            super().__init__()
            self.a_rather_long_projection_layer_name = nn.Linear(n, n)
            self.act = nn.Sigmoid()

        def forward(self, x):
            return self.act(self.a_rather_long_projection_layer_name(x))

    def make():
        torch.manual_seed(0)
        net = nn.Sequential(*[Block(16) for _ in range(8)], nn.Linear(16, 4))
        for m in net.modules():
            if isinstance(m, nn.Linear):
                nn.init.uniform_(m.weight, -1 / math.sqrt(16), 1 / math.sqrt(16))
        g = torch.Generator().manual_seed(0)
        data = [(torch.randn(32, 16, generator=g), torch.randint(0, 4, (32,), generator=g))
                for _ in range(8)]
        return net, F.cross_entropy, data, torch.optim.SGD(net.parameters(), lr=0.1)
''')

_FRAME = set("│─╭╮╰╯┃━┏┓┗┛┡┩└┘├┤┬┴┼╇╈╋┳┻ \n")


@pytest.mark.parametrize("lang", ["en", "ko"])
def test_nothing_is_cut_at_80_or_120_columns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str], lang: str) -> None:
    """Tables fold a long word (a finding code, a layer name, Korean text) instead of ending it
    with an ellipsis; code snippets wrap instead of being cropped."""
    from gradguard import messages as M
    from gradguard.findings import Report

    (tmp_path / "longnames.py").write_text(LONG_NAMES, encoding="utf-8")
    js = tmp_path / "r.json"
    for width in (80, 120):
        monkeypatch.setenv("COLUMNS", str(width))
        rc = main(["doctor", f"{tmp_path / 'longnames.py'}:make", "--steps", "8", "--try-remedies",
                   "--lang", lang, "--json", str(js)])
        out = capsys.readouterr().out
        assert rc == 1
        assert max(len(line) for line in out.splitlines()) <= width
        report = Report.from_json(js.read_text(encoding="utf-8"))
        # an ellipsis only where the catalogue writes one ("… and 3 more")
        assert out.count("…") == sum(1 for f in report.findings if len(f.layers) > 8)
        # the panels (one column) read back whole once the frame and the line breaks are
        # removed: layer names and the code snippet are all there, nothing cropped
        flat = "".join(ch for ch in out if ch not in _FRAME)
        snippet = M.remedy_snippet(report.findings[0].remedies[0], lang)
        words = {*(n for f in report.findings for n in f.layers[:8]), *snippet.splitlines()}
        for word in words:
            assert "".join(ch for ch in word if ch not in _FRAME) in flat, (width, word)


@pytest.mark.parametrize("width", [80, 120])
def test_lab_list_is_not_cut(width: int, monkeypatch: pytest.MonkeyPatch,
                             capsys: pytest.CaptureFixture[str]) -> None:
    from gradguard import lab

    monkeypatch.setenv("COLUMNS", str(width))
    for lang in ("en", "ko"):
        assert main(["lab", "--list", "--lang", lang]) == 0
        out = capsys.readouterr().out
        assert "…" not in out and max(len(line) for line in out.splitlines()) <= width
        for info in lab.list_experiments():
            assert info.name in out  # names stay whole where the width allows


def test_stated_run_times_agree_with_the_measured_ones() -> None:
    """README, `--help` and the Makefile state the same measured times (README: the numbers and
    where they were measured)."""
    from gradguard.cli import demo

    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text(encoding="utf-8")
    makefile = (root / "Makefile").read_text(encoding="utf-8")
    lab_time = re.search(r"\*\*(\d+ min \d+ s)\*\*", readme)
    assert lab_time and f"measured {lab_time.group(1)}" in makefile
    demo_time = re.search(r"`gradguard demo` \(after the set-up\) in about (\d+) s", readme)
    assert demo_time and f"about {demo_time.group(1)} s" in demo.HELP
