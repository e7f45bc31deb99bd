"""The tree's layering (.importlinter) holds, and lint-imports really catches a violation of each contract."""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = ("qwenjax", "pallas_kernels", "server")


def lint(root: pathlib.Path) -> subprocess.CompletedProcess:
    """lint-imports over `root`'s packages (its own copy first on the path, so the installed one is not read)."""
    return subprocess.run([sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; "
                           "sys.exit(lint_imports_command())", "--no-cache"], cwd=root, capture_output=True,
                          text=True, env={"PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]),
                                          "PATH": "/usr/bin:/bin"}, timeout=300)


def test_the_tree_keeps_its_contracts():
    out = lint(ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "4 kept, 0 broken" in out.stdout


@pytest.fixture(scope="module")
def tree_copy(tmp_path_factory) -> pathlib.Path:
    """The packages' Python files and the contracts, copied (assets left out: the linter reads only imports)."""
    dst = tmp_path_factory.mktemp("tree")
    shutil.copy(ROOT / ".importlinter", dst)
    for pkg in PACKAGES:
        for src in (ROOT / pkg).rglob("*.py"):
            out = dst / src.relative_to(ROOT)
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, out)
    return dst


@pytest.mark.parametrize("module, line, broken", [
    ("qwenjax/core/sequence.py", "import jax", "core and sim are plain Python"),
    ("qwenjax/core/scheduler.py", "from qwenjax.worker import sampler", "core and sim are plain Python"),
    ("pallas_kernels/rms_norm.py", "from qwenjax.config import ModelConfig", "pallas_kernels import nothing"),
    ("qwenjax/models/qwen2.py", "from qwenjax.engine import llm_engine", "Layers:"),
    ("qwenjax/worker/kv_cache.py", "import server.app", "Layers:"),
])
def test_a_deliberate_violation_breaks_its_contract(tree_copy, module, line, broken):
    path = tree_copy / module
    original = path.read_text()
    try:
        path.write_text(original + f"\n{line}  # deliberate violation\n")
        out = lint(tree_copy)
    finally:
        path.write_text(original)
    assert out.returncode != 0
    report = out.stdout[out.stdout.index("Broken contracts"):]
    assert broken in report, report


def _modules() -> set[str]:
    return {str(p.relative_to(ROOT)) for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")
            if p.name != "__init__.py"}


def test_the_map_in_docs_lists_every_module_and_nothing_else():
    text = (ROOT / "docs" / "architecture.md").read_text()
    named = set(re.findall(r"`((?:qwenjax|pallas_kernels|server)/[\w/]+\.py)`", text))
    assert _modules() - named == set(), "modules missing from docs/architecture.md"
    assert named - _modules() - {"qwenjax/__init__.py"} == set(), "docs/architecture.md names modules that are gone"


DOCS = ["README.md", "docs/architecture.md", "docs/user_guide.md", "server/README.md", "benchmarks/README.md",
        *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "notebooks").glob("*.ipynb"))]


@pytest.mark.parametrize("doc", DOCS)
def test_every_path_a_doc_names_exists(doc):
    text = (ROOT / doc).read_text()
    paths = set(re.findall(r"\b((?:qwenjax|pallas_kernels|server|benchmarks|tests|scripts|notebooks|docs)/"
                           r"[\w/.-]*\w\.(?:py|md|ipynb|sh))\b", text))
    assert paths, f"{doc} names no path at all: the pattern is wrong"
    assert {p for p in paths if not (ROOT / p).exists()} == set()
