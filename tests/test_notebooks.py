"""Run every tutorial notebook the way `nbdev-test` does (nbdev's test_nb), one pytest item per notebook.

Each notebook runs in its own Python process, as nbdev-test does: test_nb executes cells in the calling process,
so a notebook re-defining and re-registering a class (its exported cells) would otherwise leak into the tests and
notebooks that run after it (a model saved by the module's class, loaded by the notebook's).

nbdev-test itself prints no pytest summary; this wrapper gives CI a `N passed` line. Cells flagged with the
project's `tst_flags` (`notest`, `slow`) are skipped; set STAMPDEFECT_NB_FLAGS="slow" to run slow cells too.
"""
import os, subprocess, sys
from pathlib import Path

import pytest
from nbdev.config import get_config

ROOT = Path(__file__).resolve().parents[1]
CFG = get_config(ROOT)
NBS_DIR = ROOT / "nbs"


def _notebooks():
    for nb in sorted(NBS_DIR.rglob("*.ipynb")):
        rel = nb.relative_to(NBS_DIR)
        if any(part.startswith(("_", ".")) for part in rel.parts): continue   # nbdev skips these too
        if (nb.parent / ".notest").exists(): continue
        yield nb


NOTEBOOKS = list(_notebooks())
_RUNNER = """
import sys, nbdev.test as nbt
nb, skip, force, root = sys.argv[1], sys.argv[2].split(), sys.argv[3].split(), sys.argv[4]
ok, _ = nbt.test_nb(nb, skip_flags=skip, force_flags=force, basepath=root, do_print=False)
sys.exit(0 if ok else 1)
"""


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 3, NOTEBOOKS


@pytest.mark.notebooks
@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: str(p.relative_to(NBS_DIR)))
def test_notebook(nb, monkeypatch):
    monkeypatch.setenv("MPLBACKEND", "Agg")
    force = os.environ.get("STAMPDEFECT_NB_FLAGS", "").split()
    skip = [f for f in str(CFG.tst_flags).split() if f not in force]
    run = subprocess.run([sys.executable, "-c", _RUNNER, str(nb), " ".join(skip), " ".join(force), str(ROOT)],
                         capture_output=True, text=True, cwd=nb.parent)
    if run.returncode != 0:
        print(run.stdout[-20000:]); print(run.stderr[-20000:], file=sys.stderr)
    assert run.returncode == 0, f"{nb.name} failed (its output is printed above)"
