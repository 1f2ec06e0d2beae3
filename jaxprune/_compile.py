"""Compile options for jaxprune's one-off programs on the CPU.

Some of jaxprune's programs run once or a few times (the first masks of
``jp.dynamic``, the structure checks and selections of ``jp.shrink``): there,
compile time, not run time, is what users wait for. On the CPU they compile
with XLA's cheapest pipeline: LLVM at -O0, no expensive LLVM passes, and the
classic fusion code generator instead of the MLIR fusion emitters, where the
installed jaxlib still has that option. Programs that run every step (``jp.prune``'s
update, eager selections a loop may call many times) keep XLA's defaults.

:func:`one_program` runs user code (a loss, a model: SNIP's, GraSP's and
SynFlow's scores) as one program traced afresh at every call, with LLVM at -O2
(:func:`quick_o2_options`): its run time grows with the model and the batch
(-O0 ran VGGSmall's SNIP gradient on 128 images 1.8x slower, 527 ms against
296 ms, where -O2 with the two other options compiled in 0.6 s against 1.35 s
for XLA's defaults). One program's floats may differ from eager code's in
the last bits where XLA fuses the operations otherwise (GraSP's ``H g``).
A later call tracing to the same program (same model, same shapes) finds it
compiled, by content, as below.

:func:`jit_by_content` jits the eager updates of jaxprune's transforms: a
transform built anew with the same configuration (``optax.inject_hyperparams``
around ``jp.prune`` builds one at every step; a notebook cell run again) traces
to the same program, which is then compiled once per process, not once per
transform.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import threading
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "QUICK",
    "jit_by_content",
    "jit_once",
    "one_program",
    "quick_o2_options",
    "quick_options",
]

QUICK = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
_CLASSIC_FUSION = {"xla_cpu_use_fusion_emitters": False}

# Past this many bytes of arrays closed over, which a program embeds as
# constants (38 MB added 0.6 s to a lowering and compile on the CPU),
# one_program runs the function eagerly.
MAX_CONST_BYTES = 64 * 2**20

# A function that reads an array argument's value in Python (np.asarray(y),
# `if x.max() > 1`) cannot be traced: one_program runs it eagerly.
_CONCRETE_ONLY = (
    jax.errors.ConcretizationTypeError,
    jax.errors.TracerArrayConversionError,
    jax.errors.TracerBoolConversionError,
    jax.errors.TracerIntegerConversionError,
)


@functools.cache
def quick_options() -> dict:
    """Returns ``QUICK``, with the classic fusion code generator where jaxlib has the option."""
    try:
        jax.jit(lambda x: x + 1, compiler_options=_CLASSIC_FUSION).lower(jnp.zeros(1)).compile()
    except jax.errors.JaxRuntimeError:  # "No such compile option": a jaxlib that dropped it
        return dict(QUICK)
    return {**QUICK, **_CLASSIC_FUSION}


def quick_o2_options() -> dict:
    """Returns :func:`quick_options` with LLVM at -O2: for programs that run on a batch."""
    return {k: v for k, v in quick_options().items() if k != "xla_backend_optimization_level"}


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


def one_program(fn: Callable, *args: Any) -> Any:
    """Returns ``fn(*args)``, computed by one program traced and compiled for this call.

    Outside ``jax.jit`` every operation of ``fn`` compiles a program of its own
    at its first use (117 for SNIP's scores of a 784-1024-256-10 MLP, 3.5 s on
    a 2-core CPU); here ``fn`` is traced once and compiled as one program, with
    :func:`quick_o2_options` on the CPU. It is traced anew at every call, never
    cached by ``fn``: ``fn`` calls user code (a loss, a model) that may read
    state changed since the last call (a model switched to eval mode, rebuilt
    params), which a cached trace would replay. The compiled program is looked
    up by content (:func:`_content_key`), so a call that traces to the same
    program as an earlier one (the same model and shapes) compiles nothing.

    The array leaves of ``args`` (JAX and NumPy arrays) are the program's
    arguments; the others (Python numbers, strings, flags) reach ``fn`` as
    they are. ``fn(*args)`` runs as it is (eagerly, or in the caller's trace)
    under ``jax.disable_jit()``, when a leaf of ``args`` is traced, when
    tracing ``fn`` fails on reading an array argument's value in Python, or
    when ``fn`` closes over more than ``MAX_CONST_BYTES`` of arrays, which the
    program would embed as constants.
    """
    leaves, treedef = jax.tree.flatten(args)
    if jax.config.jax_disable_jit or any(isinstance(x, jax.core.Tracer) for x in leaves):
        return fn(*args)
    dynamic = [isinstance(x, (jax.Array, np.ndarray)) for x in leaves]

    def program(arrays):
        it = iter(arrays)
        full = [next(it) if d else x for x, d in zip(leaves, dynamic, strict=True)]
        return fn(*jax.tree.unflatten(treedef, full))

    program.__name__ = program.__qualname__ = getattr(fn, "__name__", "program")  # for logs

    arrays = [x for x, d in zip(leaves, dynamic, strict=True) if d]
    options = quick_o2_options() if jax.default_backend() == "cpu" else None
    try:
        traced = jax.jit(program, compiler_options=options, keep_unused=True).trace(arrays)
    except _CONCRETE_ONLY:
        return fn(*args)
    if sum(getattr(c, "nbytes", 0) for c in traced.jaxpr.consts) > MAX_CONST_BYTES:
        return fn(*args)
    lowered = traced.lower()
    key = None if _by_content_off() else _content_key(traced, lowered, (arrays,), {}, options)
    if key is None:
        return lowered.compile()(arrays)
    compiled = _find(key)
    if compiled is None:
        compiled = lowered.compile()
        _keep(key, compiled)
    return compiled(arrays)


# Programs compiled by jit_by_content, by content; the least recently used go first.
_PROGRAMS: collections.OrderedDict[tuple, Any] = collections.OrderedDict()
_PROGRAMS_LOCK = threading.Lock()
MAX_PROGRAMS = 16
# A program whose text is longer than this (arrays closed over, a user's frozen
# weights, are baked into it as constants, two hex digits a byte) is not kept: the
# cache would hold them after the user drops them.
MAX_KEPT_TEXT_BYTES = 16 * 2**20


def _content_key(
    traced: Any, lowered: Any, args: tuple, kwargs: dict, options: dict | None = None
) -> tuple | None:
    """Returns what identifies ``lowered``'s compiled program for these arguments, or ``None``.

    Its StableHLO (without locations) holds every constant the function
    closed over (a learning rate): JAX embeds them in the program unless
    ``jax_use_simplified_jaxpr_constants`` hoists them (then no program is
    looked up). The input and output trees, the input and output types (weak
    types included, which the text does not show: a weak float32 output adds
    to a bfloat16 array as bfloat16, a strong one as float32), the arguments'
    shardings, the tracing settings (:func:`_settings`) and the compile options
    count too.

    ``None`` (no program of another function may run) where the text does not
    say everything the program does, or where its text is longer than
    ``MAX_KEPT_TEXT_BYTES`` (it embeds large arrays the function closes over,
    which a kept program would hold after the user drops them): it calls back into Python
    (``jax.debug.print``, ``jax.pure_callback``: the text holds the callback's
    index, not the function), or it reads or writes ``jax.Ref`` s (the
    compiled program holds the ones closed over), or JAX's lowering does not
    say (a JAX without these fields).
    """
    compile_args = getattr(getattr(lowered, "_lowering", None), "compile_args", None)
    if (
        not isinstance(compile_args, dict)
        or "host_callbacks" not in compile_args
        or compile_args["host_callbacks"]
        or compile_args.get("keepalive")
        or compile_args.get("mut") is not None
    ):
        return None
    text = lowered.as_text()
    if len(text) > MAX_KEPT_TEXT_BYTES:
        # Large closed-over arrays are in the text: kept, the cache would hold them.
        return None
    shardings = tuple(getattr(x, "sharding", None) for x in jax.tree.leaves((args, kwargs)))
    return (
        hashlib.sha256(text.encode()).hexdigest(),
        lowered.in_tree,
        tuple(jax.tree.leaves(traced.in_avals)),
        lowered.out_tree,
        tuple(jax.tree.leaves(traced.out_avals)),
        shardings,
        _settings(),
        tuple(sorted((options or {}).items())),
    )


def _settings() -> tuple:
    """Returns the settings that change what ``jax.jit`` traces, short of the arguments.

    The default device (where a program runs), 64-bit types, matmul precision,
    rank and dtype promotion rules and the PRNG's: ``jax.jit`` traces
    again when a context manager (``jax.enable_x64``,
    ``jax.default_matmul_precision``, ...) changes one of them.
    """
    c = jax.config
    return (
        str(c.jax_default_device),
        c.jax_enable_x64,
        str(c.jax_default_matmul_precision),
        c.jax_numpy_rank_promotion,
        str(c.jax_numpy_dtype_promotion),
        c.jax_default_prng_impl,
        c.jax_threefry_partitionable,
    )


def _signature(args: tuple, kwargs: dict) -> tuple | None:
    """Returns the arguments' types (weak types included) and shardings, and the settings.

    A compiled program takes arguments that differ from those it was compiled
    for only in weak types (a Python float for a float32 array: ``x + y`` is
    bfloat16 or float32 for a bfloat16 ``x``), and ignores the settings; a
    borrowed program runs only for calls of the same signature as the one
    that found it. ``None`` where an argument has no JAX type.
    """
    leaves = jax.tree.leaves((args, kwargs))
    try:
        types = tuple(map(jax.typeof, leaves))
    except TypeError:
        return None
    return types, tuple(getattr(x, "sharding", None) for x in leaves), _settings()


def _find(key: tuple) -> Any:
    """Returns the program compiled under ``key``, or ``None``."""
    with _PROGRAMS_LOCK:
        found = _PROGRAMS.get(key)
        if found is not None:
            _PROGRAMS.move_to_end(key)
    return found


def _keep(key: tuple, compiled: Any) -> None:
    """Keeps ``compiled`` under ``key``; past ``MAX_PROGRAMS``, the least recently used go."""
    with _PROGRAMS_LOCK:
        _PROGRAMS[key] = compiled
        while len(_PROGRAMS) > MAX_PROGRAMS:
            _PROGRAMS.popitem(last=False)


def _by_content_off() -> bool:
    """Is a program's lookup by content off (settings under which it could be wrong)?

    ``jax_disable_jit`` has no program; hoisted constants are not in the text;
    the NaN and inf checks run in ``jax.jit``'s own path.
    """
    return bool(
        jax.config.jax_disable_jit
        or jax.config.jax_use_simplified_jaxpr_constants
        or jax.config.jax_debug_nans
        or jax.config.jax_debug_infs
    )


def jit_by_content(fn: Callable) -> Callable:
    """Returns ``jax.jit(fn)`` reusing a program compiled for another function of the same program.

    For eager calls of a transform's update, which closes over the transform's
    configuration: a jit keyed on ``fn`` compiles again for every transform,
    even one built anew with the same configuration (``optax.inject_hyperparams``
    around ``jp.prune`` builds one at every update: a compile per step). Here a
    transform's first call traces and lowers ``fn`` (a fraction of the compile
    time) and looks its program up by content (:func:`_content_key`) among the
    last ``MAX_PROGRAMS`` compiled: found, that program runs, for this call and
    the next ones while the arguments and settings are the same
    (:func:`_signature`); not found, ``fn`` compiles, and
    later calls take ``jax.jit``'s own path. A program that embeds large
    arrays it closes over (see :func:`_content_key`) is neither looked up nor
    kept, so the cache never holds a user's large arrays. Unused arguments are kept
    (``keep_unused=True``), so that one program text means one use of the
    arguments.
    """
    jitted = jax.jit(fn, keep_unused=True)
    mode: dict[str, Any] = {"own": False, "borrowed": None}

    @functools.wraps(fn)
    def call(*args, **kwargs):
        if mode["own"] or _by_content_off():
            return jitted(*args, **kwargs)
        if any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves((args, kwargs))):
            return jitted(*args, **kwargs)  # inside the caller's trace: no program of its own
        if mode["borrowed"] is not None:
            found, signature = mode["borrowed"]
            if signature is not None and _signature(args, kwargs) == signature:
                try:
                    return found(*args, **kwargs)
                except (TypeError, ValueError):  # other trees: look again
                    pass
            mode["borrowed"] = None  # other types, weak types, shardings or settings
        traced = jitted.trace(*args, **kwargs)
        lowered = traced.lower()
        key = _content_key(traced, lowered, args, kwargs)
        found = None if key is None else _find(key)
        if found is not None:
            mode["borrowed"] = (found, _signature(args, kwargs))
            return found(*args, **kwargs)
        out = jitted(*args, **kwargs)  # compiles the lowering just made, once
        if key is not None:
            _keep(key, lowered.compile())  # that same executable, from JAX's caches
        mode["own"] = True
        return out

    call.jitted = jitted  # its compile cache, for tests and the curious
    return call
