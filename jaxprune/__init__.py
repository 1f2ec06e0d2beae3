"""jaxprune: neural-network pruning for JAX as pure functions and optax transforms.

Criteria score parameters, selections turn scores into boolean masks, and
:func:`prune` wraps any optax optimizer so masks are refreshed on a schedule and
enforced inside the jitted train step. Structurally pruned networks shrink for
real (:func:`shrink`), checkpoints are stored compressed (:func:`save`), and
:func:`report` gives honest sizes and FLOPs.
"""

from jaxprune import (
    activations,
    adversarial,
    at_init,
    checkpoint,
    criteria,
    data,
    distributions,
    drivers,
    dynamic,
    gates,
    llm,
    masks,
    merge,
    models,
    packing,
    schedules,
    structure,
)
from jaxprune._tree import is_prunable, path_str
from jaxprune.checkpoint import CheckpointError, restore, save
from jaxprune.masks import apply_masks, sparsity
from jaxprune.report import LeafRow, Report, report
from jaxprune.state import get_masks, state_bytes
from jaxprune.structure import shrink
from jaxprune.transform import PruneState, prune

__version__ = "0.1.0"

__all__ = [
    "activations",
    "adversarial",
    "gates",
    "at_init",
    "distributions",
    "drivers",
    "dynamic",
    "merge",
    "CheckpointError",
    "LeafRow",
    "PruneState",
    "Report",
    "__version__",
    "apply_masks",
    "checkpoint",
    "criteria",
    "data",
    "get_masks",
    "is_prunable",
    "llm",
    "masks",
    "models",
    "packing",
    "path_str",
    "prune",
    "report",
    "restore",
    "save",
    "schedules",
    "shrink",
    "sparsity",
    "state_bytes",
    "structure",
]
