"""Every word a person reads, by code, in English (``en``) and Korean (``ko``).

The catalogues live in :mod:`gradguard.messages.en` and :mod:`gradguard.messages.ko`; this module
picks the variant of a finding's explanation that matches its evidence, fills in the numbers, and
renders a whole :class:`~gradguard.findings.Report` as plain text. Detectors only emit codes and
numbers; nothing else in the library holds user-facing text.
"""

from __future__ import annotations

import math
import re
from types import ModuleType
from typing import TYPE_CHECKING, Any

from gradguard.findings import set_renderer
from gradguard.messages import en, ko

if TYPE_CHECKING:
    from gradguard.findings import Finding, Report, Trial

__all__ = [
    "LANGS",
    "cause_text",
    "cause_title",
    "check_lang",
    "finding_text",
    "finding_title",
    "finding_variant",
    "fmt_num",
    "format_layers",
    "note_text",
    "remedy_snippet",
    "remedy_text",
    "remedy_title",
    "incident_story",
    "render_report",
    "story_ui",
    "trial_effect",
    "ui",
]

LANGS = ("en", "ko")
_CATALOGS: dict[str, ModuleType] = {"en": en, "ko": ko}


def check_lang(lang: Any) -> str:
    """``lang`` must be ``"en"`` or ``"ko"``; a clear ``ValueError`` otherwise."""
    if lang not in _CATALOGS:
        raise ValueError(
            f"`lang` must be one of {', '.join(repr(x) for x in LANGS)}; got {lang!r}. "
            "Use lang='ko' for Korean."
        )
    return str(lang)


def _cat(lang: str) -> ModuleType:
    return _CATALOGS[check_lang(lang)]


def _field(table: str, code: str, field: str, lang: str, missing: str) -> str:
    """``field`` of ``code``'s entry in the catalogue's ``table``; ``missing`` without an entry."""
    entry = getattr(_cat(lang), table).get(code)
    return str(entry[field]) if entry else missing


# -- numbers ---------------------------------------------------------------------------------------
def fmt_num(x: Any) -> str:
    """Three significant digits; scientific notation for very small or large values."""
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, int):
        return f"{x:,}" if abs(x) >= 10000 else str(x)
    if not isinstance(x, float):
        return str(x)
    if math.isnan(x):
        return "n/a"
    if math.isinf(x):
        return "∞" if x > 0 else "-∞"
    if x != 0 and (abs(x) < 1e-3 or abs(x) >= 1e5):
        return f"{x:.2e}"
    return f"{x:.3g}"


def _pct(x: Any) -> str:
    return f"{x:.0%}" if isinstance(x, (int, float)) and math.isfinite(x) else "n/a"


def format_layers(layers: list[str], lang: str = "en", limit: int = 8) -> str:
    """Layer names joined, with "... and N more" past ``limit``."""
    if not layers:
        return ui("no_layers", lang)
    shown = ", ".join(layers[:limit])
    if len(layers) > limit:
        shown += " " + ui("more_layers", lang, n=len(layers) - limit)
    return shown


class _Fill(dict):  # type: ignore[type-arg]
    def __missing__(self, key: str) -> str:
        return "?"


# -- findings ----------------------------------------------------------------------------------------
def finding_title(code: str, lang: str = "en") -> str:
    """The title of a finding code (the code itself if the catalogue does not know it)."""
    return _field("FINDINGS", code, "title", lang, code)


def finding_variant(f: Finding) -> str:
    """Which explanation fits the evidence (e.g. vanishing across depth or through time)."""
    ev = f.evidence
    if f.code in ("vanishing_gradients", "exploding_gradients"):
        return str(ev.get("axis", "depth"))
    if f.code == "nonfinite_loss":
        if not ev.get("at_start", False):
            return "training"
        return "start" if ev.get("origin") else "loss_fn"
    if f.code == "dead_units":
        return "training" if ev.get("died_in_training") else "init"
    if f.code == "activation_scale_drift":
        return str(ev.get("direction", "shrinks"))
    if f.code == "learning_rate_too_high":
        return "diverged" if ev.get("went_nonfinite") else "text"
    if f.code in ("loss_spike", "level_shift"):
        return str(ev.get("series", "loss"))
    if f.code == "loss_divergence":
        return "recovered" if ev.get("recovered") else "text"
    return "text"


