"""Shared fixtures; tests run with warnings from jaxprune as errors.

Strict dtype promotion is checked on jaxprune's own functions with the
``strict_promotion`` fixture (optax itself is not strict-promotion clean).
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import pytest


@pytest.fixture
def key():
    return jax.random.key(0)


@pytest.fixture(autouse=True)
def _strict_warnings():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # Third-party deprecations are not ours to fix.
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"(?!jaxprune)")
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"(?!jaxprune)")
        yield


@pytest.fixture
def strict_promotion():
    with jax.numpy_dtype_promotion("strict"):
        yield
