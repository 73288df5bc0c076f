"""``gradguard demo``: a network that cannot learn, diagnosed, treated, and trained back to health.

A deep sigmoid MLP with the old U[±1/√fan_in] initialisation (the set-up of Glorot & Bengio 2010)
is trained with SGD on scikit-learn's handwritten digits (offline, bundled with scikit-learn). The
doctor names the problem, tries each remedy on a copy and compares them; the best one is then
trained for a few epochs and its test accuracy is reported beside the sick network's. The
findings are printed and a self-contained ``report.html`` is written.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any

from gradguard.cli._render import add_lang, console, print_report, progress_bar

HELP = "diagnose and cure a deep sigmoid network on handwritten digits (about 20 s on 2 CPU cores)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_lang(parser)
    parser.add_argument("-o", "--out", metavar="DIR", default=".",
                        help="where report.html (and report.json) go (default: .)")
    parser.add_argument("--quick", action="store_true",
                        help="a smaller network and fewer steps (for tests)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.epilog = "example: gradguard demo --lang ko -o demo_out"


def _data(seed: int) -> tuple[Any, Any, Any, Any]:
    import torch
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x_tr, x_te, y_tr, y_te = train_test_split(d.data, d.target, test_size=0.3,
                                              stratify=d.target, random_state=seed)
    x_tr = torch.tensor(x_tr, dtype=torch.float32)
    x_te = torch.tensor(x_te, dtype=torch.float32)
    mean, std = x_tr.mean(0), x_tr.std(0) + 1e-6
    return ((x_tr - mean) / std, torch.tensor(y_tr), (x_te - mean) / std, torch.tensor(y_te))


def sick_network(depth: int, width: int, seed: int) -> Any:
    """``depth`` sigmoid layers with the old U[-1/sqrt(fan_in), 1/sqrt(fan_in)] init, zero biases."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    n = 64
    for _ in range(depth):
        lin = nn.Linear(n, width)
        nn.init.uniform_(lin.weight, -1 / math.sqrt(n), 1 / math.sqrt(n))
        nn.init.zeros_(lin.bias)
        layers += [lin, nn.Sigmoid()]
        n = width
    out = nn.Linear(n, 10)
    nn.init.uniform_(out.weight, -1 / math.sqrt(n), 1 / math.sqrt(n))
    nn.init.zeros_(out.bias)
    return nn.Sequential(*layers, out)


def _batches(x: Any, y: Any, n: int, bs: int, seed: int) -> list[tuple[Any, Any]]:
    import torch

    g = torch.Generator().manual_seed(seed)
    out = []
    while len(out) < n:
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x) - bs + 1, bs):
            out.append((x[perm[i:i + bs]], y[perm[i:i + bs]]))
    return out[:n]


def _train(model: Any, opt: Any, batches: list[tuple[Any, Any]], clip: float | None,
           tick: Any) -> None:
    import torch.nn.functional as F

    from gradguard.clip import clip_grad_norm_

    model.train()
    for i, (x, y) in enumerate(batches):
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        if clip is not None:
            clip_grad_norm_(model.parameters(), clip)
        opt.step()
        tick(i + 1)


def _accuracy(model: Any, x: Any, y: Any) -> float:
    import torch

    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(-1) == y).float().mean())


def run(args: argparse.Namespace) -> int:
    import copy

    import torch
    import torch.nn.functional as F

    from gradguard import messages as M
    from gradguard.doctor import diagnose, prescribe

    # The demo's network is tiny: one thread is fastest, and on a busy machine extra OpenMP
    # threads spin-wait (measured 20x slower per step on a loaded 2-core box).
    torch.set_num_threads(1)
    lang = args.lang
    con = console()
    t0 = time.perf_counter()
    depth, width = (6, 48) if args.quick else (8, 64)
    steps = 20 if args.quick else 40
    epochs = 4 if args.quick else 25
    lr = 0.05
    con.rule(M.ui("demo_title", lang))
    con.print(M.ui("demo_intro", lang, depth=depth), markup=False)
    x_tr, y_tr, x_te, y_te = _data(args.seed)
    model = sick_network(depth, width, args.seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    batches = _batches(x_tr, y_tr, steps, 64, args.seed)
    with progress_bar(con, M.ui("demo_diagnosing", lang), lang) as update:
        report = diagnose(model, F.cross_entropy, batches, opt, steps=steps, try_remedies=True,
                          lang=lang, seed=args.seed, progress=update)
    print_report(con, report, lang)

    best = report.prescription
    per_epoch = len(x_tr) // 64
    train = _batches(x_tr, y_tr, epochs * per_epoch, 64, args.seed + 1)
    base_model = copy.deepcopy(model)
    base_opt = torch.optim.SGD(base_model.parameters(), lr=lr, momentum=0.9)
    acc_best = math.nan
    with progress_bar(con, M.ui("demo_training", lang), lang) as update:
        torch.manual_seed(args.seed)
        _train(base_model, base_opt, train, None, lambda d: update("baseline", d, len(train)))
        if best is not None:
            pres = prescribe(model, best.remedy, batches[0], opt, lr_factor=best.factor)
            clip = report.metadata.get("clip_norm") if pres.clip else None
            torch.manual_seed(args.seed)
            _train(pres.model, pres.optimizer, train, clip,
                   lambda d: update(best.remedy, d, len(train)))
            acc_best = _accuracy(pres.model, x_te, y_te)
    acc_base = _accuracy(base_model, x_te, y_te)
    if best is None:
        con.print(M.ui("demo_no_remedy", lang))
    else:
        con.print(M.ui("demo_best", lang, remedy=M.remedy_title(best.remedy, lang)), style="bold",
                  markup=False)
        con.print(M.ui("demo_accuracy", lang, epochs=epochs, acc=f"{acc_best:.1%}",
                       remedy=M.remedy_title(best.remedy, lang), base=f"{acc_base:.1%}"),
                  style="bold green", markup=False)
    report.metadata.update({"demo_best_remedy": best.remedy if best else None,
                            "demo_test_accuracy": round(acc_best, 4),
                            "demo_baseline_test_accuracy": round(acc_base, 4),
                            "demo_epochs": epochs, "demo_seconds": round(time.perf_counter() - t0, 1)})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report.to_html(out / "report.html", lang=lang)
    report.to_json(out / "report.json")
    con.print(M.ui("wrote", lang, path=str(out / "report.html")), markup=False)
    return 0
