"""The package imports as a DAG: every module imports on its own in a fresh interpreter, and an import
inside a function that points back into the package says why in a comment."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "aidetect_batch"


def _dotted(path: pathlib.Path) -> str:
    """``scan/runner.py`` → ``scan.runner``; a package's ``__init__.py`` → the package; the top one → ``""``."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = sorted(_dotted(p) for p in PACKAGE.rglob("*.py") if p.stem != "__main__" and _dotted(p))

# Each module is imported with the package cleared from sys.modules first, so an import cycle shows up
# whichever module is imported first; third-party modules stay loaded, which keeps this to seconds.
_IMPORT_EACH = """
import importlib, sys
failed = []
for name in sys.argv[1:]:
    for loaded in [m for m in sys.modules if m == "aidetect_batch" or m.startswith("aidetect_batch.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module("aidetect_batch." + name)
    except Exception as exc:
        failed.append(f"{name}: {type(exc).__name__}: {exc}")
print("\\n".join(failed))
sys.exit(1 if failed else 0)
"""


def test_every_module_imports_on_its_own_in_a_fresh_interpreter():
    done = subprocess.run([sys.executable, "-c", _IMPORT_EACH, *MODULES], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]


def _inner_package_imports(path: pathlib.Path) -> list[tuple[int, str]]:
    """(line, text) of each import inside a function that names this package, without a comment in it."""
    source = path.read_text()
    lines = source.splitlines()
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for inner in ast.walk(node):
            if isinstance(inner, ast.ImportFrom):
                names = [inner.module or ""] if inner.level == 0 else ["aidetect_batch"]
            elif isinstance(inner, ast.Import):
                names = [alias.name for alias in inner.names]
            else:
                continue
            own = any(n == "aidetect_batch" or n.startswith("aidetect_batch.") for n in names)
            if own and not any("#" in line for line in lines[inner.lineno - 1 : inner.end_lineno]):
                found.append((inner.lineno, lines[inner.lineno - 1].strip()))
    return sorted(set(found))


def test_imports_inside_functions_that_point_back_into_the_package_say_why():
    unexplained = {str(p.relative_to(PACKAGE)): _inner_package_imports(p) for p in PACKAGE.rglob("*.py")}
    assert not {k: v for k, v in unexplained.items() if v}


# The packages in the order the data flows: a unit may import only units of a lower rank (and itself).
# The base modules on top of the package serve everyone; the CLI and the upload page sit above everything.
RANKS = {
    **dict.fromkeys(("__init__", "errors", "schema", "storage", "config", "runtime"), 0),
    **dict.fromkeys(("inputs", "media"), 1),
    "detectors": 2,
    "report": 3,
    "scan": 4,
    "train": 5,
    "bench": 6,
    "serve_config": 6,  # the upload page's config, which the CLI builds without loading the page
    "serve": 7,
    "cli": 8,
    "__main__": 9,
}


def _unit(module: str) -> str:
    """The package (or top-level module) that ``aidetect_batch.X[.Y]`` belongs to."""
    return module.split(".")[1] if module.count(".") else "__init__"


def _imported_units(path: pathlib.Path) -> set[str]:
    units = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "aidetect_batch":
                units.update(alias.name for alias in node.names)
            elif node.module.startswith("aidetect_batch."):
                units.add(_unit(node.module))
        elif isinstance(node, ast.Import):
            units.update(_unit(a.name) for a in node.names if a.name.startswith("aidetect_batch."))
    return units


def test_every_unit_has_a_rank():
    units = {
        _unit("aidetect_batch." + ".".join(p.relative_to(PACKAGE).with_suffix("").parts)) for p in PACKAGE.rglob("*.py")
    }
    assert units == set(RANKS), "a new package or top-level module needs its place in RANKS"


def test_imports_between_packages_go_one_way():
    """Inside a function or at the top, no unit imports one of its own rank or above: the flow has no cycle."""
    wrong = []
    for path in PACKAGE.rglob("*.py"):
        own = _unit("aidetect_batch." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts))
        for other in _imported_units(path) - {own}:
            if RANKS[other] >= RANKS[own] and RANKS[own] > 0 or RANKS[other] > RANKS[own]:
                wrong.append(f"{path.relative_to(PACKAGE)} ({own}) imports {other}")
    assert not wrong, "\n".join(sorted(wrong))
