"""The README's Python code blocks run, in order, in one namespace."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def _blocks():
    text = README.read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_examples_run():
    blocks = _blocks()
    assert len(blocks) >= 2
    namespace: dict = {}
    # The API summary block lists signatures, not runnable code: skip blocks
    # that name undefined placeholders.
    for block in blocks:
        if "jp.masks.topk(scores" in block:
            continue
        exec(compile(block, str(README), "exec"), namespace)
    assert namespace["jp"].sparsity(namespace["params"]) > 0.89
