"""`gradguard doctor`, `report` and `demo` through argv."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch

from gradguard.cli import main
from gradguard.findings import Report
from gradguard.history import History

torch.set_num_threads(1)

FACTORY = textwrap.dedent('''
    import math, torch
    from torch import nn
    import torch.nn.functional as F

    def _net(act):
        torch.manual_seed(0)
        layers, n = [], 16
        for _ in range(8):
            lin = nn.Linear(n, 32)
            nn.init.uniform_(lin.weight, -1 / math.sqrt(n), 1 / math.sqrt(n))
            layers += [lin, act()]
            n = 32
        return nn.Sequential(*layers, nn.Linear(32, 4))

    def _data():
        g = torch.Generator().manual_seed(0)
        return [(torch.randn(32, 16, generator=g), torch.randint(0, 4, (32,), generator=g))
                for _ in range(12)]

    def sick():
        net = _net(nn.Sigmoid)
        return net, F.cross_entropy, _data(), torch.optim.SGD(net.parameters(), lr=0.1)

    def sick_dict():
        net = _net(nn.Sigmoid)
        return {"model": net, "loss_fn": F.cross_entropy, "data": _data()[0], "steps": 12}

    def healthy():
        torch.manual_seed(1)
        net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
        return net, F.cross_entropy, _data()

    def wrong_shape():
        return (1, 2)

    def bad_loss():
        net = _net(nn.ReLU)
        return net, lambda o, t: F.cross_entropy(o, t, reduction="none"), _data()

    not_callable = 3
''')


@pytest.fixture()
def factory(tmp_path: Path) -> Path:
    p = tmp_path / "setups.py"
    p.write_text(FACTORY, encoding="utf-8")
    return p


def test_doctor_file_factory_with_remedies_json_html(factory: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    js, html = tmp_path / "r.json", tmp_path / "r.html"
    rc = main(["doctor", f"{factory}:sick", "--steps", "12", "--try-remedies", "--json", str(js),
               "--html", str(html)])
    out = capsys.readouterr().out
    assert rc == 1  # an error-level finding
    assert "Vanishing gradients" in out and "Remedies tried on a copy" in out
    report = Report.from_json(js.read_text(encoding="utf-8"))
    assert report.codes[0] == "vanishing_gradients" and report.trials
    assert html.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")


def test_doctor_dict_factory_in_korean(factory: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["doctor", f"{factory}:sick_dict", "--lang", "ko"])
    out = capsys.readouterr().out
    assert rc == 1 and "기울기 소실" in out


def test_doctor_module_factory_healthy(factory: Path, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.syspath_prepend(str(factory.parent))
    rc = main(["doctor", "setups:healthy"])
    assert rc == 0
    assert "No problems found" in capsys.readouterr().out


@pytest.mark.parametrize("target, message", [
    ("no_colon", "FILE_OR_MODULE:FACTORY"),
    ("missing.py:make", "does not exist"),
    ("{f}:nope", "has no 'nope'"),
    ("{f}:not_callable", "not a function"),
    ("{f}:wrong_shape", "return (model, loss_fn, data)"),
    ("{f}:bad_loss", "scalar"),
    ("no_such_module_xyz:make", "cannot import module"),
])
def test_doctor_usage_errors(factory: Path, target: str, message: str,
                             capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["doctor", target.format(f=factory)])
    err = capsys.readouterr().err
    assert rc == 2 and message in err


def test_report_from_jsonl(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    h = History(["a.weight", "b.weight", "c.weight"])
    for s in range(20):
        g = 1.5 ** s
        h.step.append(s)
        h.loss.append(2.0 + s)
        h.global_norm.append(g * 3 ** 0.5)
        h.threshold.append(float("inf"))
        h.clipped.append(False)
        h.skipped.append(False)
        h.lr_scale.append(1.0)
        h.lr.append(1e-3)
        h.layer_norm.append([g, g, g])
        h.update_ratio.append([float("nan")] * 3)
    path = tmp_path / "run.jsonl"
    h.to_jsonl(path)
    out_json = tmp_path / "r.json"
    rc = main(["report", str(path), "--json", str(out_json), "--html", str(tmp_path / "r.html"),
               "--lang", "ko"])
    out = capsys.readouterr().out
    assert rc == 1 and "기울기 폭주" in out
    data = json.loads(out_json.read_text(encoding="utf-8"))
    codes = [f["code"] for f in data["findings"]]
    assert "exploding_gradients" in codes and "incident" in codes  # the loss rose 2 -> 21
    assert (tmp_path / "r.html").exists()


def test_report_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", str(tmp_path / "nope.jsonl")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_demo_quick(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["demo", "--quick", "-o", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0
    assert "Vanishing gradients" in out and "Test accuracy" in out
    report = Report.from_json((tmp_path / "report.json").read_text(encoding="utf-8"))
    assert report.codes[0] == "vanishing_gradients"
    assert report.metadata["demo_test_accuracy"] > report.metadata["demo_baseline_test_accuracy"] + 0.3
    assert (tmp_path / "report.html").read_text(encoding="utf-8").count("data:image/png") == 3


def test_subcommands_are_listed(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for name in ("doctor", "report", "demo"):
        assert name in out


def test_factory_dict_with_step_fn_scheduler_and_clip(tmp_path) -> None:
    """A factory can hand over the whole recipe: step_fn, scheduler and clip."""
    import json

    src = tmp_path / "recipe.py"
    src.write_text(
        "import torch\n"
        "from torch import nn\n"
        "import torch.nn.functional as F\n"
        "class Net(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.lin = nn.Linear(8, 3)\n"
        "    def forward(self, x, y):\n"
        "        out = self.lin(x)\n"
        "        return out, F.cross_entropy(out, y)\n"
        "def make():\n"
        "    torch.manual_seed(0)\n"
        "    net = Net()\n"
        "    opt = torch.optim.SGD(net.parameters(), lr=0.1)\n"
        "    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 4))\n"
        "    data = [(torch.randn(16, 8), torch.randint(0, 3, (16,))) for _ in range(10)]\n"
        "    return dict(model=net, data=data, optimizer=opt, scheduler=sched, clip=1.0,\n"
        "                step_fn=lambda m, b: m(*b), steps=10)\n"
    )
    rc = main(["doctor", f"{src}:make", "--json", str(tmp_path / "r.json"),
               "--max-seconds", "30"])
    assert rc in (0, 1)

    md = json.loads((tmp_path / "r.json").read_text())["metadata"]
    assert md["scheduler"] == "LambdaLR" and md["clip"] == 1.0
    assert json.loads((tmp_path / "r.json").read_text())["history"]["layers"] == ["lin"]
