"""The line between the library's core and its applications (docs/architecture.md, "Layout").

Read from the source with ``ast``, so a violation fails here before anyone notices it in
an import-time profile: the core never imports ``fastgrad.tools``; the backends import
neither the API module nor the tools; the tools use only public names of the core.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "fastgrad"
COMMAND = {"__main__.py"}  # python -m fastgrad: the command, an application
CORE = [p for p in PACKAGE.rglob("*.py") if "tools" not in p.parts and p.name not in COMMAND]
BACKENDS = [*sorted((PACKAGE / "cpu").glob("*.py")), *sorted((PACKAGE / "cuda").glob("*.py"))]
TOOLS = sorted((PACKAGE / "tools").glob("*.py"))


def imports(path: Path) -> list[tuple[str, list[str]]]:
    """(absolute module, imported names) of every import in ``path``, relative ones resolved."""
    package = path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1]
    if path.name == "__init__.py":
        package = path.relative_to(PACKAGE.parent).parts[:-1]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = list(package[: len(package) - node.level + 1]) if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            out.append((module, [a.name for a in node.names]))
    return out


def test_the_layout_has_what_the_checks_below_read():
    assert len(CORE) > 10 and len(TOOLS) >= 5 and len(BACKENDS) >= 5
    assert imports(PACKAGE / "tools" / "cli.py")  # relative imports resolve to fastgrad.*


@pytest.mark.parametrize("path", CORE, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_the_core_never_imports_the_tools(path):
    for module, names in imports(path):
        assert not module.startswith("fastgrad.tools"), f"{path.name} imports {module}"
        assert not (module == "fastgrad" and "tools" in names), f"{path.name} imports fastgrad.tools"


@pytest.mark.parametrize("path", BACKENDS, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_backends_import_neither_the_api_nor_the_tools(path):
    for module, names in imports(path):
        assert module not in ("fastgrad.api",) and not module.startswith("fastgrad.tools"), path.name
        assert not (module == "fastgrad" and {"api", "tools"} & set(names)), path.name


@pytest.mark.parametrize("path", TOOLS, ids=lambda p: p.name)
def test_the_tools_use_only_public_names_of_the_core(path):
    for module, names in imports(path):
        if not module.startswith("fastgrad") or module.startswith("fastgrad.tools"):
            continue
        private = [n for n in names if n.startswith("_") and n != "__version__"]
        assert not private, f"{path.name} imports {private} from {module}"
        assert not any(part.startswith("_") for part in module.split(".")), f"{path.name} imports {module}"


def test_import_fastgrad_loads_no_backend():
    """docs/architecture.md: ``import fastgrad`` loads the core only; the backends' modules (``fastgrad.cpu``,
    whose import also chooses Numba's threading layer, and ``fastgrad.cuda``) load on their first call."""
    import subprocess
    import sys

    code = (
        "import sys, fastgrad\n"
        "backends = (['fastgrad', 'cpu'], ['fastgrad', 'cuda'])\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[:2] in backends)\n"
        "print(loaded)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
