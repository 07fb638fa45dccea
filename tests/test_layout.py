"""The checkout claims no import name but ``bitcompile`` (and its own ``tests``).

Python started in the repository root (``python -m pytest``, a notebook or REPL there) puts
the root first on ``sys.path``: a top-level folder with an ``__init__.py``, or a top-level
``.py`` file, would then be found before an installed distribution of the same name
(Hugging Face's ``kernels``, which transformers imports, broke the suite that way).
"""

import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import bitcompile

ROOT = Path(__file__).resolve().parents[1]
OWN_NAMES = {"bitcompile", "tests"}


def importable_top_level_names(root: Path) -> set[str]:
    """Names ``import NAME`` would resolve to a regular package or module in ``root``."""
    names = set()
    for entry in root.iterdir():
        if entry.name.startswith("."):
            continue
        if entry.is_dir() and (entry / "__init__.py").exists():
            names.add(entry.name)
        elif entry.suffix == ".py":
            names.add(entry.stem)
    return names


def test_only_own_names_are_importable_from_the_root():
    assert importable_top_level_names(ROOT) <= OWN_NAMES


def test_installed_distributions_win_over_repository_folders(tmp_path):
    """Stand-in distributions named after every top-level folder of the checkout resolve to
    the stand-ins, not to the folder, from a Python started in the repository root."""
    folders = sorted(e.name for e in ROOT.iterdir() if e.is_dir() and e.name.isidentifier() and e.name not in OWN_NAMES)
    assert {"examples", "benchmarks"} <= set(folders)
    names = sorted(set(folders) | {"kernels", "passes"})
    for name in names:
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text("STAND_IN = True\n")
    probe = (
        "import importlib, json, sys\n"
        f"names = {names!r}\n"
        "print(json.dumps({n: getattr(importlib.import_module(n), 'STAND_IN', False) for n in names}))\n"
    )
    env = {"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    resolved = json.loads(out.stdout)
    assert resolved == {n: True for n in names}


def test_the_suite_imports_the_installed_package():
    """``bitcompile`` comes from where the installed distribution says: the checkout for an
    editable install, site-packages otherwise (never the checkout by accident)."""
    dist = importlib.metadata.distribution("bitcompile")
    direct_url = json.loads(dist.read_text("direct_url.json") or "{}")
    imported = Path(bitcompile.__file__).resolve().parent
    if direct_url.get("dir_info", {}).get("editable"):
        source = Path(direct_url["url"].removeprefix("file://")).resolve()
        assert imported == source / "bitcompile"
    else:
        assert imported == Path(dist.locate_file("bitcompile")).resolve()
