"""The README and docs/ as a newcomer meets them: every Python block runs on its own, as
written, from the repository root; every ``bash`` block runs as written in a fresh directory
that sees the repository's ``benchmarks/``; every relative link resolves; docs/cli.md is what
the parsers print today; the README stays a landing page (at most 150 lines).

Shell blocks that install packages, need the user's own files (``my_pipe/``) or a running
server are ``console`` blocks: shown, not run (their commands are exercised by the CLI and
serving tests)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCKS = [
    (page.relative_to(ROOT), block)
    for page in PAGES
    for block in re.findall(r"```python\n(.*?)```", page.read_text(), re.S)
]
SHELL_BLOCKS = [
    (page.relative_to(ROOT), block)
    for page in PAGES
    for block in re.findall(r"```bash\n(.*?)```", page.read_text(), re.S)
]
sys.path.insert(0, str(ROOT / "scripts"))
from cli_docs import DOCS, cli_markdown  # noqa: E402


def test_the_readme_is_a_landing_page_with_examples():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 150
    assert sum(page == Path("README.md") for page, _ in BLOCKS) >= 2


@pytest.mark.parametrize("index", range(len(BLOCKS)), ids=lambda i: f"{BLOCKS[i][0]}:{BLOCKS[i][1][:30]}")
def test_a_python_block_runs_on_its_own(index, tmp_path):
    page, block = BLOCKS[index]
    script = tmp_path / "block.py"
    script.write_text(block)
    result = subprocess.run(
        [sys.executable, str(script)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"},
    )
    assert result.returncode == 0, f"{page} block {index}:\n{block}\n{result.stderr[-3000:]}"


@pytest.mark.parametrize(
    "index", range(len(SHELL_BLOCKS)), ids=lambda i: f"{SHELL_BLOCKS[i][0]}:{SHELL_BLOCKS[i][1][:30]}"
)
def test_a_bash_block_runs_as_written(index, tmp_path):
    page, block = SHELL_BLOCKS[index]
    (tmp_path / "benchmarks").symlink_to(ROOT / "benchmarks")
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"  # the diffopt this Python runs
    result = subprocess.run(
        ["bash", "-e", "-c", block],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "PATH": path},
    )
    assert result.returncode == 0, f"{page}:\n{block}\n{result.stderr[-3000:]}"


def test_every_relative_link_resolves():
    broken = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s#]+)", page.read_text()):
            if not target.startswith(("http://", "https://", "mailto:")) and not (page.parent / target).exists():
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not broken, broken


def test_the_cli_page_is_current():
    assert DOCS.read_text() == cli_markdown(), "docs/cli.md is stale: run python scripts/cli_docs.py"
