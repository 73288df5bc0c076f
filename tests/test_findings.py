"""Finding / Report: JSON round trip, terminal rendering, self-contained HTML."""

from __future__ import annotations

import base64
import json
import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradguard as gg
from gradguard.findings import Finding, HistorySummary, Report, Severity, Trial

from tests.gallery import digit_batches, mlp

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def report() -> Report:
    torch.manual_seed(0)
    model = mlp(6, 32, nn.Sigmoid, "old")
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return gg.diagnose(model, F.cross_entropy, digit_batches(16), opt, steps=16, try_remedies=True,
                       max_trials=3)


def test_json_round_trip_is_exact(report: Report) -> None:
    s = report.to_json()
    back = Report.from_json(s)
    assert back.to_dict() == report.to_dict()
    assert back.findings[0].severity is Severity.ERROR
    assert isinstance(back.trials[0], Trial)
    assert back.codes == report.codes
    json.loads(s)  # strict JSON: no bare NaN/Infinity tokens
    assert "NaN" not in s and "Infinity" not in s


def test_nonfinite_evidence_survives_json() -> None:
    f = Finding("nonfinite_gradients", "error", ["a"], ["numerical_overflow"],
                ["gradient_clipping"], {"growth_before": math.inf, "x": math.nan, "v": [1.0, -math.inf]})
    r = Report([f], HistorySummary(["a"], [0], [math.nan], [math.inf], [[math.nan]], [math.nan]))
    back = Report.from_json(r.to_json())
    ev = back.findings[0].evidence
    assert ev["growth_before"] == math.inf and math.isnan(ev["x"]) and ev["v"][1] == -math.inf
    assert math.isinf(back.history.global_norm[0])


def test_to_json_writes_a_file(report: Report, tmp_path) -> None:  # type: ignore[no-untyped-def]
    p = tmp_path / "r.json"
    report.to_json(p)
    assert Report.from_json(p.read_text(encoding="utf-8")).codes == report.codes


@pytest.mark.parametrize("bad, match", [
    ("not json", "not valid JSON"),
    ("[1, 2]", "JSON object"),
    ('{"format": "other"}', "not a gradguard report"),
])
def test_from_json_errors(bad: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Report.from_json(bad)
    with pytest.raises(TypeError):
        Report.from_json(3)  # type: ignore[arg-type]


def test_render_en_and_ko(report: Report) -> None:
    en = report.render("en")
    ko = report.render(lang="ko")
    assert "Vanishing gradients" in en and "Remedies tried on a copy" in en
    assert "기울기 소실" in ko and "복사본에 시도해 본 처방" in ko
    assert "?" not in re.sub(r"\(.*?\)", "", en.split("Remedies tried")[0])  # all evidence filled
    with pytest.raises(ValueError, match="`lang` must be one of 'en', 'ko'"):
        report.render("de")


def test_healthy_report_renders() -> None:
    r = Report([], metadata={"mode": "examine", "steps": 3, "model": "Net", "parameters": 10})
    assert "No problems found" in r.render()
    assert "문제를 찾지 못했습니다" in r.render("ko")
    assert r.healthy and r.finding("vanishing_gradients") is None


@pytest.mark.parametrize("lang", ["en", "ko"])
def test_html_is_self_contained(report: Report, tmp_path, lang: str) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / f"report_{lang}.html"
    text = report.to_html(path, lang=lang)
    assert path.read_text(encoding="utf-8") == text
    imgs = re.findall(r"<img [^>]*>", text)
    assert len(imgs) == 3  # per-layer chart, heatmap, loss curve
    for tag in imgs:
        src = re.search(r'src="([^"]+)"', tag).group(1)  # type: ignore[union-attr]
        assert src.startswith("data:image/png;base64,")
        png = base64.b64decode(src.split(",", 1)[1])
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 2000
    # nothing loads from elsewhere
    assert not re.search(r'(src|href)="(?!data:)[^"#]', text)
    assert "<script" not in text and "@import" not in text and "url(" not in text
    assert f'lang="{lang}"' in text
    assert ("Vanishing gradients" if lang == "en" else "기울기 소실") in text


def test_html_without_history() -> None:
    text = Report([]).to_html()
    assert "<img" not in text and "No per-step history" in text


def test_finding_helpers() -> None:
    f = Finding("dead_units", "warning", ["r1"], ["dying_relu"], ["leaky_relu"],
                {"worst": 0.9, "mean": 0.7, "n_layers": 1, "died_in_training": False})
    assert f.title() == "Dead ReLU units" and "90%" in f.explain()
    assert "90%" in f.explain("ko") and "죽은" in f.title("ko")
    assert Finding.from_dict(f.to_dict()) == f
    with pytest.raises(ValueError):
        Finding("x", "fatal")  # type: ignore[arg-type]


def test_findings_never_import_rendering() -> None:
    """Findings are data; rendering (messages, report) depends on them, never the reverse."""
    import ast
    from pathlib import Path

    import gradguard.findings as fmod

    tree = ast.parse(Path(fmod.__file__).read_text(encoding="utf-8"))
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert not {m for m in imported if m.startswith(("gradguard.messages", "gradguard.report"))}
    assert not any(m == "gradguard" for m in imported)
    with pytest.raises(ValueError, match="kind"):
        fmod.set_renderer("pdf", str)
