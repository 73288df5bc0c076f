"""Plots for a doctor's report (matplotlib, Agg backend) and the report's HTML page.

* :func:`layer_norm_chart` — the median gradient norm of each layer, input to output, log scale;
* :func:`norm_heatmap` — gradient norm per layer and step, log colour scale;
* :func:`loss_chart` — the loss curve (and each remedy's, when trials ran).

:func:`report_html` assembles one self-contained page (inline CSS, PNG data URIs) from them and
the findings. matplotlib is imported only here, and only when a plot is drawn.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from gradguard import messages as M
from gradguard.findings import set_renderer
from gradguard.report.html import escape, figure_tag, page, table

if TYPE_CHECKING:
    from gradguard.findings import Report

__all__ = ["layer_norm_chart", "loss_chart", "norm_heatmap", "report_html"]

_HANGUL_FONTS = ("Noto Sans CJK KR", "Noto Sans KR", "NanumGothic", "Malgun Gothic",
                 "AppleGothic", "UnDotum", "Baekmuk Gulim")


def _plt() -> Any:
    try:
        import matplotlib
    except ImportError:  # pragma: no cover
        raise ImportError(
            'plots need matplotlib: pip install "gradguard[report]"'
        ) from None
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _shipped_hangul_font() -> str | None:
    """The path of NanumGothic (SIL OFL) shipped by the ``koreanize-matplotlib`` package (the
    ``ko`` extra), found without importing that package (its import changes global rcParams)."""
    import importlib.util
    from pathlib import Path

    try:
        spec = importlib.util.find_spec("koreanize_matplotlib")
    except (ImportError, ValueError):
        return None
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(folder) / "fonts" / "NanumGothic.ttf"
        if path.is_file():
            return str(path)
    return None


@lru_cache(maxsize=1)
def _hangul_font() -> str | None:
    """A font that has Hangul glyphs, or None (then plot labels fall back to English).

    First the font the ``ko`` extra ships (so a machine without system fonts, a CI runner or a
    slim container, still draws Korean labels), then the usual system fonts."""
    from matplotlib import font_manager

    shipped = _shipped_hangul_font()
    if shipped is not None:
        font_manager.fontManager.addfont(shipped)
        return font_manager.FontProperties(fname=shipped).get_name()
    for name in _HANGUL_FONTS:
        try:
            font_manager.findfont(name, fallback_to_default=False)
            return name
        except ValueError:
            continue
    return None


def _plot_lang(lang: str) -> str:
    return "ko" if lang == "ko" and _hangul_font() is not None else "en"


def _rc(lang: str) -> dict[str, Any]:
    if lang == "ko":
        return {"font.family": [_hangul_font(), "DejaVu Sans"]}
    return {}


def _short(names: list[str], n: int = 28) -> list[str]:
    return [s if len(s) <= n else "…" + s[-(n - 1):] for s in names]


@contextmanager
def _chart(lang: str, figsize: tuple[float, float]) -> Iterator[tuple[Any, Any, str]]:
    """``(fig, ax, plot_lang)`` under the plot language's fonts; the layout is tightened at exit."""
    plt = _plt()
    pl = _plot_lang(lang)
    with plt.rc_context(_rc(pl)):
        fig, ax = plt.subplots(figsize=figsize)
        yield fig, ax, pl
        fig.tight_layout()


def _labels(ax: Any, pl: str, x: str, y: str, title: str) -> None:
    """The axes' labels and title, by message key, in ``pl``."""
    ax.set_xlabel(M.ui(x, pl))
    ax.set_ylabel(M.ui(y, pl))
    ax.set_title(M.ui(title, pl))


