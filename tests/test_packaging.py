"""The wheel: SPDX licence metadata, the LICENSE file inside, and a build without warnings.

(`make wheel-check`, run by .ci/run, installs the wheel into a fresh venv and runs
`gradguard demo --quick` from it.)
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    out = tmp_path_factory.mktemp("dist")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONDONTWRITEBYTECODE", "PYTHONPATH")}
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-v", "-w", str(out), str(src)],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return next(out.glob("gradguard-*.whl")), r.stdout + r.stderr


def test_build_has_no_warnings(wheel: tuple[Path, str]) -> None:
    _, log = wheel
    # pip's own notes about this machine's extra package folders are not the build's
    lines = [ln for ln in log.splitlines()
             if ("warn" in ln.lower() or "deprecat" in ln.lower()) and "Location 'file:" not in ln]
    assert not lines, "\n".join(lines)


def test_spdx_license_and_license_file(wheel: tuple[Path, str]) -> None:
    path, _ = wheel
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        meta = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        lic = next(n for n in names if n.endswith(".dist-info/licenses/LICENSE"))
        assert "Apache License" in z.read(lic).decode()
        assert "gradguard/__main__.py" in names and "gradguard/lab/data/tinyshakespeare.txt" in names
    assert "License-Expression: Apache-2.0" in meta
    assert "Provides-Extra: wandb" in meta and "Provides-Extra: mlflow" in meta and "Provides-Extra: ko" in meta
