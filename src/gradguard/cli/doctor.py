"""``gradguard doctor FILE_OR_MODULE:FACTORY``: diagnose a model that a factory function builds.

The factory takes no arguments and returns the model, the loss function and the data, and
optionally an optimizer, either

* as a tuple ``(model, loss_fn, data)`` or ``(model, loss_fn, data, optimizer)``, or
* as a dict with keys ``model``, ``loss_fn``, ``data`` and optionally ``optimizer``, ``steps``,
  ``step_fn`` (then ``loss_fn`` may be left out), ``scheduler`` and ``clip`` — the arguments of
  :func:`gradguard.diagnose` of the same names.

``data`` is one ``(inputs, targets)`` batch or an iterable of them, exactly as for
:func:`gradguard.diagnose`. Example::

    # sick.py
    def make():
        net = ...
        return net, torch.nn.functional.cross_entropy, batches, torch.optim.SGD(net.parameters(), lr=0.1)

    $ gradguard doctor sick.py:make --try-remedies --lang ko --html report.html
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any

from gradguard.cli._render import (
    add_lang,
    add_report_files,
    console,
    error,
    exit_status,
    print_report,
    progress_bar,
    write_report_files,
)

HELP = "diagnose a model built by FILE_OR_MODULE:FACTORY (vanishing/exploding gradients, causes, remedies)"

_KEYS = ("model", "loss_fn", "data", "optimizer", "steps", "step_fn", "scheduler", "clip")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", metavar="FILE_OR_MODULE:FACTORY",
                        help="e.g. sick.py:make or mypkg.models:make_debug_setup; the factory "
                             "returns (model, loss_fn, data[, optimizer]) or a dict with those keys")
    parser.add_argument("--steps", type=int, default=None,
                        help="training steps with an optimizer (default: the factory's, else 30)")
    parser.add_argument("--try-remedies", action="store_true",
                        help="apply each plausible remedy to a fresh copy and measure its effect")
    add_report_files(parser)
    parser.add_argument("--seed", type=int, default=0, help="seed of the doctor's runs (default 0)")
    parser.add_argument("--max-seconds", type=float, default=None,
                        help="time budget: remedies not started by then are listed as not tried")
    add_lang(parser)
    parser.epilog = ("exit status: 0 no error-level finding, 1 at least one, 2 bad usage or input. "
                     "example: gradguard doctor sick.py:make --try-remedies --lang ko")


class UsageError(Exception):
    """A problem with the command line or the factory; printed without a traceback (exit 2)."""


def _fail(msg: str) -> Any:
    raise UsageError(msg)


def load_factory(spec: str) -> Any:
    """The callable named by ``FILE_OR_MODULE:FACTORY``."""
    if ":" not in spec:
        _fail(
            f"error: {spec!r} is not FILE_OR_MODULE:FACTORY; add the factory's name after a colon, "
            "e.g. sick.py:make"
        )
    where, _, name = spec.rpartition(":")
    path = Path(where)
    if where.endswith(".py") or path.exists():
        if not path.is_file():
            _fail(f"error: file {where!r} does not exist.")
        mod_name = f"_gradguard_factory_{path.stem}"
        loader = importlib.util.spec_from_file_location(mod_name, path)
        if loader is None or loader.loader is None:  # pragma: no cover
            _fail(f"error: cannot import {where!r} as Python.")
        module = importlib.util.module_from_spec(loader)
        sys.modules[mod_name] = module
        sys.path.insert(0, str(path.resolve().parent))
        try:
            loader.loader.exec_module(module)
        except Exception as e:  # the user's file is input: exit 2 with one line
            _fail(f"error: importing {where!r} raised {type(e).__name__}: {e}")
        finally:
            sys.path.pop(0)
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as e:
            _fail(f"error: cannot import module {where!r}: {e}")
        except Exception as e:
            _fail(f"error: importing module {where!r} raised {type(e).__name__}: {e}")
    fn = getattr(module, name, None)
    if fn is None:
        public = sorted(n for n in vars(module) if not n.startswith("_") and callable(getattr(module, n)))
        _fail(f"error: {where!r} has no {name!r}; callables there: {public[:12]}")
    if not callable(fn):
        _fail(f"error: {spec!r} is a {type(fn).__name__}, not a function.")
    return fn


def unpack(result: Any, spec: str) -> dict[str, Any]:
    """Normalise a factory's return value to a dict with model, loss_fn, data, optimizer, steps."""
    if isinstance(result, dict):
        unknown = sorted(set(result) - set(_KEYS))
        need = ("model", "data") if "step_fn" in result else ("model", "loss_fn", "data")
        missing = [k for k in need if k not in result]
        if unknown or missing:
            _fail(
                f"error: the dict returned by {spec} must have keys model, loss_fn, data "
                f"(and optionally optimizer, steps, step_fn, scheduler, clip); missing "
                f"{missing}, unknown {unknown}."
            )
        out = dict(result)
    elif isinstance(result, (tuple, list)) and len(result) in (3, 4):
        out = dict(zip(("model", "loss_fn", "data", "optimizer"), result))
    else:
        got = f"a {type(result).__name__}" + (f" of length {len(result)}"
                                              if isinstance(result, (tuple, list)) else "")
        _fail(
            f"error: {spec} returned {got}; return (model, loss_fn, data), "
            "(model, loss_fn, data, optimizer) or a dict with those keys."
        )
    out.setdefault("optimizer", None)
    return out


def run(args: argparse.Namespace) -> int:
    from gradguard.doctor import diagnose

    con = console()
    try:
        setup = unpack(load_factory(args.target)(), args.target)
        steps = args.steps if args.steps is not None else int(setup.get("steps") or 30)
        with progress_bar(con, "doctor", args.lang) as update:
            report = diagnose(setup["model"], setup.get("loss_fn"), setup["data"],
                              setup["optimizer"], steps=steps, try_remedies=args.try_remedies,
                              step_fn=setup.get("step_fn"), scheduler=setup.get("scheduler"),
                              clip=setup.get("clip"), max_seconds=args.max_seconds,
                              lang=args.lang, seed=args.seed, progress=update)
    except (UsageError, TypeError, ValueError) as e:
        return error(str(e))
    print_report(con, report, args.lang)
    write_report_files(con, report, args)
    return exit_status(report)
