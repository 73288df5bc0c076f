"""Headless Chromium (Debian's package) for tests that look at an HTML page as a person would.

``make test`` installs Chromium when it is missing and the machine allows it. Where it is still
missing, tests skip with that reason on a developer's machine but fail under CI (``CI=true``),
so a missing browser never hides a broken page in CI.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
          "--hide-scrollbars", "--allow-file-access-from-files", "--virtual-time-budget=5000"]


def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail("headless Chromium is missing in CI; `make test` should have installed it")
        pytest.skip("headless Chromium is not installed (`apt-get install chromium`); CI installs it")
    return exe


def _run(args: list[str], tmp: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, HOME=str(tmp))
    return subprocess.run([chromium(), *_FLAGS, f"--user-data-dir={tmp / 'profile'}", *args],
                          capture_output=True, text=True, timeout=120, env=env)


def screenshot(html: Path, out: Path, width: int = 1200, height: int = 1600) -> Path:
    """Render ``html`` and save a PNG screenshot at ``out``."""
    _run([f"--screenshot={out}", f"--window-size={width},{height}", html.resolve().as_uri()], out.parent)
    if not out.exists():
        raise AssertionError(f"Chromium wrote no screenshot for {html}")
    return out


def image_load_counts(html: Path, tmp: Path) -> tuple[int, int]:
    """(images decoded with a non-zero size, images on the page), as the browser sees them."""
    probe = tmp / f"probe-{html.stem}.html"
    script = ("<script>window.addEventListener('load',()=>{const i=[...document.images];"
              "document.body.setAttribute('data-imgs',i.filter(x=>x.complete&&x.naturalWidth>0).length"
              "+'/'+i.length);});</script>")
    probe.write_text(html.read_text(encoding="utf-8").replace("</body>", script + "</body>"), encoding="utf-8")
    dom = _run(["--dump-dom", probe.resolve().as_uri()], tmp).stdout
    m = re.search(r'data-imgs="(\d+)/(\d+)"', dom)
    if m is None:
        raise AssertionError(f"the page did not finish loading in Chromium: {dom[:300]!r}")
    return int(m.group(1)), int(m.group(2))


def is_blank(png: Path) -> bool:
    """True when the screenshot is one flat colour."""
    import matplotlib.image as mpimg

    img = mpimg.imread(str(png))
    return float(img[..., :3].std()) < 1e-3
