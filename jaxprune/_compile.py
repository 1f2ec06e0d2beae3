"""Compile options for jaxprune's one-off programs on the CPU.

Some of jaxprune's programs run once or a few times (the first masks of
``jp.dynamic``, the structure checks and selections of ``jp.shrink``): there,
compile time, not run time, is what users wait for. On the CPU they compile
with XLA's cheapest pipeline: LLVM at -O0, no expensive LLVM passes, and the
classic fusion code generator instead of the MLIR fusion emitters, where the
installed jaxlib still has that option. Programs that run every step (``jp.prune``'s
update, eager selections a loop may call many times) keep XLA's defaults.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["QUICK", "jit_once", "quick_options"]

QUICK = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
_CLASSIC_FUSION = {"xla_cpu_use_fusion_emitters": False}


@functools.cache
def quick_options() -> dict:
    """Returns ``QUICK``, with the classic fusion code generator where jaxlib has the option."""
    try:
        jax.jit(lambda x: x + 1, compiler_options=_CLASSIC_FUSION).lower(jnp.zeros(1)).compile()
    except jax.errors.JaxRuntimeError:  # "No such compile option": a jaxlib that dropped it
        return dict(QUICK)
    return {**QUICK, **_CLASSIC_FUSION}


def jit_once(fn: Callable, *, static_argnums: tuple[int, ...] = ()) -> Callable:
    """Returns ``jax.jit(fn)``, compiled with :func:`quick_options` on the CPU.

    For eager calls of programs that run once per use (call it outside ``jax.jit``).
    The backend is read at the first call, not at import.
    """
    jitted: dict[bool, Any] = {}

    @functools.wraps(fn)
    def call(*args):
        cpu = jax.default_backend() == "cpu"
        if cpu not in jitted:
            options = quick_options() if cpu else None
            jitted[cpu] = jax.jit(fn, static_argnums=static_argnums, compiler_options=options)
        return jitted[cpu](*args)

    return call
