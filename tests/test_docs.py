"""The repository stands alone: what the code and the docs cite lives in the repository.

The mathematics, conventions and contracts are docs/design.md, cited by section number
("docs/design.md §6" in code, "[design.md §6](design.md#6-...)" in the docs). Every section
cited must exist there, every link into a page's headings must resolve, and nothing may cite
a document that is not in the repository.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DESIGN = ROOT / "docs" / "design.md"
SECTION = "\u00a7"  # the section sign, spelled out so this file does not cite anything itself


def repo_files() -> list[Path]:
    """The repository's text files: the package, tests, benchmarks, docs and the top-level files."""
    files = [ROOT / name for name in ("README.md", "pyproject.toml", "asv.conf.json", ".ci/run")]
    for folder in ("fastgrad", "tests", "benchmarks", "docs"):
        for path in (ROOT / folder).rglob("*"):
            if path.suffix in {".py", ".md", ".toml", ".json", ".sh"} and "__pycache__" not in path.parts:
                files.append(path)
    return [f for f in files if f.is_file() and f != Path(__file__).resolve()]


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    in_code = False
    for line in page.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            in_code = not in_code
        m = None if in_code else re.match(r"#{1,6} (.+)", line)
        if m:
            s = slug(m.group(1))
            n = seen.get(s, 0)
            seen[s] = n + 1
            out.add(s if n == 0 else f"{s}-{n}")
    return out


def design_sections() -> set[int]:
    return {int(m) for m in re.findall(r"^## (\d+)\. ", DESIGN.read_text(encoding="utf-8"), flags=re.M)}


def test_design_has_its_ten_sections_in_order():
    numbers = [int(m) for m in re.findall(r"^## (\d+)\. ", DESIGN.read_text(encoding="utf-8"), flags=re.M)]
    assert numbers == list(range(1, 11))


def test_the_files_read_here_are_the_repository():
    names = {rel(f) for f in repo_files()}
    assert {"README.md", "fastgrad/api.py", "docs/design.md", "tests/test_api.py"} <= names
    assert len(names) > 80


@pytest.mark.parametrize("path", repo_files(), ids=rel)
def test_nothing_cites_a_document_outside_the_repository(path):
    text = path.read_text(encoding="utf-8")
    outside = [r"\b" + "DESIGN" + r"\b", r"shared/" + "DESIGN", r"design " + "brief"]
    for pattern in outside:
        hits = [text[max(m.start() - 30, 0) : m.end() + 30] for m in re.finditer(pattern, text)]
        assert not hits, f"{rel(path)} cites {hits[0]!r}: cite docs/design.md instead"


@pytest.mark.parametrize("path", repo_files(), ids=rel)
def test_every_cited_section_exists_in_design_md(path):
    sections = design_sections()
    # comment markers and line breaks between "design.md" and the section sign do not matter
    text = re.sub(r"\s*\n\s*(?:#\s*)?", " ", path.read_text(encoding="utf-8"))
    for m in re.finditer(SECTION + r"\s*(\d+)", text):
        before = text[max(m.start() - 40, 0) : m.start()]
        if "arXiv" in before:  # a section of a cited paper
            continue
        named = "design.md" in before or path == DESIGN  # design.md cites its own sections bare
        assert named, f"{rel(path)}: {text[max(m.start() - 40, 0) : m.end()]!r} names no document"
        assert int(m.group(1)) in sections, f"{rel(path)}: docs/design.md has no {SECTION}{m.group(1)}"


MARKDOWN = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@pytest.mark.parametrize("page", MARKDOWN, ids=rel)
def test_every_link_into_a_page_lands_on_a_heading(page):
    text = page.read_text(encoding="utf-8")
    for target, anchor in re.findall(r"\]\(([^)\s#]*)#([^)\s]+)\)", text):
        if target.startswith("http"):
            continue
        dest = page if not target else (page.parent / target).resolve()
        assert dest.is_file(), f"{rel(page)} links to {target}, which does not exist"
        assert anchor in anchors(dest), f"{rel(page)} links to {target}#{anchor}: no such heading"


ARCHITECTURE = ROOT / "docs" / "architecture.md"
VOCABULARY_MODULES = {  # a column of the vocabulary table, and the module a bare name in it lives in
    2: "fastgrad/cpu/kernels.py",
    3: "fastgrad/cuda/fused.py",
    4: None,  # the tiled column names each one's module: gemm.x, rows.x
}


def defined_functions(path: Path) -> set[str]:
    """Every function defined in ``path``, nested ones included (the CUDA kernels' bodies)."""
    import ast

    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)}


def test_the_vocabulary_table_names_functions_that_exist():
    """docs/architecture.md, "One vocabulary across the backends": every name in the CPU, fused and
    tiled columns is a function of that module (``gemm.x`` / ``rows.x`` of cuda/gemm.py, cuda/rows.py),
    and the step's own name is the CPU kernel's."""
    text = ARCHITECTURE.read_text(encoding="utf-8")
    section = text.split("## One vocabulary across the backends", 1)[1].split("\n## ", 1)[0]
    rows = [line.split(" | ") for line in section.splitlines() if line.startswith("| `")]
    assert len(rows) >= 10 and "to rename" not in section
    for cells in rows:
        step = cells[0].strip("| `")
        assert step in defined_functions(ROOT / VOCABULARY_MODULES[2]), step
        for col, default in VOCABULARY_MODULES.items():
            for module, name in re.findall(r"`(?:(gemm|rows)\.)?(\w+)`", cells[col]):
                assert module or default, f"{step}: {name} in the tiled column names no module"
                path = ROOT / "fastgrad" / "cuda" / f"{module}.py" if module else ROOT / default
                assert name in defined_functions(path), f"{step}: {name} is not a function of {rel(path)}"
