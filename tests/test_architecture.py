"""Rules `make lint` cannot state: no private name crosses a bdclean module, no test imports another, and the
package stays organised by concern (few top-level modules, each package saying what it is for).

A `_name` is private to the module that defines it. When another module needs it, it is no longer private:
rename it (no underscore) where it is defined, or move it to the module that should own it. Tests share code
through tests/helpers.py (and fixtures through conftest.py), never by importing another test module: that
couples unrelated test files, and a test function imported by name runs twice.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "backdoor_cli"
TESTS = REPO / "tests"
SHARED_TEST_MODULES = {"helpers", "conftest"}
# At most this many modules beside the packages of backdoor_cli/ (issue 23): a new module joins the package of
# its concern, or starts one, rather than growing a flat list again.
MAX_TOP_LEVEL_MODULES = 12


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imported_module(node: ast.ImportFrom, importer: str, is_package: bool) -> str:
    """The absolute name of the module a `from X import ...` reads from."""
    if node.level == 0:
        return node.module or ""
    base = importer.split(".")
    # `from . import` in a package's __init__ is relative to the package itself, elsewhere to the parent.
    base = base[: len(base) - node.level + (1 if is_package else 0)]
    return ".".join(base + ([node.module] if node.module else []))


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_imports(path: Path, text: str | None = None) -> list[str]:
    """`module (line N): from X import _name` for each private name this bdclean module (its source: `text`,
    else the file's) imports from another bdclean module."""
    importer = _module_name(path)
    text = path.read_text(encoding="utf-8") if text is None else text
    found = []
    for node in ast.walk(ast.parse(text, filename=str(path))):
        if not isinstance(node, ast.ImportFrom):
            continue
        source = _imported_module(node, importer, path.name == "__init__.py")
        if not (source == "backdoor_cli" or source.startswith("backdoor_cli.")) or source == importer:
            continue
        for alias in node.names:
            if _is_private(alias.name):
                found.append(f"{importer} (line {node.lineno}): from {source} import {alias.name}")
    return found


def test_module_names_resolve_as_python_does():
    init = PACKAGE / "models" / "__init__.py"
    hub = PACKAGE / "models" / "hub.py"
    rel = ast.parse("from .loading import x\nfrom ..errors import y\nfrom . import z").body
    assert [_imported_module(n, _module_name(init), True) for n in rel] == [
        "backdoor_cli.models.loading",
        "backdoor_cli.errors",
        "backdoor_cli.models",
    ]
    assert [_imported_module(n, _module_name(hub), False) for n in rel] == [
        "backdoor_cli.models.loading",
        "backdoor_cli.errors",
        "backdoor_cli.models",
    ]


def test_the_check_catches_a_private_import_and_only_that():
    text = (
        "import os\nfrom .loading import _secret, public\nfrom . import head as _head\nfrom torch import _C\n"
        "from .fake import _own\nfrom ..errors import __all__\n\n\ndef f():\n    from ..subject import _late\n"
    )
    assert private_imports(PACKAGE / "models" / "fake.py", text) == [
        "backdoor_cli.models.fake (line 2): from backdoor_cli.models.loading import _secret",
        "backdoor_cli.models.fake (line 10): from backdoor_cli.subject import _late",
    ]


def test_no_private_name_is_imported_across_bdclean_modules():
    modules = sorted(PACKAGE.rglob("*.py"))
    assert len(modules) > 40
    found = [hit for path in modules for hit in private_imports(path)]
    assert not found, (
        "private names imported from another module (make them public where they are defined, "
        "or move them to the module that uses them):\n  " + "\n  ".join(found)
    )


def test_no_test_module_imports_another():
    found = []
    test_modules = {p.stem for p in TESTS.glob("*.py")} - SHARED_TEST_MODULES
    for path in sorted(TESTS.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            found += [
                f"tests/{path.name} (line {node.lineno}): imports {name}"
                for name in names
                if name.split(".")[0] in test_modules
            ]
    assert not found, (
        "test modules import other test modules (move what they share to tests/helpers.py, "
        "fixtures to tests/conftest.py):\n  " + "\n  ".join(found)
    )


def test_few_modules_beside_the_packages():
    top = sorted(p.name for p in PACKAGE.glob("*.py") if p.name not in {"__init__.py", "__main__.py"})
    assert len(top) <= MAX_TOP_LEVEL_MODULES, (
        f"{len(top)} top-level modules in backdoor_cli/ (at most {MAX_TOP_LEVEL_MODULES}): move a module into the "
        "package of its concern (docs/architecture.md)\n  " + "\n  ".join(top)
    )


def test_every_package_says_what_it_is_for():
    packages = sorted(p.parent for p in PACKAGE.rglob("__init__.py"))
    assert len(packages) > 5
    missing = [
        str(package.relative_to(REPO))
        for package in packages
        if not ast.get_docstring(ast.parse((package / "__init__.py").read_text(encoding="utf-8")))
    ]
    assert not missing, "packages whose __init__.py has no docstring (one line on its job):\n  " + "\n  ".join(missing)


def test_every_package_directory_is_a_package():
    """A directory of modules without __init__.py would be a namespace package the checks above never see."""
    orphans = [
        str(d.relative_to(REPO))
        for d in PACKAGE.rglob("*")
        if d.is_dir() and d.name != "__pycache__" and any(d.glob("*.py")) and not (d / "__init__.py").exists()
    ]
    assert not orphans, "directories of modules without an __init__.py:\n  " + "\n  ".join(orphans)


def test_no_module_of_the_package_is_git_ignored():
    """An ignored module (a package named like an ignored output folder, `runs/`) is left out of commits, and
    ruff, which honours .gitignore, silently skips it."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    paths = [str(p.relative_to(REPO)) for p in sorted(PACKAGE.rglob("*.py"))]
    out = subprocess.run(
        ["git", "check-ignore", "--no-index", "--stdin"],
        input="\n".join(paths),
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert out.returncode in (0, 1), out.stderr
    assert not out.stdout.split(), "modules of backdoor_cli that .gitignore ignores:\n  " + out.stdout