def _fill(f: Finding, lang: str) -> _Fill:
    ev = f.evidence
    out = _Fill({k: fmt_num(v) for k, v in ev.items() if not isinstance(v, (list, dict))})
    alias = {
        "decay": ev.get("decay_per_layer", ev.get("decay_per_step")),
        "growth": ev.get("growth_per_layer", ev.get("growth")),
        "growth_step": ev.get("growth_per_step"),
        "factor": ev.get("factor_per_layer"),
    }
    out.update({k: fmt_num(v) for k, v in alias.items() if v is not None})
    for k in ("worst", "mean", "share"):
        if k in ev:
            out[f"{k}_pct"] = _pct(ev[k])
    if "origin" in ev and not ev["origin"]:
        out["origin"] = ui("no_layers", lang)
    out["layers"] = format_layers(f.layers, lang)
    if f.code == "incident":
        out["story"] = incident_story(ev, lang)
    return out


def story_ui(key: str, lang: str = "en", **kw: Any) -> str:
    """A piece of a recorded run's story (:mod:`gradguard.recorded`), formatted with ``kw``."""
    return _cat(lang).STORY[key].format(**kw)


def incident_story(ev: dict[str, Any], lang: str = "en") -> str:
    """One incident as a sentence: where, what happened and what the Guard did, how it ended."""
    a, b = ev.get("start_step", "?"), ev.get("end_step", "?")
    where = story_ui("step", lang, a=a) if a == b else story_ui("steps", lang, a=a, b=b)
    parts = []
    jump = ev.get("lr_jump", 1.0)
    if isinstance(jump, (int, float)) and jump > 1.0:
        parts.append(story_ui("lr_jump", lang, factor=fmt_num(float(jump))))
    lf = ev.get("loss_factor", math.nan)
    if isinstance(lf, (int, float)) and math.isfinite(lf) and lf >= 1.1:
        parts.append(story_ui("loss", lang, factor=fmt_num(float(lf))))
    if ev.get("nonfinite"):
        layer = ev.get("first_bad_layer")
        parts.append(story_ui("nonfinite_layer" if layer else "nonfinite", lang,
                              n=ev["nonfinite"], layer=layer))
    if ev.get("skipped"):
        parts.append(story_ui("skipped", lang, n=ev["skipped"]))
    backoff = ev.get("backoff", 1.0)
    if isinstance(backoff, (int, float)) and backoff < 1.0:
        parts.append(story_ui("backoff", lang, factor=fmt_num(float(backoff)),
                              steps=ev.get("backoff_steps", "?")))
    if ev.get("rollbacks"):
        to = ", ".join(str(t) for t in ev.get("rolled_back_to", []))
        parts.append(story_ui("rollback", lang, n=ev["rollbacks"], to=to))
    if not parts:
        parts.append(story_ui("quiet", lang))
    if ev.get("unaffected"):
        end = story_ui("unaffected", lang)
    elif ev.get("recovered"):
        key = "recovered" if math.isfinite(float(ev.get("level", math.nan))) else "recovered_no_loss"
        end = story_ui(key, lang, step=ev.get("recovered_at"))
    else:
        end = story_ui("not_recovered", lang)
    return f"{where}: {', '.join(parts)}; {end}"


def finding_text(f: Finding, lang: str = "en") -> str:
    """The finding's explanation in ``lang``, with its evidence numbers filled in."""
    entry = _cat(lang).FINDINGS.get(f.code)
    if not entry:
        return ""
    variants: dict[str, str] = entry["text"]  # type: ignore[assignment]
    template = variants.get(finding_variant(f)) or next(iter(variants.values()))
    return fill_template(template, _fill(f, lang))


def cause_title(code: str, lang: str = "en") -> str:
    return _field("CAUSES", code, "title", lang, code)


def cause_text(code: str, lang: str = "en") -> str:
    return _field("CAUSES", code, "text", lang, "")


def remedy_title(code: str, lang: str = "en") -> str:
    return _field("REMEDIES", code, "title", lang, code)


def remedy_text(code: str, lang: str = "en") -> str:
    return _field("REMEDIES", code, "text", lang, "")


def remedy_snippet(code: str, lang: str = "en") -> str:
    return _field("REMEDIES", code, "snippet", lang, "")


def note_text(code: str, lang: str = "en") -> str:
    return _cat(lang).NOTES.get(code, code)


def ui(key: str, lang: str = "en", **kw: Any) -> str:
    """A piece of the report's own wording (headings, column names), formatted with ``kw``."""
    text = _cat(lang).UI.get(key, en.UI.get(key, key))
    return fill_template(text, kw) if kw else text


# "{n|layer|layers}": the singular when the value of n is 1, else the plural (English needs it;
# Korean has no grammatical number, so ko.py never uses it).
_PLURAL = re.compile(r"\{(\w+)\|([^{}|]*)\|([^{}|]*)\}")