def layer_norm_chart(report: Report, lang: str = "en") -> Any:
    """Bar chart of each layer's median gradient norm (log scale), highlighted where a finding
    names the layer."""
    h = report.history
    med = h.layer_median()
    named = {layer for f in report.findings for layer in f.layers}
    with _chart(lang, (max(6.0, 0.28 * len(med) + 3), 3.6)) as (fig, ax, pl):
        xs = list(range(len(med)))
        vals = [v if math.isfinite(v) and v > 0 else math.nan for v in med]
        colors = ["#d1495b" if layer in named else "#2e86ab" for layer in h.layers]
        ax.bar(xs, [v if math.isfinite(v) else 0 for v in vals], color=colors)
        ax.set_yscale("log")
        ax.set_xticks(xs)
        ax.set_xticklabels(_short(h.layers), rotation=60, ha="right", fontsize=7)
        _labels(ax, pl, "axis_layer", "axis_norm", "plot_layers")
        ax.grid(axis="y", which="major", alpha=0.3)
    return fig


def norm_heatmap(report: Report, lang: str = "en") -> Any:
    """Layer × step heatmap of gradient norms on a log colour scale (non-finite cells grey)."""
    plt = _plt()
    import numpy as np
    from matplotlib.colors import LogNorm

    h = report.history
    data = np.array(h.layer_norm, dtype=float).T  # layers × steps
    bad = ~np.isfinite(data) | (data <= 0)
    masked = np.ma.masked_array(data, mask=bad)
    good = data[~bad]
    with _chart(lang, (8.0, max(2.6, 0.22 * data.shape[0] + 1.4))) as (fig, ax, pl):
        cmap = plt.get_cmap("viridis").with_extremes(bad="#bbbbbb")
        norm = LogNorm(vmin=float(good.min()), vmax=float(good.max())) if good.size and \
            good.min() < good.max() else None
        im = ax.imshow(masked, aspect="auto", interpolation="nearest", cmap=cmap, norm=norm)
        ax.set_yticks(range(len(h.layers)))
        ax.set_yticklabels(_short(h.layers), fontsize=7)
        _labels(ax, pl, "axis_step", "axis_layer", "plot_heatmap")
        fig.colorbar(im, ax=ax, label=M.ui("axis_norm", pl))
    return fig


def loss_chart(report: Report, lang: str = "en") -> Any:
    """The loss per step; with trials, each applied remedy's loss curve beside it."""
    h = report.history
    with _chart(lang, (7.0, 3.4)) as (fig, ax, pl):
        ax.plot(h.step, [v if math.isfinite(v) else math.nan for v in h.loss], color="black",
                lw=2, label=M.ui("baseline", pl))
        for t in report.trials:
            if t.applied and t.loss_curve:
                ys = [v if math.isfinite(v) else math.nan for v in t.loss_curve]
                ax.plot(h.step[: len(ys)] if len(h.step) >= len(ys) else range(len(ys)), ys,
                        lw=1.2, label=M.remedy_title(t.remedy, pl))
        finite = [v for v in h.loss if math.isfinite(v) and v > 0]
        for t in report.trials:
            finite += [v for v in t.loss_curve if math.isfinite(v) and v > 0]
        if finite and max(finite) / min(finite) > 100:
            ax.set_yscale("log")
        _labels(ax, pl, "axis_step", "axis_loss", "plot_trials" if report.trials else "plot_loss")
        if report.trials:
            ax.legend(fontsize=7, loc="best")
        ax.grid(alpha=0.3)
    return fig


