"""The ``gradguard`` command line: one module per subcommand in this package.

Each subcommand module defines ``HELP`` (one line), ``add_arguments(parser)`` and
``run(args) -> int``. Modules are found by name, so adding a file adds a subcommand. The CLI owns
the terminal (rich output); the library underneath only returns data and logs.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys
from collections.abc import Sequence

__all__ = ["main"]


def _subcommands() -> dict[str, object]:
    pkg = sys.modules[__name__]
    mods = {}
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        mods[info.name] = importlib.import_module(f"{__name__}.{info.name}")
    return mods


def build_parser() -> argparse.ArgumentParser:
    from gradguard import __version__

    parser = argparse.ArgumentParser(
        prog="gradguard",
        description="Measure, treat, diagnose and demonstrate vanishing and exploding gradients.",
    )
    parser.add_argument("--version", action="version", version=f"gradguard {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, mod in _subcommands().items():
        p = sub.add_parser(name, help=mod.HELP, description=mod.HELP)  # type: ignore[attr-defined]
        mod.add_arguments(p)  # type: ignore[attr-defined]
        p.set_defaults(_run=mod.run)  # type: ignore[attr-defined]
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.command is None:
        parser.print_help()
        return 0
    return int(args._run(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
