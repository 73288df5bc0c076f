"""The HTML pages a person opens, rendered in headless Chromium: every image loads, nothing is blank."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from gradguard.cli import main
from tests.browser import image_load_counts, is_blank, screenshot


def test_demo_report_renders_in_chromium(tmp_path: Path) -> None:
    assert main(["demo", "--quick", "-o", str(tmp_path)]) == 0
    html = tmp_path / "report.html"
    text = html.read_text(encoding="utf-8")
    assert "http://" not in text and "https://" not in text.replace("https://doi.org", "")
    loaded, total = image_load_counts(html, tmp_path)
    assert total >= 3 and loaded == total        # per-layer chart, heatmap, loss curve
    assert not is_blank(screenshot(html, tmp_path / "demo.png"))


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer, guard: Any, x: torch.Tensor,
           y: torch.Tensor, steps: int = 30) -> None:
    """``steps`` guarded full-batch cross-entropy steps on ``(x, y)``."""
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        guard.step(opt, loss=loss)
        opt.zero_grad()


def test_guard_findings_live_on_a_vanishing_network() -> None:
    import gradguard as gg

    torch.manual_seed(0)
    layers: list[torch.nn.Module] = []
    for _ in range(10):
        lin = torch.nn.Linear(32, 32)
        torch.nn.init.uniform_(lin.weight, -32 ** -0.5, 32 ** -0.5)
        layers += [lin, torch.nn.Sigmoid()]
    model = torch.nn.Sequential(*layers, torch.nn.Linear(32, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    guard = gg.Guard(model, flush_every=10)
    _train(model, opt, guard, torch.randn(64, 32), torch.randint(0, 4, (64,)))
    codes = {f.code: f for f in guard.findings()}
    assert "vanishing_gradients" in codes
    assert codes["vanishing_gradients"].layers[0] == "0"   # the first layer, by module name


def test_guard_findings_quiet_on_a_healthy_network() -> None:
    import gradguard as gg

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64),
                                torch.nn.ReLU(), torch.nn.Linear(64, 3))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    guard = gg.Guard(model, clip=1.0, flush_every=10)
    _train(model, opt, guard, torch.randn(128, 16), torch.randint(0, 3, (128,)))
    assert guard.findings() == []


def test_lab_report_renders_in_chromium(tmp_path: Path) -> None:
    assert main(["lab", "sigmoid_derivative", "clipping_rnn", "--quick", "-o", str(tmp_path)]) == 0
    html = tmp_path / "report.html"
    loaded, total = image_load_counts(html, tmp_path)
    assert total >= 2 and loaded == total
    assert not is_blank(screenshot(html, tmp_path / "lab.png"))
