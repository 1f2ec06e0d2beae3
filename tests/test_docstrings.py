"""Docstrings of the public API: every callable has one, and an ``Args:`` section names
every parameter of its signature."""

import importlib
import inspect
import pkgutil
import re

import pytest

import jaxprune


def _public_callables():
    seen, out = set(), []
    names = ["jaxprune"] + [
        m.name for m in pkgutil.walk_packages(jaxprune.__path__, "jaxprune.") if "._" not in m.name
    ]
    for modname in names:
        mod = importlib.import_module(modname)
        for name in getattr(mod, "__all__", ()):
            obj = getattr(mod, name)
            if not callable(obj) or inspect.ismodule(obj) or id(obj) in seen:
                continue
            if not getattr(obj, "__module__", "").startswith("jaxprune"):
                continue  # re-exported from elsewhere
            seen.add(id(obj))
            out.append((f"{modname}.{name}", obj))
    return out


CALLABLES = _public_callables()


def test_report_types_are_exported():
    import jax.numpy as jnp

    r = jaxprune.report({"w": jnp.ones((2, 2))})
    assert isinstance(r, jaxprune.Report) and isinstance(r.rows[0], jaxprune.LeafRow)


def test_the_public_api_is_found():
    names = {n for n, _ in CALLABLES}
    assert {"jaxprune.prune", "jaxprune.masks.global_topk", "jaxprune.gates.to_masks"} <= names
    assert len(CALLABLES) > 150


@pytest.mark.parametrize("name,obj", CALLABLES, ids=[n for n, _ in CALLABLES])
def test_public_callables_have_docstrings(name, obj):
    assert (obj.__doc__ or "").strip(), f"{name} has no docstring"


def _args_section(doc: str) -> str | None:
    m = re.search(
        r"\n\s*Args:\n(.*?)(?:\n\s*(?:Returns|Raises|Warns|Yields|Examples|References|Note|Notes)\w*:|\Z)",
        doc,
        re.S,
    )
    return m.group(1) if m else None


WITH_ARGS = [(n, o) for n, o in CALLABLES if _args_section(inspect.getdoc(o) or "") is not None]


def test_most_public_functions_have_an_args_section():
    assert len(WITH_ARGS) >= 165


@pytest.mark.parametrize("name,obj", WITH_ARGS, ids=[n for n, _ in WITH_ARGS])
def test_args_sections_name_every_parameter(name, obj):
    section = _args_section(inspect.getdoc(obj))
    params = inspect.signature(obj).parameters
    missing = [
        p for p in params if p != "self" and not re.search(rf"(?<![\w.]){re.escape(p)}\b", section)
    ]
    assert not missing, f"{name}: Args does not mention {missing}"