def _finding_card(f: Any, lang: str) -> str:
    sev = f.severity.value
    parts = [
        f'<div class="card"><h3><span class="sev-{sev}">{escape(M.severity_label(sev, lang))}</span> '
        f"{escape(M.finding_title(f.code, lang))} <span class=\"muted\">({escape(f.code)})</span></h3>",
        f"<p><b>{escape(M.ui('layers', lang))}:</b> {escape(M.format_layers(f.layers, lang, 16))}</p>",
        f"<p>{escape(M.finding_text(f, lang))}</p>",
    ]
    if f.causes:
        items = "".join(f"<li><b>{escape(M.cause_title(c, lang))}</b>: "
                        f"{escape(M.cause_text(c, lang))}</li>" for c in f.causes)
        parts.append(f"<p><b>{escape(M.ui('causes', lang))}</b></p><ol>{items}</ol>")
    if f.remedies:
        items = []
        for r in f.remedies:
            tried = next((t for t in f.trials if t.remedy == r), None)
            effect = f' <span class="muted">[{escape(M.trial_effect(tried, lang))}]</span>' \
                if tried is not None else ""
            items.append(f"<li><b>{escape(M.remedy_title(r, lang))}</b>{effect}: "
                         f"{escape(M.remedy_text(r, lang))}"
                         f"<pre>{escape(M.remedy_snippet(r, lang))}</pre></li>")
        parts.append(f"<p><b>{escape(M.ui('remedies', lang))}</b></p><ol>{''.join(items)}</ol>")
    ev = {k: v for k, v in f.evidence.items() if not isinstance(v, (list, dict))}
    if ev:
        rows = [(k, M.fmt_num(v)) for k, v in ev.items()]
        parts.append(f"<details><summary>{escape(M.ui('evidence', lang))}</summary>"
                     f"{table(['', ''], rows)}</details>")
    parts.append("</div>")
    return "".join(parts)


def report_html(report: Report, lang: str | None = None) -> str:
    """One self-contained HTML page for ``report`` (findings, trials, plots, run facts)."""
    lang = M.check_lang(lang or report.metadata.get("lang", "en"))
    body = [f"<h1>{escape(M.ui('report_title', lang))}</h1>",
            f"<p class=\"muted\">{escape(M.run_line(report, lang))}</p>",
            f"<h2>{escape(M.ui('findings', lang))}</h2>"]
    if not report.findings:
        body.append(f'<p class="holds">{escape(M.ui("healthy", lang))}</p>')
    body.extend(_finding_card(f, lang) for f in report.findings)
    if report.trials:
        body.append(f"<h2>{escape(M.ui('trials', lang))}</h2>"
                    f"<p>{escape(M.ui('trials_intro', lang))}</p>")
        header = [M.ui(k, lang) for k in ("col_remedy", "col_flow", "col_loss", "col_left",
                                          "col_effect")]
        rows = [[M.ui("baseline", lang), M.fmt_num(report.metadata.get("baseline_flow", math.nan)),
                 M.fmt_num(report.metadata.get("baseline_loss", math.nan)),
                 ", ".join(report.codes) or M.ui("none", lang), ""]]
        for t in report.trials:
            rows.append([M.remedy_title(t.remedy, lang),
                         M.fmt_num(t.flow_ratio) if t.applied else "",
                         M.fmt_num(t.final_loss) if t.applied else "",
                         (", ".join(t.findings) or M.ui("none", lang)) if t.applied else "",
                         M.trial_effect(t, lang)])
        body.append(table(header, rows))
    body.append(f"<h2>{escape(M.ui('html_plots', lang))}</h2>")
    h = report.history
    if len(h) and h.layers:
        body.append(figure_tag(layer_norm_chart(report, lang), M.ui("plot_layers", lang)))
        body.append(figure_tag(norm_heatmap(report, lang), M.ui("plot_heatmap", lang)))
        body.append(figure_tag(loss_chart(report, lang), M.ui("plot_loss", lang)))
    else:
        body.append(f'<p class="muted">{escape(M.ui("html_no_history", lang))}</p>')
    body.append(f"<h2>{escape(M.ui('html_run', lang))}</h2>")
    md_rows = [(k, M.fmt_num(v) if not isinstance(v, (list, dict)) else
                ", ".join(M.fmt_num(x) for x in v) if isinstance(v, list) else str(v))
               for k, v in report.metadata.items()]
    body.append(table(["", ""], md_rows))
    return page(M.ui("report_title", lang), "".join(body), lang=lang)


set_renderer("html", report_html)
