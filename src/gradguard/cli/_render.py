"""Rich output shared by ``gradguard doctor``, ``report`` and ``demo`` (the CLI owns the terminal)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from gradguard import messages as M
from gradguard.findings import Report

_SEV_STYLE = {"error": "bold red", "warning": "bold yellow", "info": "bold blue"}


def console() -> Any:
    from rich.console import Console

    return Console(highlight=False)


def error(msg: str) -> int:
    """Print a usage error to stderr (no wrapping, no markup); returns exit status 2.

    Without rich (a core-only install) it prints plain text, so that the message saying to
    install the ``report`` extra can be shown at all."""
    import sys

    text = msg if msg.startswith("error:") else f"error: {msg}"
    try:
        from rich.console import Console
    except ImportError:
        print(text, file=sys.stderr)
        return 2
    Console(stderr=True, highlight=False).print(text, style="red", markup=False, soft_wrap=True)
    return 2


def add_lang(parser: Any) -> None:
    parser.add_argument("--lang", choices=M.LANGS, default="en",
                        help="language of the findings: en (English) or ko (Korean)")


def add_report_files(parser: Any) -> None:
    """``--html PATH`` and ``--json PATH``, written by :func:`write_report_files`."""
    parser.add_argument("--html", metavar="PATH", help="write a self-contained HTML report")
    parser.add_argument("--json", metavar="PATH", help="write the report as JSON")


def _unwritable(path: str, *, directory: bool) -> str | None:
    """Why ``path`` cannot be written (None when it can), found without running anything.

    A file is opened for appending (and removed again if it did not exist), so the check is the
    real one, permissions, read-only mounts and root included; a directory must be creatable.
    """
    import os
    from pathlib import Path

    p = Path(path)
    if directory:
        if p.exists() and not p.is_dir():
            return f"{str(p)!r} exists and is not a directory."
        probe = p
        while not probe.exists():
            probe = probe.parent
        if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
            return f"cannot create or write in {str(p)!r} ({str(probe)!r} is not writable)."
        return None
    if p.is_dir():
        return f"{str(p)!r} is a directory; give a file name, e.g. {str(p / 'report')!r}."
    if not p.parent.is_dir():
        return f"the folder {str(p.parent)!r} does not exist; create it first."
    existed = p.exists()
    try:
        with open(p, "a", encoding="utf-8"):
            pass
    except OSError as e:
        return f"cannot write {str(p)!r}: {e.strerror or e}."
    if not existed:
        p.unlink()
    return None


def check_outputs(args: Any) -> str | None:
    """The first unwritable output of a command (``--html``, ``--json``, ``-o/--out``), or None."""
    for flag, attr, directory in (("--html", "html", False), ("--json", "json", False),
                                  ("--out", "out", True)):
        value = getattr(args, attr, None)
        if value:
            why = _unwritable(str(value), directory=directory)
            if why is not None:
                return f"{flag}: {why}"
    if getattr(args, "html", None):
        import matplotlib  # noqa: F401  (the page's charts; a core-only install hears which extra)
    return None


def write_report_files(con: Any, report: Report, args: Any) -> None:
    """Write the report where ``--json`` and ``--html`` ask, saying so in ``--lang``."""
    if args.json:
        report.to_json(args.json)
        con.print(M.ui("wrote", args.lang, path=args.json))
    if args.html:
        report.to_html(args.html, lang=args.lang)
        con.print(M.ui("wrote", args.lang, path=args.html))


def exit_status(report: Report) -> int:
    """1 when any finding is an error, else 0 (2, a usage error, comes from :func:`error`)."""
    return 1 if any(f.severity.value == "error" for f in report.findings) else 0


def print_report(con: Any, report: Report, lang: str, *, snippets: bool = True) -> None:
    """Findings as rich panels, then the trials table."""
    from rich.markup import escape
    from rich.panel import Panel
    from rich.syntax import Syntax
    from rich.console import Group
    from rich.text import Text

    con.print(f"[bold]{escape(M.ui('report_title', lang))}[/bold] — "
              f"{escape(M.run_line(report, lang))}")
    if not report.findings:
        con.print(f"[bold green]{escape(M.ui('healthy', lang))}[/bold green]")
    for k, f in enumerate(report.findings, 1):
        sev = f.severity.value
        parts: list[Any] = [
            Text.from_markup(f"[bold]{escape(M.ui('layers', lang))}:[/bold] "
                             f"{escape(M.format_layers(f.layers, lang))}"),
            Text(M.finding_text(f, lang)),
        ]
        if f.causes:
            parts.append(Text.from_markup(
                f"[bold]{escape(M.ui('causes', lang))}:[/bold] "
                + escape("; ".join(M.cause_title(c, lang) for c in f.causes))))
        if f.remedies:
            lines = []
            for i, r in enumerate(f.remedies[:4], 1):
                tried = next((t for t in f.trials if t.remedy == r), None)
                effect = f" [dim]\\[{escape(M.trial_effect(tried, lang))}][/dim]" if tried else ""
                lines.append(f"  {i}. {escape(M.remedy_title(r, lang))}{effect}")
            parts.append(Text.from_markup(f"[bold]{escape(M.ui('remedies', lang))}:[/bold]\n"
                                          + "\n".join(lines)))
            if snippets and M.remedy_snippet(f.remedies[0], lang):
                parts.append(Syntax(M.remedy_snippet(f.remedies[0], lang), "python",
                                    theme="ansi_dark", background_color="default", word_wrap=True))
        title = (f"[{_SEV_STYLE.get(sev, 'bold')}]{k}. {escape(M.severity_label(sev, lang))}"
                 f"[/] {escape(M.finding_title(f.code, lang))} [dim]({f.code})[/dim]")
        con.print(Panel(Group(*parts), title=title, title_align="left", expand=True))
    if report.trials:
        con.print(trials_table(report, lang))


def trials_table(report: Report, lang: str) -> Any:
    from rich.table import Table

    time_axis = any(f.evidence.get("axis") == "time" for f in report.findings)
    t = Table(title=M.ui("trials", lang), caption=M.ui("trials_intro", lang))
    # overflow="fold": a word wider than its column (a finding code, a layer name, Korean text)
    # is broken across lines, never cut with an ellipsis.
    t.add_column(M.ui("col_remedy", lang), overflow="fold")
    t.add_column(M.ui("col_time" if time_axis else "col_flow", lang), justify="right", overflow="fold")
    t.add_column(M.ui("col_loss", lang), justify="right", overflow="fold")
    t.add_column(M.ui("col_left", lang), overflow="fold")
    t.add_column(M.ui("col_effect", lang), overflow="fold")
    md = report.metadata
    t.add_row(M.ui("baseline", lang), M.fmt_num(md.get("baseline_time" if time_axis else "baseline_flow", math.nan)),
              M.fmt_num(md.get("baseline_loss", math.nan)), ", ".join(report.codes) or "-", "",
              style="dim")
    for tr in report.trials:
        if tr.applied:
            flow = tr.time_ratio if time_axis else tr.flow_ratio
            style = "green" if tr.improved else ""
            t.add_row(M.remedy_title(tr.remedy, lang), M.fmt_num(flow), M.fmt_num(tr.final_loss),
                      ", ".join(tr.findings) or M.ui("none", lang), M.trial_effect(tr, lang),
                      style=style)
        else:
            t.add_row(M.remedy_title(tr.remedy, lang), "", "", "", M.trial_effect(tr, lang),
                      style="dim")
    return t


def stage_label(stage: str, lang: str) -> str:
    """A progress stage in ``lang``: "baseline" and remedy codes by their titles, else as is."""
    return M.ui("baseline", lang) if stage == "baseline" else M.remedy_title(stage, lang)


@contextmanager
def progress_bar(con: Any, label: str, lang: str = "en") -> Iterator[Callable[[str, int, int], None]]:
    """A rich progress bar fed by ``diagnose(progress=...)`` callbacks (stages named in ``lang``)."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=con, transient=True) as prog:
        tasks: dict[str, Any] = {}

        def update(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = prog.add_task(f"{label}: {stage_label(stage, lang)}", total=total)
            prog.update(tasks[stage], completed=done)

        yield update
