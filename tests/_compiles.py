"""Counting the programs XLA compiles, for tests that pin compile counts (never times)."""

import collections
import logging

import jax

from jaxprune import _compile


def compiled(caplog, fn) -> tuple[list[str], object]:
    """Returns the names of the programs XLA compiled while ``fn()`` ran, and its result."""
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="jax"), jax.log_compiles(True):
        out = jax.block_until_ready(fn())
    done = "Finished XLA compilation of "
    names = [
        r.getMessage()[len(done) :].split(" ")[0]
        for r in caplog.records
        if r.getMessage().startswith(done)
    ]
    return names, out


def empty_programs(monkeypatch) -> None:
    """Gives ``_compile``'s programs-by-content cache a fresh, empty start for one test."""
    monkeypatch.setattr(_compile, "_PROGRAMS", collections.OrderedDict())
