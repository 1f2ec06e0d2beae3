"""Shared fixtures; tests run with warnings from jaxprune as errors.

Strict dtype promotion is checked on jaxprune's own functions with the
``strict_promotion`` fixture (optax itself is not strict-promotion clean).
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The suite compiles about a thousand small programs and runs each a few times,
# so compile time is most of its run time. Two XLA:CPU options cut it without
# changing semantics (benchmarks and the demo keep the defaults):
# - no LLVM backend optimizations (-O0 instead of -O2);
# - the classic fusion code generator instead of the MLIR fusion emitters.
# On 2 cores the suite took 15:24 with the first alone and 10:32 with both.
# Options already in XLA_FLAGS win: XLA_FLAGS=--xla_backend_optimization_level=2
# tests with the backend optimizations. The subprocess tests and pytest-xdist's
# workers inherit the setting through the environment.
_SUITE_XLA_FLAGS = ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false")


def _suite_xla_flags(flags: str) -> str:
    """``flags`` with the suite's options it lacks, keeping those this jaxlib accepts.

    XLA aborts the process on an option it does not know, and a jaxlib may drop
    one, so the options are tried in a child process first (about 2 s, once:
    pytest-xdist's workers inherit the result).
    """
    import subprocess
    import sys

    def accepted(trial: str) -> bool:
        probe = subprocess.run(
            [sys.executable, "-c", "import jax; jax.numpy.zeros(1).block_until_ready()"],
            env=dict(os.environ, XLA_FLAGS=trial, JAX_PLATFORMS="cpu"),
            capture_output=True,
            timeout=300,
        )
        return probe.returncode == 0

    missing = [f for f in _SUITE_XLA_FLAGS if f.split("=")[0] not in flags]
    if missing and accepted(" ".join([flags, *missing]).strip()):
        return " ".join([flags, *missing]).strip()
    for option in missing:  # one of them was refused: keep the others
        if accepted(f"{flags} {option}".strip()):
            flags = f"{flags} {option}".strip()
    return flags


if "JAXPRUNE_SUITE_XLA_FLAGS" not in os.environ:
    os.environ["XLA_FLAGS"] = _suite_xla_flags(os.environ.get("XLA_FLAGS", ""))
    os.environ["JAXPRUNE_SUITE_XLA_FLAGS"] = os.environ["XLA_FLAGS"]

import jax  # noqa: E402  (XLA_FLAGS is set above, before jax starts its backend)
import pytest  # noqa: E402

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


# Each program XLA:CPU compiles maps about six memory regions that live as long
# as the program, and JAX keeps every compiled program of a jitted function. A
# worker of this suite compiles thousands: past Linux's default limit of 65,530
# mappings per process (vm.max_map_count) the next mapping fails and the worker
# dies with a segmentation fault. So a worker past this many drops every
# compiled program after the current test module; later modules compile again
# what they use.
_MAX_MAPPINGS = 40_000


def _mappings() -> int | None:
    """The number of memory mappings of this process, or ``None`` where it cannot be read."""
    try:
        with open("/proc/self/maps", "rb") as f:
            return sum(1 for _ in f)
    except OSError:
        return None


@pytest.fixture(autouse=True, scope="module")
def _bounded_mappings():
    yield
    count = _mappings()
    if count is not None and count > _MAX_MAPPINGS:
        from jaxprune import _compile

        with _compile._PROGRAMS_LOCK:
            _compile._PROGRAMS.clear()  # programs borrowed by content (jit_by_content)
        jax.clear_caches()  # the programs' mappings go with their last reference


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
