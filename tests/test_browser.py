"""The headless-browser helper itself, on a page we build here."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from gradguard.report.html import figure_tag, page, table
from tests.browser import image_load_counts, is_blank, screenshot


def test_page_renders_with_every_image_loaded(tmp_path: Path) -> None:
    fig, ax = plt.subplots()
    ax.semilogy([1, 10, 100])
    body = "<h1>check</h1>" + figure_tag(fig, "a line") + table(["a", "b"], [[1, "<x>"]])
    html = tmp_path / "p.html"
    html.write_text(page("check", body), encoding="utf-8")
    assert "&lt;x&gt;" in html.read_text()
    assert image_load_counts(html, tmp_path) == (1, 1)
    assert not is_blank(screenshot(html, tmp_path / "p.png"))


def test_broken_image_is_caught(tmp_path: Path) -> None:
    html = tmp_path / "broken.html"
    html.write_text(page("x", '<img alt="x" src="data:image/png;base64,AAAA">'), encoding="utf-8")
    assert image_load_counts(html, tmp_path) == (0, 1)
