"""jaxprune: neural-network pruning for JAX as pure functions and optax transforms.

Criteria score parameters, selections turn scores into boolean masks, and
:func:`prune` wraps any optax optimizer so masks are refreshed on a schedule and
enforced inside the jitted train step.
"""

from jaxprune import criteria, masks, schedules
from jaxprune._tree import is_prunable, path_str
from jaxprune.masks import apply_masks, sparsity
from jaxprune.transform import PruneState, get_masks, prune

__version__ = "0.1.0"

__all__ = [
    "PruneState",
    "__version__",
    "apply_masks",
    "criteria",
    "get_masks",
    "is_prunable",
    "masks",
    "path_str",
    "prune",
    "schedules",
    "sparsity",
]
