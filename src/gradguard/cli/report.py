"""``gradguard report RUN.jsonl``: diagnose a recorded run from a Guard's JSON-lines history.

The file is what :class:`gradguard.JSONLSink` writes (one JSON object per step with ``step``,
``loss``, ``global_norm``, per-tensor ``layer_norm`` and ``update_ratio``). The detectors that need
a forward pass (saturation, dead units, activation scale) stay silent here; the others run.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from gradguard.cli._render import add_lang, console, error, print_report

HELP = "diagnose a recorded run from its JSONL history (what JSONLSink writes)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", metavar="RUN.jsonl", help="the history file")
    parser.add_argument("--html", metavar="PATH", help="write a self-contained HTML report")
    parser.add_argument("--json", metavar="PATH", help="write the report as JSON")
    add_lang(parser)
    parser.epilog = "example: gradguard report runs/guard.jsonl --html report.html --lang ko"


def run(args: argparse.Namespace) -> int:
    from gradguard import messages as M
    from gradguard.doctor import findings_from_history
    from gradguard.history import History

    con = console()
    try:
        history = History.from_jsonl(args.path)
    except (FileNotFoundError, ValueError) as e:
        return error(str(e))
    report = findings_from_history(history)
    report.metadata["lang"] = args.lang
    report.metadata["source"] = str(args.path)
    report.metadata["model"] = Path(args.path).name
    print_report(con, report, args.lang)
    if args.json:
        report.to_json(args.json)
        con.print(M.ui("wrote", args.lang, path=args.json))
    if args.html:
        report.to_html(args.html, lang=args.lang)
        con.print(M.ui("wrote", args.lang, path=args.html))
    return 1 if any(f.severity.value == "error" for f in report.findings) else 0
