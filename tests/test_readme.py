"""The README renders and keeps its promises checkable: tables unbroken, the commands CI and the text rely
on present, every script it names present, no number left as a placeholder."""
from __future__ import annotations

import re

import pytest

from conftest import REPO_ROOT, import_reference

README = (REPO_ROOT / "README.md").read_text(encoding="utf-8")


def _tables(text: str) -> list[list[str]]:
    """Runs of consecutive lines starting with '|' (outside fenced code blocks)."""
    tables, current, fenced = [], [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        if not fenced and line.startswith("|"):
            current.append(line)
        elif current:
            tables.append(current)
            current = []
    return tables + ([current] if current else [])


def test_every_table_has_a_header_and_no_blank_line_inside():
    """A blank line inside a table ends it: the rows after it would render as text (they would form a
    block without the |---| separator line)."""
    tables = _tables(README)
    assert len(tables) >= 8
    for table in tables:
        assert len(table) >= 3 and re.fullmatch(r"\|(\s*:?-+:?\s*\|)+", table[1]), table[0]
        width = table[0].count("|")
        assert all(row.count("|") - row.count("\\|") >= width for row in table), table[0]


def test_the_commands_ci_and_the_text_rely_on_are_there():
    assert 'pip install -e ".[test]" && pip install --no-build-isolation youtokentome && python -m pytest' in README
    assert 'python -m pytest -m "not slow"' in README
    assert 'pip install torch torchvision --index-url https://download.pytorch.org/whl/cpu' in README
    assert README.startswith("# rudalle_pipe\n\n```bash\npip install . && rudalle-pipe generate")


def test_every_named_script_exists_and_no_placeholder_is_left():
    scripts = set(re.findall(r"benchmarks/(\w+\.py)", README))
    assert {"first_command.py", "offline_failure.py", "download_sizes.py"} <= scripts
    assert sorted(s for s in scripts if not (REPO_ROOT / "benchmarks" / s).is_file()) == []
    assert not re.search(r"\b(FIRST|FULL|FAST)_(QUIET|BUSY)\b|TODO|TBD", README)


def test_the_slow_marker_is_registered_and_used():
    assert '"slow: ' in (REPO_ROOT / "pyproject.toml").read_text()
    marked = sum(p.read_text(encoding="utf-8").count("@pytest.mark.slow") for p in (REPO_ROOT / "tests").glob("test_*.py"))
    assert marked >= 30


@pytest.mark.parametrize("ci", ["", "true"])
def test_a_missing_reference_skips_locally_and_fails_in_ci(ci, monkeypatch):
    monkeypatch.setenv("CI", ci)
    name = "rudalle_pipe_no_such_reference_module"
    if ci:
        with pytest.raises(ModuleNotFoundError, match=name):
            import_reference(name)
    else:
        with pytest.raises(pytest.skip.Exception, match="needs a C\\+\\+ compiler"):
            import_reference(name)
    assert import_reference("json").dumps([1]) == "[1]"
