"""Korean output: plots drawn with a Hangul font from the `ko` extra (not boxes), seen in Chromium;
the HTML page keeps Korean words whole (word-break: keep-all) and lists Korean fonts."""

from __future__ import annotations

import io
import re
import warnings
from pathlib import Path

import pytest
import torch

from gradguard import messages as M
from gradguard.findings import Finding, HistorySummary, Report, Severity
from gradguard.report import plots
from gradguard.report.html import figure_tag, page
from tests.browser import _run, screenshot

torch.set_num_threads(1)

SAME = "가가가가가가"  # six copies of one syllable
DIFFERENT = "기울기소실다"  # six different syllables, same length


def _title_png(title: str, family: list[str]) -> bytes:
    plt = plots._plt()
    with plt.rc_context({"font.family": family}), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the control font warns about its missing glyphs
        fig, ax = plt.subplots(figsize=(4.0, 1.2))
        ax.set_axis_off()
        ax.set_title(title, fontsize=22)
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=80)
        plt.close(fig)
    return buf.getvalue()


def _pixels(png: bytes):  # type: ignore[no-untyped-def]
    import matplotlib.image as mpimg

    return mpimg.imread(io.BytesIO(png), format="png")


def test_the_ko_extra_ships_the_hangul_font() -> None:
    pytest.importorskip("koreanize_matplotlib")
    assert plots._shipped_hangul_font() is not None
    assert plots._hangul_font() == "NanumGothic"
    assert plots._plot_lang("ko") == "ko"


def test_a_font_without_hangul_draws_boxes_and_ours_draws_glyphs() -> None:
    """The method behind the screenshot test: six different syllables drawn in a font without
    Hangul give the same picture as six copies of one (identical boxes); in gradguard's font they
    differ."""
    import numpy as np

    control = [_pixels(_title_png(t, ["DejaVu Sans"])) for t in (SAME, DIFFERENT)]
    assert np.array_equal(*control), "boxes should look alike"
    font = plots._hangul_font()
    if font is None:
        pytest.skip("no Hangul font: install the `ko` extra")
    ours = [_pixels(_title_png(t, [font])) for t in (SAME, DIFFERENT)]
    assert not np.array_equal(*ours)


def test_korean_plot_labels_are_not_boxes_in_a_chromium_screenshot(tmp_path: Path) -> None:
    import numpy as np

    font = plots._hangul_font()
    if font is None:
        pytest.skip("no Hangul font: install the `ko` extra")
    shots = []
    for name, title in (("same", SAME), ("different", DIFFERENT)):
        html = tmp_path / f"{name}.html"
        plt = plots._plt()
        with plt.rc_context({"font.family": [font]}):
            fig, ax = plt.subplots(figsize=(4.0, 1.2))
            ax.set_axis_off()
            ax.set_title(title, fontsize=22)
        html.write_text(page("plot", figure_tag(fig, title, dpi=80), lang="ko"), encoding="utf-8")
        shots.append(screenshot(html, tmp_path / f"{name}.png", width=600, height=300))
    a, b = (_pixels(p.read_bytes())[..., :3] for p in shots)
    assert a.shape == b.shape and a.std() > 0.01  # something was drawn
    assert not np.array_equal(a, b), "the syllables rendered alike: boxes, not glyphs"


def _report() -> Report:
    h = HistorySummary(layers=["encoder.0", "encoder.1", "head"], step=list(range(6)),
                       loss=[2.0 - 0.1 * s for s in range(6)], global_norm=[1.0] * 6,
                       layer_norm=[[1e-6, 1e-3, 1.0]] * 6, update_ratio=[float("nan")] * 6)
    f = Finding("vanishing_gradients", Severity.ERROR, ["encoder.0"],
                evidence={"axis": "depth", "first_layer": "encoder.0", "ratio": 1e-6,
                          "decay_per_layer": 0.001, "depth": 3, "n_layers": 1})
    return Report(findings=[f], history=h, metadata={"lang": "ko", "mode": "history", "steps": 6})


def test_korean_report_plots_have_korean_labels_and_no_missing_glyphs() -> None:
    pytest.importorskip("koreanize_matplotlib")
    report = _report()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*missing from font.*")
        fig = plots.layer_norm_chart(report, "ko")
        fig.canvas.draw()  # glyphs are looked up when drawn
    ax = fig.axes[0]
    assert ax.get_title() == M.ui("plot_layers", "ko") and re.search("[가-힣]", ax.get_title())
    assert ax.get_xlabel() == M.ui("axis_layer", "ko")
    plots._plt().close(fig)


def test_korean_html_keeps_words_whole_in_chromium(tmp_path: Path) -> None:
    html = tmp_path / "ko.html"
    probe = ("<script>window.addEventListener('load',()=>{const s=getComputedStyle(document.body);"
             "document.body.setAttribute('data-wb',s.wordBreak);"
             "document.body.setAttribute('data-ff',s.fontFamily);});</script>")
    html.write_text(page("보고서", "<p>입력 쪽으로 역전파될수록 기울기가 점점 작아지고 있습니다.</p>"
                         + probe, lang="ko"), encoding="utf-8")
    dom = _run(["--dump-dom", html.resolve().as_uri()], tmp_path).stdout
    assert 'data-wb="keep-all"' in dom
    ff = re.search(r'data-ff="([^"]*)"', dom)
    assert ff is not None and "Noto Sans KR" in ff.group(1) and "NanumGothic" in ff.group(1)
    en = tmp_path / "en.html"
    en.write_text(page("report", "<p>text</p>" + probe, lang="en"), encoding="utf-8")
    assert 'data-wb="keep-all"' not in _run(["--dump-dom", en.resolve().as_uri()], tmp_path).stdout
