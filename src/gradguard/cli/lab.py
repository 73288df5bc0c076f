"""``gradguard lab``: run the lab's experiments, print a verdict table, write the report.

Every experiment reproduces one textbook claim about vanishing or exploding gradients on a CPU
and computes its verdict (holds / partly holds / does not hold) from the measured numbers.
``DIR/report.html`` is one self-contained page; ``DIR/results.json`` holds every number.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

HELP = "reproduce the textbook claims about vanishing/exploding gradients; write an HTML report"

_STYLE = {"holds": "bold green", "partly holds": "bold yellow", "does not hold": "bold red"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help="experiments to run (default: all; see --list)")
    parser.add_argument("--quick", action="store_true",
                        help="small set-ups that run in seconds (for tests; verdicts may differ)")
    parser.add_argument("-o", "--out", metavar="DIR", default="gradguard-lab",
                        help="where report.html and results.json go (default: ./gradguard-lab)")
    parser.add_argument("--lang", choices=("en", "ko"), default="en",
                        help="language of the table and the report: en (English) or ko (Korean)")
    parser.add_argument("--list", action="store_true", help="list the experiments and their claims, run nothing")
    parser.add_argument("--seeds", type=int, metavar="N", default=None,
                        help="seeds per experiment, for those that repeat over seeds (default: each one's own)")
    parser.add_argument("--seed", type=int, default=0, help="base random seed (default 0)")
    parser.epilog = ("examples: gradguard lab --list; gradguard lab sigmoid_derivative clipping_rnn "
                     "--quick -o out; gradguard lab --lang ko")


def _console(stderr: bool = False) -> Any:
    from rich.console import Console

    return Console(highlight=False, stderr=stderr)


def _error(msg: str) -> int:
    _console(stderr=True).print(f"error: {msg}", style="red", markup=False, soft_wrap=True)
    return 2


def _list(lang: str) -> int:
    from rich.table import Table

    from gradguard import lab

    ko = lang == "ko"
    tab = Table(title="실험 목록" if ko else "gradguard lab experiments", show_lines=True)
    # no_wrap keeps names whole where the width allows; overflow="fold" breaks them, never cuts
    # them with an ellipsis, where it does not (80 or 120 columns, Korean included)
    tab.add_column("이름" if ko else "name", style="bold", no_wrap=True, overflow="fold")
    tab.add_column("주장" if ko else "claim", overflow="fold")
    tab.add_column("출처" if ko else "source", overflow="fold")
    tab.add_column("시간 (빠른/전체)" if ko else "time quick/full", no_wrap=True, overflow="fold")
    for info in lab.list_experiments():
        tab.add_row(info.name, info.claim(lang), info.source,
                    f"~{info.seconds_quick:.0f} s / ~{info.seconds_full:.0f} s")
    con = _console()
    con.print(tab)
    return 0


def run(args: argparse.Namespace) -> int:
    if args.list:
        return _list(args.lang)
    from gradguard import lab

    try:
        infos = lab.list_experiments() if not args.names else [lab.get_experiment(n) for n in args.names]
    except ValueError as exc:
        return _error(str(exc))
    if args.seeds is not None and args.seeds < 1:
        return _error(f"--seeds must be at least 1, got {args.seeds}.")
    if args.seed < 0:
        return _error(f"--seed must be >= 0, got {args.seed}.")

    from rich.markup import escape
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from gradguard.report.lab import verdict_label, write_lab_report

    ko = args.lang == "ko"
    con = _console()
    results = []
    t0 = time.perf_counter()
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                  TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(),
                  console=_console(stderr=True), transient=True) as progress:
        task = progress.add_task("lab", total=len(infos))
        for info in infos:
            progress.update(task, description=f"{info.name} (~{info.seconds_quick if args.quick else info.seconds_full:.0f} s)")
            overrides = {}
            cfg = info.quick_config if args.quick else info.config
            if args.seeds is not None and hasattr(cfg, "n_seeds"):
                overrides["n_seeds"] = args.seeds
            results.append(lab.run(info.name, quick=args.quick, seed=args.seed, **overrides))
            progress.advance(task)
    seconds = time.perf_counter() - t0

    tab = Table(title=("gradguard 실험실 결과" if ko else "gradguard lab") + (" (quick)" if args.quick else ""))
    tab.add_column("실험" if ko else "experiment", style="bold", no_wrap=True, overflow="fold")
    tab.add_column("판정" if ko else "verdict", no_wrap=True, overflow="fold")
    tab.add_column("판정 근거 숫자" if ko else "deciding numbers", overflow="fold")
    tab.add_column("시간" if ko else "time", justify="right", no_wrap=True, overflow="fold")
    for r in results:
        tab.add_row(r.name, f"[{_STYLE[r.verdict]}]{escape(verdict_label(r.verdict, args.lang))}[/]",
                    escape(r.headline), f"{r.seconds:.1f} s")
    con.print(tab)
    html_path, json_path = write_lab_report(results, args.out, lang=args.lang, quick=args.quick,
                                            seed=args.seed, n_seeds=args.seeds, seconds=seconds)
    con.print(("보고서: " if ko else "report: ") + str(html_path), markup=False, soft_wrap=True)
    con.print(("결과: " if ko else "results: ") + str(json_path), markup=False, soft_wrap=True)
    con.print((f"총 {seconds:.0f}초" if ko else f"total {seconds:.0f} s"), markup=False)
    return 0
