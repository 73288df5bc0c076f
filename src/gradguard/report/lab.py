"""The lab's report: one self-contained HTML page (every claim, its source, the plots, the
numbers, the verdict) and the ``results.json`` it is built from.

Figures come from each experiment's ``plotter`` (matplotlib, no pyplot state) and are embedded as
base64 PNGs through :mod:`gradguard.report.html`; the page makes no external request. Plot labels
are in English (the fonts matplotlib ships have no Hangul); the page's text follows ``lang``.
"""

from __future__ import annotations

import json
import logging
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gradguard.lab import ExperimentResult, get_experiment
from gradguard.report.html import escape, figure_tag, page, table

__all__ = ["UI", "lab_html", "results_document", "verdict_label", "write_lab_report"]

log = logging.getLogger(__name__)

UI: dict[str, dict[str, str]] = {
    "title": {"en": "gradguard lab: vanishing and exploding gradients, claim by claim",
              "ko": "gradguard 실험실: 기울기 소실과 폭주, 주장 하나씩 확인하기"},
    "intro": {"en": "Each section states a textbook claim and its source, runs a small experiment that "
                    "reproduces the paper's set-up on a CPU, and computes the verdict from the measured "
                    "numbers: <b>holds</b> when every part of the claim is supported, <b>partly holds</b> "
                    "when some part is not, <b>does not hold</b> when none is.",
              "ko": "각 절은 교과서에 나오는 주장과 그 출처를 밝히고, 논문의 설정을 CPU 크기로 옮긴 작은 실험을 "
                    "돌린 뒤, 측정한 숫자로 판정을 계산합니다. 주장의 모든 부분이 뒷받침되면 <b>성립</b>, 일부가 "
                    "뒷받침되지 않으면 <b>부분적으로 성립</b>, 하나도 뒷받침되지 않으면 <b>성립하지 않음</b>입니다."},
    "summary": {"en": "Summary", "ko": "요약"},
    "experiment": {"en": "experiment", "ko": "실험"},
    "claim": {"en": "claim", "ko": "주장"},
    "verdict": {"en": "verdict", "ko": "판정"},
    "numbers": {"en": "deciding numbers", "ko": "판정 근거 숫자"},
    "time": {"en": "time", "ko": "시간"},
    "source": {"en": "Source", "ko": "출처"},
    "setup": {"en": "Set-up", "ko": "설정"},
    "part": {"en": "part of the claim", "ko": "주장의 세부 내용"},
    "measured": {"en": "measured", "ko": "측정 결과"},
    "ok": {"en": "supported", "ko": "뒷받침됨"},
    "not_ok": {"en": "not supported", "ko": "뒷받침 안 됨"},
    "config": {"en": "Configuration and deciding figures", "ko": "설정값과 판정 근거 수치"},
    "field": {"en": "config field", "ko": "설정 항목"},
    "figure": {"en": "deciding figure", "ko": "판정 근거 수치"},
    "value": {"en": "value", "ko": "값"},
    "mode_quick": {"en": "quick mode (small set-ups for tests; verdicts can differ from a full run)",
                   "ko": "빠른 모드 (테스트용 작은 설정이라 전체 실행과 판정이 다를 수 있음)"},
    "mode_full": {"en": "full run", "ko": "전체 실행"},
    "quick_ran": {"en": "This quick run used a smaller set-up than the one described",
                  "ko": "이 빠른 실행은 위 설명보다 작은 설정으로 돌렸습니다"},
    "full_value": {"en": "full run", "ko": "전체 실행"},
    "run": {"en": "Run", "ko": "실행 정보"},
    "plots_note": {"en": "", "ko": "그림 안의 글자는 영어로 표기했습니다."},
    "no_plot": {"en": "The figure could not be drawn", "ko": "그림을 그리지 못했습니다"},
}

_VERDICT = {
    "holds": {"en": "holds", "ko": "성립", "css": "holds"},
    "partly holds": {"en": "partly holds", "ko": "부분적으로 성립", "css": "partly"},
    "does not hold": {"en": "does not hold", "ko": "성립하지 않음", "css": "fails"},
}


def _t(key: str, lang: str) -> str:
    return UI[key]["ko" if lang == "ko" else "en"]


def verdict_label(verdict: str, lang: str = "en") -> str:
    """The verdict in ``lang`` (``holds`` → ``성립`` in Korean)."""
    return _VERDICT[verdict]["ko" if lang == "ko" else "en"]


def _verdict_html(verdict: str, lang: str) -> str:
    return f'<span class="{_VERDICT[verdict]["css"]}">{escape(verdict_label(verdict, lang))}</span>'


def results_document(results: Sequence[ExperimentResult], *, quick: bool, seed: int,
                     n_seeds: int | None = None, seconds: float | None = None) -> dict[str, Any]:
    """The content of ``results.json``: run metadata and every result's ``to_dict()``."""
    import torch

    from gradguard import __version__

    return {
        "gradguard_version": __version__,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "quick": quick,
        "seed": seed,
        "n_seeds": n_seeds,
        "seconds": seconds if seconds is not None else sum(r.seconds for r in results),
        "results": [r.to_dict() for r in results],
    }


