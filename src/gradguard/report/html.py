"""One self-contained HTML page: inline CSS, images as base64 data URIs, no external requests."""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Iterable, Sequence
from typing import Any

__all__ = ["escape", "figure_tag", "page", "table"]

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI","Noto Sans KR","Noto Sans CJK KR",
"Apple SD Gothic Neo","Malgun Gothic","NanumGothic","Nanum Gothic",sans-serif;max-width:1100px;
margin:2rem auto;padding:0 1rem;color:#1b1f24;line-height:1.5}
h1{font-size:1.7rem;margin-bottom:.2rem}h2{font-size:1.3rem;margin-top:2.2rem;border-bottom:1px solid #d0d7de}
h3{font-size:1.08rem}table{border-collapse:collapse;margin:.8rem 0;font-size:.92rem}
td,th{border:1px solid #d0d7de;padding:.3rem .6rem;text-align:left;vertical-align:top}
th{background:#f6f8fa}img{max-width:100%;height:auto;display:block;margin:.6rem 0}
.sev-error{color:#b42318;font-weight:600}.sev-warning{color:#b54708;font-weight:600}
.sev-info{color:#175cd3;font-weight:600}.holds{color:#067647;font-weight:600}
.partly{color:#b54708;font-weight:600}.fails{color:#b42318;font-weight:600}
pre{background:#f6f8fa;padding:.7rem;overflow-x:auto;border-radius:6px}.muted{color:#57606a}
.card{border:1px solid #d0d7de;border-radius:8px;padding:.8rem 1.1rem;margin:1rem 0}
:lang(ko){word-break:keep-all;overflow-wrap:anywhere}
"""


def escape(text: Any) -> str:
    """HTML-escape any value's ``str``."""
    return html.escape(str(text))


def figure_tag(fig: Any, alt: str, *, dpi: int = 110, close: bool = True) -> str:
    """A matplotlib figure as an ``<img>`` with an inline PNG data URI."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    if close:
        import matplotlib.pyplot as plt

        plt.close(fig)
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<img alt="{escape(alt)}" src="data:image/png;base64,{data}">'


def table(header: Sequence[str], rows: Iterable[Sequence[Any]], *, raw: bool = False) -> str:
    """An HTML table; cells are escaped unless ``raw`` (then they are trusted HTML fragments)."""
    cell = (lambda v: str(v)) if raw else escape
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def page(title: str, body: str, *, lang: str = "en") -> str:
    """A complete HTML document: ``body`` is trusted HTML built with the helpers above."""
    return (
        f'<!DOCTYPE html>\n<html lang="{escape(lang)}"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(title)}</title><style>{_CSS}</style></head>"
        f"<body>{body}</body></html>\n"
    )
