"""Isomorphic groups: the classes that ``select(..., scope="isomorphic")`` ranks apart.

Two channel groups are isomorphic when their members have the same shapes,
shrinking axes and channel layouts, member for member (their paths aside):
the MLP groups of two transformer blocks, the attention heads of two layers,
the middle convs of two residual blocks of one stage. A global ranking over
all groups compares importances whose scale depends on the structure (a
group with more or larger members sums larger norms), so wide or
many-membered groups survive and the others collapse; ranking each class of
isomorphic groups on its own, at the same sparsity, compares like with like.
This is Torch-Pruning's ``isomorphic=True``.

The paper clusters sub-structures by graph isomorphism of their computation
graphs. Here two groups count as isomorphic when their members match in
shape, shrinking axis and channel layout: that tells apart the kinds of
layer of the models tested, but it is not a graph isomorphism test (two
unrelated groups whose members happen to have the same shapes share a
class).

References:
  Fang, Ma, Mi & Wang, "Isomorphic Pruning for Vision Models", ECCV 2024.
  https://arxiv.org/abs/2407.04616
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp

from jaxprune.structure.graph import Group

__all__ = ["isomorphic_classes", "signature"]


def signature(group: Group, flat: Sequence[tuple[Any, Any]]) -> tuple:
    """Returns what two isomorphic groups share: channels and each member's shape, axis, layout.

    ``flat`` is the ``(path, leaf)`` list the members' ``leaf`` indices point
    into. Members are compared as a sorted multiset, so their order within a
    group does not matter.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from jaxprune import structure
      >>> from jaxprune.structure.isomorphic import signature
      >>> def two_branches(p, x):  # two hidden layers of the same shapes, side by side
      ...     h1, h2 = jax.nn.relu(x @ p["a1"]), jax.nn.relu(x @ p["a2"])
      ...     return h1 @ p["b1"] + h2 @ p["b2"]
      >>> p = {"a1": jnp.ones((4, 8)), "a2": jnp.ones((4, 8)), "b1": jnp.ones((8, 2)),
      ...      "b2": jnp.ones((8, 2))}
      >>> gs = [g for g in structure.groups(two_branches, p, jnp.ones((1, 4))) if g.prunable]
      >>> flat = jax.tree_util.tree_flatten_with_path(p)[0]
      >>> len(gs), signature(gs[0], flat) == signature(gs[1], flat)
      (2, True)
    """
    members = sorted(
        (tuple(jnp.shape(flat[m.leaf][1])), m.axis, tuple(m.layout)) for m in group.members
    )
    return (group.channels, tuple(members))


def isomorphic_classes(groups: Sequence[Group], flat: Sequence[tuple[Any, Any]]) -> list[list[int]]:
    """Returns the indices of the prunable ``groups``, split into classes of isomorphic ones.

    Classes come in the order of their first group; non-prunable groups are
    in none.
    """
    classes: dict[tuple, list[int]] = {}
    for i, g in enumerate(groups):
        if g.prunable:
            classes.setdefault(signature(g, flat), []).append(i)
    return list(classes.values())