def _section(result: ExperimentResult, lang: str) -> str:
    info = get_experiment(result.name)
    rows = []
    for c in result.checks:
        mark = f'<span class="holds">✓ {escape(_t("ok", lang))}</span>' if c.passed else \
            f'<span class="fails">✗ {escape(_t("not_ok", lang))}</span>'
        rows.append((mark, escape(c.statement_ko if lang == "ko" else c.statement_en),
                     escape(c.evidence_ko if lang == "ko" else c.evidence_en)))
    checks = table(["", _t("part", lang), _t("measured", lang)], rows, raw=True)
    figs = []
    try:
        for i, fig in enumerate(info.plotter(result)):
            figs.append(figure_tag(fig, f"{result.name} figure {i + 1}", close=False))
    except Exception as exc:  # a plot must never cost the report the numbers
        log.warning("lab: plotting %s failed: %s", result.name, exc)
        figs.append(f'<p class="muted">{escape(_t("no_plot", lang))}: {escape(exc)}</p>')
    def rows(d: dict[str, Any]) -> list[tuple[str, str]]:
        return [(k, json.dumps(v, ensure_ascii=False)) for k, v in d.items()]

    details = (
        f"<details><summary>{escape(_t('config', lang))}</summary>"
        + table([_t("field", lang), _t("value", lang)], rows(result.config))
        + table([_t("figure", lang), _t("value", lang)], rows(result.figures))
        + "</details>"
    )
    note = _t("plots_note", lang)
    return (
        f'<section class="card" id="{escape(result.name)}">'
        f"<h2>{escape(info.title(lang))} <code>{escape(result.name)}</code></h2>"
        f"<p><b>{escape(_t('claim', lang).capitalize())}:</b> {escape(info.claim(lang))}</p>"
        f"<p><b>{escape(_t('source', lang))}:</b> {escape(info.source)}</p>"
        f"<p><b>{escape(_t('setup', lang))}:</b> {escape(info.setup(lang))}</p>"
        f"{_quick_setup(result, info, lang)}"
        f"<p><b>{escape(_t('verdict', lang).capitalize())}:</b> {_verdict_html(result.verdict, lang)} "
        f'<span class="muted">({result.seconds:.1f} s)</span></p>'
        f"{checks}{''.join(figs)}"
        + (f'<p class="muted">{escape(note)}</p>' if note else "")
        + f"{details}</section>"
    )


def quick_differences(result: ExperimentResult, info: Any) -> list[tuple[str, Any, Any]]:
    """``(field, value run, full-run value)`` for each setting where a quick run differed."""
    import dataclasses

    if not result.quick:
        return []
    full = dataclasses.asdict(info.config)
    return [(k, v, full[k]) for k, v in result.config.items()
            if k in full and k != "seed" and v != full[k]]


def _quick_setup(result: ExperimentResult, info: Any, lang: str) -> str:
    """A quick run says what it really ran: the settings that differ from the described set-up."""
    diffs = quick_differences(result, info)
    if not diffs:
        return ""
    items = ", ".join(f"<code>{escape(k)}={escape(repr(v))}</code> ({escape(_t('full_value', lang))}: "
                      f"{escape(repr(f))})" for k, v, f in diffs)
    return f'<p class="muted"><b>{escape(_t("quick_ran", lang))}:</b> {items}</p>'


def lab_html(results: Sequence[ExperimentResult], *, lang: str = "en", quick: bool | None = None,
             seed: int = 0) -> str:
    """One self-contained HTML page for ``results`` (see the module docstring)."""
    if lang not in ("en", "ko"):
        raise ValueError(f"`lang` must be 'en' or 'ko', got {lang!r}.")
    from gradguard import __version__

    if quick is None:
        quick = any(r.quick for r in results)
    summary_rows = []
    for r in results:
        info = get_experiment(r.name)
        summary_rows.append((
            f'<a href="#{escape(r.name)}">{escape(r.name)}</a>',
            escape(info.title(lang)),
            _verdict_html(r.verdict, lang),
            escape(r.headline),
            f"{r.seconds:.1f} s",
        ))
    counts = {v: sum(r.verdict == v for r in results) for v in _VERDICT}
    tally = ", ".join(f"{verdict_label(v, lang)}: {n}" for v, n in counts.items())
    total = sum(r.seconds for r in results)
    mode = _t("mode_quick" if quick else "mode_full", lang)
    body = (
        f"<h1>{escape(_t('title', lang))}</h1>"
        f"<p>{_t('intro', lang)}</p>"
        f'<p class="muted">{escape(_t("run", lang))}: gradguard {escape(__version__)}, {escape(mode)}, '
        + (f"시드 {seed}, {total:.0f}초" if lang == "ko" else f"seed {seed}, {total:.0f} s")
        + f". {escape(tally)}.</p>"
        f"<h2>{escape(_t('summary', lang))}</h2>"
        + table([_t("experiment", lang), _t("claim", lang), _t("verdict", lang), _t("numbers", lang),
                 _t("time", lang)], summary_rows, raw=True)
        + "".join(_section(r, lang) for r in results)
    )
    return page(_t("title", lang), body, lang=lang)


def write_lab_report(results: Sequence[ExperimentResult], out_dir: str | Path, *, lang: str = "en",
                     quick: bool | None = None, seed: int = 0, n_seeds: int | None = None,
                     seconds: float | None = None) -> tuple[Path, Path]:
    """Write ``out_dir/report.html`` and ``out_dir/results.json``; returns both paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if quick is None:
        quick = any(r.quick for r in results)
    html_path = out / "report.html"
    json_path = out / "results.json"
    html_path.write_text(lab_html(results, lang=lang, quick=quick, seed=seed), encoding="utf-8")
    doc = results_document(results, quick=quick, seed=seed, n_seeds=n_seeds, seconds=seconds)
    json_path.write_text(json.dumps(doc, ensure_ascii=False, indent=1, allow_nan=False), encoding="utf-8")
    return html_path, json_path
