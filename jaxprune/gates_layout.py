"""Walks an nnx model's module tree: children, parents and every path to a module.

:func:`jaxprune.gates.attach` and :func:`jaxprune.gates.detach` replace layers
in place through these helpers, at every attribute that holds a layer (tied
weights keep their tie), and :mod:`jaxprune.gates_bn` reads the model's layout
with them; nothing here is public.
"""

from __future__ import annotations

from typing import Any

from flax import nnx

# Nothing public: jaxprune.gates_nnx and jaxprune.gates_bn import the
# underscore helpers by name.
__all__: list[str] = []


def _parent_and_name(model: nnx.Module, path: tuple) -> tuple[Any, Any]:
    parent = model
    for p in path[:-1]:
        parent = parent[p] if isinstance(parent, (list, tuple, dict)) else getattr(parent, p)
    return parent, path[-1]


def _check_replaceable(model: nnx.Module, paths: list[tuple]) -> None:
    """Raises before anything is replaced if a layer at one of ``paths`` sits in a tuple."""
    for path in paths:
        parent, name = _parent_and_name(model, path)
        if isinstance(parent, tuple):
            where = "/".join(map(str, path))
            raise ValueError(
                f"the layer {where!r} is item {name!r} of a tuple, which cannot be changed in "
                "place to wrap or fold it. Fix: hold the layers in an nnx.List or a list "
                "(e.g. nnx.List([layer0, layer1])), or skip this layer."
            )


def _set_child(parent: Any, name: Any, value: Any) -> None:
    if isinstance(parent, (list, dict)) or (isinstance(name, int) and not isinstance(parent, dict)):
        parent[name] = value
    else:
        setattr(parent, name, value)


def _children(node: Any) -> list[tuple[Any, Any]]:
    """Returns ``(name, child)`` of a module's attributes or a container's items, in order."""
    if isinstance(node, (list, tuple, nnx.List)):
        return list(enumerate(node))
    if isinstance(node, dict):
        return list(node.items())
    if isinstance(node, nnx.Module):
        return [(k, v) for k, v in vars(node).items() if not k.startswith("_")]
    return []


def _module_paths(model: nnx.Module) -> list[tuple[tuple, Any]]:
    """Returns ``(path, module)`` for every path reaching a module (a shared one at each).

    ``nnx.iter_modules`` lists a module reachable from two attributes (tied
    weights: ``self.tied = self.shared``) once; gating or folding it must
    replace it at every attribute that holds it, or the tie breaks.
    """
    out: list[tuple[tuple, Any]] = []

    def walk(node: Any, path: tuple, seen: frozenset) -> None:
        for name, child in _children(node):
            if id(child) in seen:
                continue
            if isinstance(child, nnx.Module):
                out.append((path + (name,), child))
            if isinstance(child, (nnx.Module, list, tuple, dict)):
                walk(child, path + (name,), seen | {id(child)})

    walk(model, (), frozenset({id(model)}))
    return out


def _aliases(model: nnx.Module, module: Any) -> list[tuple]:
    """Returns every path at which ``model`` holds ``module`` (the object itself)."""
    return [p for p, m in _module_paths(model) if m is module]
