"""``gradguard report RUN.jsonl``: diagnose a recorded run from a Guard's JSON-lines history.

The file is what :class:`gradguard.JSONLSink` writes (one JSON object per step with ``step``,
``loss``, ``global_norm``, per-tensor ``layer_norm`` and ``update_ratio``). The detectors that need
a forward pass (saturation, dead units, activation scale) stay silent here; the others run.
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

HELP = "diagnose a recorded run from its JSONL history (what JSONLSink writes)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", metavar="RUN.jsonl", help="the history file")
    add_report_files(parser)
    add_lang(parser)
    parser.epilog = ("exit status: 0 no error-level finding, 1 at least one, 2 bad usage or input. "
                     "example: gradguard report runs/guard.jsonl --html report.html --lang ko")


def run(args: argparse.Namespace) -> int:
    from gradguard.doctor import findings_from_history
    from gradguard.history import History

    con = console()
    if Path(args.path).is_dir():
        return error(f"{args.path!r} is a directory; pass the JSONL file a JSONLSink wrote.")
    try:
        history = History.from_jsonl(args.path)
    except (FileNotFoundError, ValueError, UnicodeDecodeError) as e:
        return error(f"{args.path!r} is not a gradguard history: {e}"
                     if isinstance(e, UnicodeDecodeError) else str(e))
    if len(history) == 0:
        return error(f"{args.path!r} holds no steps; pass the JSONL file a JSONLSink wrote.")
    report = findings_from_history(history)
    report.metadata["lang"] = args.lang
    report.metadata["source"] = str(args.path)
    report.metadata["model"] = Path(args.path).name
    print_report(con, report, args.lang)
    write_report_files(con, report, args)
    return exit_status(report)
