"""The ``gradguard`` command line: one module per subcommand in this package.

Each subcommand module defines ``HELP`` (one line), ``add_arguments(parser)`` and
``run(args) -> int``. Modules are found by name, so adding a file adds a subcommand. The CLI owns
the terminal (rich output); the library underneath only returns data and logs.

Exit status, the same for every command (docs/cli.md):

* 0 — done, and no error-level finding;
* 1 — at least one error-level finding (``doctor``, ``report``);
* 2 — bad usage or input: a wrong option, no command (help is printed), an input that is a
  directory, garbage or empty, an ``--html``/``--json``/``--out`` path that cannot be written
  (checked before any work starts), a user file that raises on import, or any unexpected
  exception (one line; ``--debug`` prints the traceback).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys
import traceback
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


def _add_common(parser: argparse.ArgumentParser, *, top: bool) -> None:
    # The subcommands take the same flags, so `gradguard doctor x --debug` works too; SUPPRESS
    # keeps a subparser from overwriting a flag given before the command.
    default = False if top else argparse.SUPPRESS
    parser.add_argument("-v", "--verbose", action="store_true", default=default,
                        help="log at INFO level")
    parser.add_argument("--debug", action="store_true", default=default,
                        help="on an unexpected error, print the traceback (exit status stays 2)")


def build_parser() -> argparse.ArgumentParser:
    from gradguard import __version__

    parser = argparse.ArgumentParser(
        prog="gradguard",
        description="Measure, treat, diagnose and demonstrate vanishing and exploding gradients.",
        epilog="exit status: 0 no error-level finding, 1 an error-level finding, 2 bad usage or "
               "input (or an unexpected error; --debug shows its traceback).",
    )
    parser.add_argument("--version", action="version", version=f"gradguard {__version__}")
    _add_common(parser, top=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, mod in _subcommands().items():
        p = sub.add_parser(name, help=mod.HELP, description=mod.HELP)  # type: ignore[attr-defined]
        mod.add_arguments(p)  # type: ignore[attr-defined]
        _add_common(p, top=False)
        p.set_defaults(_run=mod.run)  # type: ignore[attr-defined]
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit status (0, 1 or 2; see the module docstring)."""
    from gradguard.cli._render import check_outputs, error

    parser = build_parser()
    args = parser.parse_args(argv)  # bad usage: argparse prints it and exits with 2
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.command is None:
        parser.print_help()
        return 2
    try:
        problem = check_outputs(args)  # before any work: a diagnosis must not be thrown away
        if problem is not None:
            return error(problem)
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        return error("interrupted.")
    except ImportError as e:  # a core-only install: name the extra, in one line
        if "pip install" in str(e):  # gradguard's own message already says which extra
            return error(str(e))
        if (e.name or "").split(".")[0] in _REPORT_EXTRA:
            return error(f'this command needs {e.name.split(".")[0]}: pip install "gradguard[report]"')
        return _unexpected(e, args.debug)
    except Exception as e:  # the contract: one line, exit 2; --debug shows where
        return _unexpected(e, args.debug)


#: The top-level modules of the ``report`` extra (pyproject.toml); scikit-learn imports as sklearn.
_REPORT_EXTRA = {"rich", "matplotlib", "numpy", "sklearn", "mnist1d"}


def _unexpected(e: Exception, debug: bool) -> int:
    from gradguard.cli._render import error

    if debug:
        traceback.print_exc()
        return 2
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return error(f"{type(e).__name__}: {text}".rstrip(": ")
                 + " (run again with --debug for the traceback)")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
