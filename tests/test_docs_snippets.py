"""The ```python blocks of every docs/*.md page run, in order, in one namespace per page.

As tests/test_readme.py does for README.md, so the pages cannot drift from the
API. A page runs as a reader pasting its blocks into one session would, in a
temporary working directory (the checkpoints and plots it writes land there),
with jaxprune's warnings as errors (tests/conftest.py). A page that lays params
out on a mesh runs in a fresh interpreter with that many simulated CPU devices.
Tracebacks name the page and its line.

A block whose first line starts with ``# not run:`` (then the reason) is shown
to readers but not run. Every page must run at least one block and at least one
``assert``, so that it checks something the page claims.
"""

import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

DOCS = pathlib.Path(__file__).resolve().parent.parent / "docs"
NOT_RUN = "# not run:"
# Pages whose meshes need more devices than this process has: CPU devices to simulate.
DEVICES = {"scale.md": 8}

# Runs the blocks it reads from stdin ([[filename, code], ...]) in one namespace,
# with tests/conftest.py's warning filters.
RUNNER = r"""
import json, sys, warnings

warnings.simplefilter("error")
warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"(?!jaxprune)")
warnings.filterwarnings("ignore", category=FutureWarning, module=r"(?!jaxprune)")
namespace = {"__name__": "__main__"}
for filename, code in json.load(sys.stdin):
    exec(compile(code, filename, "exec"), namespace)
"""


def _blocks(page: pathlib.Path) -> list[tuple[int, str]]:
    """Returns (line of its first code line, code) for each ```python block of ``page``."""
    text = page.read_text()
    return [
        (text.count("\n", 0, m.start(1)) + 1, m.group(1))
        for m in re.finditer(r"^```python\n(.*?)^```", text, flags=re.S | re.M)
    ]


PAGES = sorted(p for p in DOCS.glob("*.md") if _blocks(p))


def test_pages_found():
    assert {"checkpoint.md", "scale.md", "structured.md"} <= {p.name for p in PAGES}
    assert set(DEVICES) <= {p.name for p in PAGES}


def test_not_run_marker_is_honoured(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("```python\n# not run: a signature\nf(x)\n```\n\n```python\ny = 1\n```\n")
    assert _blocks(page) == [(2, "# not run: a signature\nf(x)\n"), (7, "y = 1\n")]
    assert [code for _, code in _blocks(page) if _runs(code)] == ["y = 1\n"]


def _runs(code: str) -> bool:
    return not code.startswith(NOT_RUN)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_docs_page_runs(page, tmp_path, monkeypatch):
    # Leading newlines put each block at its own lines, so tracebacks point into the page.
    run = [(str(page), "\n" * (line - 1) + code) for line, code in _blocks(page) if _runs(code)]
    assert run, f"{page.name}: every ```python block is marked '{NOT_RUN}'"
    assert any(re.search(r"^\s*assert\b", code, flags=re.M) for _, code in run), (
        f"{page.name}: no block that runs asserts anything; assert a value the page claims"
    )
    monkeypatch.chdir(tmp_path)
    if page.name not in DEVICES:
        namespace: dict = {"__name__": "__main__"}
        for filename, code in run:
            exec(compile(code, filename, "exec"), namespace)
        return
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count="
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"{flags}{DEVICES[page.name]}".strip())
    proc = subprocess.run(
        [sys.executable, "-c", RUNNER],
        input=json.dumps(run),
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"{page.name} failed:\n{proc.stderr[-6000:]}"
