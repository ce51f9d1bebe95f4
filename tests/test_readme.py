"""The README's examples run as written (a promise in the docs is a test)."""

from __future__ import annotations

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def examples() -> list[str]:
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Example") :]
    section = section[: section.index("\n## ", 1)] if "\n## " in section[1:] else section
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_the_readme_has_a_numpy_and_a_torch_example():
    codes = examples()
    assert len(codes) == 2
    assert "fastgrad.Step(" in codes[0] and "fastgrad.torch.GradStep(" in codes[1]


def test_the_readme_numpy_example_runs(capsys):
    exec(compile(examples()[0], "README.md", "exec"), {})
    assert "mean_error" in capsys.readouterr().out


def test_the_readme_torch_example_runs_and_fills_p_grad():
    pytest.importorskip("torch")
    scope: dict = {}
    exec(compile(examples()[1], "README.md", "exec"), scope)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in scope["model"].parameters())
    assert isinstance(scope["loss"], float) and scope["loss"] > 0
