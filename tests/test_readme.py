"""Every Python snippet in the README runs: test snippets as tests, the others as scripts."""

from __future__ import annotations

import pathlib
import re

import pytest

from .conftest import run_inner

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"
SNIPPETS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
TESTS = [snippet for snippet in SNIPPETS if re.search(r"^(async )?def test_", snippet, flags=re.MULTILINE)]
SCRIPTS = [snippet for snippet in SNIPPETS if snippet not in TESTS]


def test_the_readme_has_snippets() -> None:
    assert len(TESTS) >= 3
    assert len(SCRIPTS) >= 2


@pytest.mark.parametrize("index", range(len(TESTS)))
def test_readme_test_snippet_passes(pytester: pytest.Pytester, index: int) -> None:
    pytester.makepyfile(**{f"test_readme_{index}": TESTS[index]})
    result = run_inner(pytester)
    outcomes = result.parseoutcomes()
    assert outcomes.get("passed", 0) >= 1, result.stdout.str()
    assert not outcomes.get("failed") and not outcomes.get("errors"), result.stdout.str()


@pytest.mark.parametrize("index", range(len(SCRIPTS)))
def test_readme_script_snippet_runs(index: int) -> None:
    exec(compile(SCRIPTS[index], f"README snippet {index}", "exec"), {"__name__": f"readme_{index}"})


def test_the_main_job_prints_what_the_readme_shows() -> None:
    import os
    import shutil
    import subprocess
    import sys

    text = README.read_text()
    command = re.search(r"^(pyncette-sim .*)$", text, flags=re.MULTILINE)
    shown = re.search(r"<!-- main-job:begin -->\n```text\n(.*?)\n```\n<!-- main-job:end -->", text, flags=re.DOTALL)
    assert command and shown
    script = shutil.which("pyncette-sim", path=os.path.dirname(sys.executable)) or "pyncette-sim"
    result = subprocess.run(
        [script, *command.group(1).split()[1:]],
        cwd=README.parent,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "110"},
        check=True,
    )
    printed = "\n".join(line.rstrip() for line in result.stdout.rstrip("\n").splitlines())
    assert printed == shown.group(1)
