"""``gradguard report RUN.jsonl``: what a recorded run went through, from a Guard's JSON-lines history.

The file is what :class:`gradguard.JSONLSink` writes (one JSON object per step). It is read as a
stream (memory: the kept columns, not the file). The report tells each incident (spikes,
non-finite and skipped steps, back-offs, rollbacks, and whether the loss came back), level shifts
(a loss that rose and stayed up), a threshold that clipped every step, and the per-layer
findings that need no forward pass (:mod:`gradguard.recorded`).

Exit status: 0 when no finding is an error, 1 when one is, 2 for bad usage or input: a missing,
empty or malformed file (the message names the line), or fewer steps than the detectors need
("too few steps to judge").
"""

from __future__ import annotations

import argparse
from pathlib import Path

from gradguard.cli._render import (
    add_lang,
    add_report_files,
    console,
    error,
    exit_status,
    print_report,
    write_report_files,
)

HELP = "tell what a recorded run went through, from its JSONL history (what JSONLSink writes)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", metavar="RUN.jsonl", help="the history file")
    add_report_files(parser)
    add_lang(parser)
    parser.epilog = ("exit status: 0 no error-level finding, 1 at least one, 2 bad usage or input. "
                     "example: gradguard report runs/guard.jsonl --html report.html --lang ko")


def run(args: argparse.Namespace) -> int:
    from gradguard import messages as M
    from gradguard.recorded import read_jsonl, report

    con = console()
    if Path(args.path).is_dir():
        return error(f"{args.path!r} is a directory; pass the JSONL file a JSONLSink wrote.")
    try:
        history = read_jsonl(args.path)
    except (FileNotFoundError, ValueError, UnicodeDecodeError) as e:
        return error(f"{args.path!r} is not a gradguard history: {e}"
                     if isinstance(e, UnicodeDecodeError) else str(e))
    rep = report(history, lang=args.lang, source=str(args.path), model=Path(args.path).name)
    if rep.metadata.get("too_few_steps"):
        f = rep.findings[0]
        return error(f"{args.path}: {M.finding_title(f.code, args.lang)}: {M.finding_text(f, args.lang)}")
    print_report(con, rep, args.lang)
    write_report_files(con, rep, args)
    return exit_status(rep)
