"""``gradguard lab`` through argv, and the HTML report: one self-contained page."""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest

import gradguard.lab as lab
from gradguard.cli import main
from gradguard.report.html import escape
from gradguard.report.lab import lab_html

Get = Callable[[str], lab.ExperimentResult]
_PNG = b"\x89PNG\r\n\x1a\n"


def assert_self_contained(html: str) -> None:
    """No external resource: no http(s) or protocol-relative src/href, no <link>/<script src>;
    every <img> carries a data URI that decodes as PNG."""
    assert not re.search(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", html, re.I)
    assert not re.search(r"<link\b", html, re.I)
    assert not re.search(r"<script\b[^>]*\bsrc\s*=", html, re.I)
    assert not re.search(r"url\(\s*['\"]?\s*(?:https?:)?//", html, re.I)
    imgs = re.findall(r"<img\b[^>]*>", html, re.I)
    assert imgs
    for tag in imgs:
        m = re.search(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', tag)
        assert m, tag[:120]
        assert base64.b64decode(m.group(1), validate=True).startswith(_PNG)


def test_list_shows_every_experiment(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["lab", "--list"]) == 0
    out = capsys.readouterr().out
    for info in lab.list_experiments():
        assert info.name in out
    assert main(["lab", "--list", "--lang", "ko"]) == 0
    assert "주장" in capsys.readouterr().out


def test_run_writes_report_and_results(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["lab", "sigmoid_derivative", "--quick", "-o", str(tmp_path), "--seeds", "1"]) == 0
    out = capsys.readouterr().out
    assert "sigmoid_derivative" in out and "report.html" in out
    html = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert_self_contained(html)
    assert 'id="sigmoid_derivative"' in html and "Glorot" in html
    doc = json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))
    assert doc["quick"] is True and doc["n_seeds"] == 1 and len(doc["results"]) == 1
    (result,) = lab.load_results(tmp_path / "results.json")
    assert result.name == "sigmoid_derivative" and result.config["n_seeds"] == 1
    assert result.to_dict() == doc["results"][0]
    assert result.verdict in lab.VERDICTS and result.verdict in html


def test_unknown_experiment_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["lab", "no_such_claim", "--quick", "-o", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no_such_claim" in err and "sigmoid_derivative" in err
    assert not (tmp_path / "report.html").exists()
    assert main(["lab", "batchnorm", "--seeds", "0", "-o", str(tmp_path)]) == 2


def test_report_page_in_both_languages(quick_result: Get) -> None:
    results = [quick_result("sigmoid_derivative"), quick_result("batchnorm")]
    en = lab_html(results, lang="en")
    assert_self_contained(en)
    for r in results:
        info = lab.get_experiment(r.name)
        assert f'id="{r.name}"' in en and escape(info.source) in en and escape(info.claim_en) in en
        for c in r.checks:
            assert escape(c.statement_en) in en and escape(c.evidence_en) in en
    ko = lab_html(results, lang="ko")
    assert_self_contained(ko)
    assert '<html lang="ko">' in ko and "성립" in ko
    assert all(escape(c.statement_ko) in ko for r in results for c in r.checks)
    with pytest.raises(ValueError, match="lang"):
        lab_html(results, lang="fr")


def test_quick_mode_says_which_set_up_it_really_ran(quick_result: Get) -> None:
    import dataclasses

    from gradguard.report.lab import quick_differences

    result = quick_result("batchnorm")
    info = lab.get_experiment("batchnorm")
    full, quick = dataclasses.asdict(info.config), dataclasses.asdict(info.quick_config)
    expected = [k for k in quick if k != "seed" and quick[k] != full[k]]
    assert expected, "the quick set-up of batchnorm differs from the full one"
    diffs = quick_differences(result, info)
    assert [k for k, _, _ in diffs] == expected
    for lang, phrase in (("en", "This quick run used a smaller set-up"), ("ko", "빠른 실행은")):
        page = lab_html([result], lang=lang)
        assert phrase in page
        for k, v, f in diffs:
            assert escape(f"{k}={v!r}") in page and escape(repr(f)) in page
    full_result = dataclasses.replace(result, quick=False)
    assert "This quick run" not in lab_html([full_result], lang="en")
