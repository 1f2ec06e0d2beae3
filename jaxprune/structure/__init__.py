"""Structure: dependency groups read from a model's jaxpr, and physically shrinking it.

* :func:`groups` — which (leaf, axis) slices must shrink together, derived
  from the jaxpr of ``apply_fn(params, *example_inputs)``.
* :func:`group_scores`, :func:`select`, :func:`selection` — group importance
  and group-wise channel masks (also as a ``scope=`` of ``jp.prune``).
* :func:`shrink` (``jp.shrink``) — smaller params computing what the masked
  params compute; :func:`shrink_module` — the same for a flax nnx model, in place;
  :func:`shrink_linen` / :func:`linen_apply` — for a flax linen module, which
  then runs on the smaller params unchanged.
* :func:`prune_layerwise` — layer-by-layer neuron pruning with fine-tuning between.
"""

from jaxprune.structure.graph import Group, Member, channel_indices
from jaxprune.structure.importance import group_scores, groups, select, selection
from jaxprune.structure.layerwise import prune_layerwise
from jaxprune.structure.linen import linen_apply, shrink_linen
from jaxprune.structure.modules import full_masks, module_apply, shrink_module
from jaxprune.structure.program import Program, trace
from jaxprune.structure.shrinking import shrink, widths

__all__ = [
    "Group",
    "Member",
    "Program",
    "channel_indices",
    "full_masks",
    "group_scores",
    "groups",
    "linen_apply",
    "module_apply",
    "prune_layerwise",
    "select",
    "selection",
    "shrink",
    "shrink_linen",
    "shrink_module",
    "trace",
    "widths",
]
