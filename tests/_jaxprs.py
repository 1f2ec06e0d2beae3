"""Walking jaxprs for tests that pin a program's structure: nested jaxprs (cond
branches, loop bodies, inner jits) included."""

from collections.abc import Iterator

import jax
import jax.extend


def equations(jaxpr) -> Iterator:
    """Yields every equation of ``jaxpr`` (open or closed) and of the jaxprs nested in it."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    for eqn in jaxpr.eqns:
        yield eqn
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            yield from equations(sub)


def count(jaxpr, name: str) -> int:
    """The number of ``name`` primitives in ``jaxpr``, nested jaxprs included."""
    return sum(eqn.primitive.name == name for eqn in equations(jaxpr))
