"""Loads a script under examples/ as a module, for tests of its helpers."""

import importlib.util
import pathlib

_EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


def load_example(name: str):
    """Returns ``examples/<name>.py`` imported as the module ``<name>_example``."""
    spec = importlib.util.spec_from_file_location(f"{name}_example", _EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