def fill_template(template: str, values: Any) -> str:
    """``template.format_map(values)`` after choosing ``{n|one|many}`` by the value of ``n``."""

    def choose(m: re.Match[str]) -> str:
        v = values.get(m.group(1)) if hasattr(values, "get") else None
        try:
            one = float(str(v).replace(",", "")) == 1
        except ValueError:
            one = False
        return m.group(2) if one else m.group(3)

    return _PLURAL.sub(choose, template).format_map(values)


def severity_label(severity: Any, lang: str = "en") -> str:
    value = getattr(severity, "value", severity)
    return ui(f"severity_{value}", lang)


def trial_effect(t: Trial, lang: str = "en") -> str:
    """One phrase: "improves", "no gain", or why it was not tried (+ the findings it resolves)."""
    if not t.applied:
        return note_text(t.note, lang)
    word = ui("improves" if t.improved else ("worse" if t.verdict == "worse" else "no_gain"),
              lang)
    if math.isfinite(t.factor):
        word += "; " + ui("lr_factor", lang, factor=fmt_num(t.factor))
    if t.resolved:
        word += "; " + ui("resolves", lang, codes=", ".join(t.resolved))
    return word


def run_line(report: Report, lang: str = "en") -> str:
    md = report.metadata
    mode = ui(f"mode_{md.get('mode', 'train')}", lang)
    if md.get("mode") == "history":
        return ui("run_summary_history", lang, mode=mode, steps=md.get("steps", len(report.history)),
                  tensors=md.get("tensors", "?"), model=md.get("model", "?"))
    return ui("run_summary", lang, mode=mode, steps=md.get("steps", len(report.history)),
              model=md.get("model", "?"), params=fmt_num(md.get("parameters", "?")))


# -- a whole report as plain text -----------------------------------------------------------------------
def render_report(report: Report, lang: str | None = None) -> str:
    """The report as plain text (no markup), in ``lang``."""
    lang = check_lang(lang or report.metadata.get("lang", "en"))
    lines = [ui("report_title", lang), run_line(report, lang), ""]
    if not report.findings:
        lines.append(ui("healthy", lang))
    for k, f in enumerate(report.findings, 1):
        lines.append(f"{k}. [{severity_label(f.severity, lang)}] {finding_title(f.code, lang)}"
                     f"  ({f.code})")
        lines.append(f"   {ui('layers', lang)}: {format_layers(f.layers, lang)}")
        lines.append(f"   {finding_text(f, lang)}")
        if f.causes:
            lines.append(f"   {ui('causes', lang)}: "
                         + "; ".join(cause_title(c, lang) for c in f.causes))
        if f.remedies:
            lines.append(f"   {ui('remedies', lang)}:")
            for i, r in enumerate(f.remedies[:4], 1):
                lines.append(f"     {i}. {remedy_title(r, lang)} — {remedy_text(r, lang)}")
            top = f.remedies[0]
            lines.append(f"   {ui('how', lang)} ({remedy_title(top, lang)}):")
            lines.extend("       " + s for s in remedy_snippet(top, lang).splitlines())
        lines.append("")
    if report.trials:
        best = report.prescription
        if best is not None:
            lines.append(ui("prescription", lang, remedy=remedy_title(best.remedy, lang),
                            rel=fmt_num(best.relative_loss)))
            lines.append("")
        lines.append(ui("trials", lang))
        lines.append(ui("trials_intro", lang))
        header = [ui("col_remedy", lang), ui("col_flow", lang), ui("col_loss", lang),
                  ui("col_left", lang), ui("col_effect", lang)]
        rows = [[ui("baseline", lang), fmt_num(report.metadata.get("baseline_flow", math.nan)),
                 fmt_num(report.metadata.get("baseline_loss", math.nan)),
                 ", ".join(report.codes) or ui("none", lang), ""]]
        for t in report.trials:
            rows.append([remedy_title(t.remedy, lang),
                         fmt_num(t.flow_ratio) if t.applied else "",
                         fmt_num(t.final_loss) if t.applied else "",
                         (", ".join(t.findings) or ui("none", lang)) if t.applied else "",
                         trial_effect(t, lang)])
        lines.extend(_table(header, rows))
    return "\n".join(lines).rstrip() + "\n"


def _width(s: str) -> int:
    """Display width: East Asian wide characters take two columns."""
    import unicodedata

    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in s)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    cols = list(zip(header, *rows))
    widths = [max(_width(c) for c in col) for col in cols]

    def line(cells: list[str]) -> str:
        return "  ".join(c + " " * (w - _width(c)) for c, w in zip(cells, widths)).rstrip()

    out = [line(header), line(["-" * w for w in widths])]
    out.extend(line(r) for r in rows)
    return out


set_renderer("title", finding_title)
set_renderer("explain", finding_text)
set_renderer("text", render_report)
