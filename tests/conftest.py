"""Shared fixtures; tests run with warnings from jaxprune as errors.

Strict dtype promotion is checked on jaxprune's own functions with the
``strict_promotion`` fixture (optax itself is not strict-promotion clean).
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The suite compiles about a thousand small programs and runs each a few
# times, so XLA's backend optimizations (LLVM at -O2) cost more than they
# save: without them the suite takes about a fifth less time on 2 cores.
# Semantics do not change; benchmarks and the demo keep the default. Set
# XLA_FLAGS=--xla_backend_optimization_level=2 to test with them. The
# subprocess tests inherit the setting through the environment.
if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    _flags = os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = f"{_flags} --xla_backend_optimization_level=0".strip()

import jax
import pytest

# The longest tests (subprocesses with 8 devices, example runs, a model trained
# by a module fixture) start first, so that two workers (`pytest -n 2`) do not
# end with one of them alone on a minute-long test.
_SLOW_FIRST = (
    "test_sharding.py",
    "test_compare_gates.py",
    "test_sharding_qa.py",
    "test_structured_example.py",
    "test_llm.py",
)


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: item.path.name not in _SLOW_FIRST)  # stable: order kept within


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
