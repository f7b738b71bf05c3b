"""The package imports as a DAG: every module imports on its own in a fresh interpreter, and an import
inside a function that points back into the package says why in a comment."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "aidetect_batch"
MODULES = sorted(
    ".".join(p.relative_to(PACKAGE).with_suffix("").parts).removesuffix("__init__").rstrip(".")
    for p in PACKAGE.rglob("*.py")
    if p.stem != "__main__" and p.parent != PACKAGE or p.stem not in ("__init__", "__main__")
)

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
    unexplained = {p.name: _inner_package_imports(p) for p in PACKAGE.rglob("*.py")}
    assert not {k: v for k, v in unexplained.items() if v}
