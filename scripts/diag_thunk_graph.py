"""Which ordering edges of XLA:CPU's concurrent thunk graph are not data dependencies.

XLA:CPU runs a step as a graph of thunks (fusions, matmuls, copies,
conditionals) and starts a thunk once the thunks it depends on are done. It
derives those dependencies from buffer conflicts, not from data flow: two thunks
that touch overlapping slices of memory are ordered, so a buffer that XLA reuses
for an unrelated value orders two otherwise independent thunks, and a
conditional counts as touching every buffer either of its branches touches.

For the dense step, for ``jp.prune`` as ``scripts/bench_overhead.py`` runs it
(``prune-layer``, ``prune-global``: refresh every 100 steps) and for the
hand-built variants of ``scripts/diag_cond_layout.py``, this script compiles the step with XLA's
thunk-executor logging on (in a subprocess, since the logging must be set
before jax is imported), reads the main thunk graph back, and lists every
edge ``a -> b`` of it where ``b`` does not read, directly or through other
instructions, anything ``a`` computes: an ordering that only buffer reuse
imposes. On two cores such edges can keep independent work (a backward matmul,
an optimizer update) from overlapping; on one core there is nothing to overlap.

Usage: python scripts/diag_thunk_graph.py [--variants dense,cond-trivial,cond-fused]
The last line is ``RESULT {json}``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

_CHILD = r"""
import sys
sys.path.insert(0, {scripts!r})
import jax, optax
from bench_overhead import make_step, mlp_init
from diag_cond_layout import variant
params = mlp_init(jax.random.key(0))
x = jax.random.normal(jax.random.key(1), (128, 784))
y = jax.random.randint(jax.random.key(2), (128,), 0, 10)
import jaxprune as jp
kind = {kind!r}
if kind == "dense":
    tx = optax.adam(1e-3)
elif kind.startswith("prune-"):  # jp.prune as bench_overhead.py runs it, refresh every 100
    sched = jp.schedules.polynomial(0.0, 0.9, begin_step=0, end_step=10**7, frequency=100)
    tx = jp.prune(optax.adam(1e-3), sparsity=sched, scope=kind.split("-", 1)[1])
else:
    tx = variant(kind)
state = tx.init(params)
compiled = make_step(tx).lower(params, state, x, y).compile()
open({hlo!r}, "w").write(compiled.as_text())
"""

_THUNK = re.compile(
    r"\s*thunk #(\d+): op_name=(\S+), kind=(\S+), dependencies=\[(.*?)\], "
    r"source=\w+, sink=\w+, priority=(\d+)"
)


def last_graph(log: str) -> list[tuple[str, str, list[str]]]:
    """Returns ``(name, kind, dependencies)`` of the last thunk graph logged (the step's)."""
    graphs, cur = [], None
    for line in log.splitlines():
        if line.startswith("ThunkExecutor: #thunks="):
            cur = []
            graphs.append(cur)
            continue
        m = _THUNK.match(line)
        if m and cur is not None:
            deps = [d.strip() for d in m.group(4).split(",") if d.strip()]
            cur.append((m.group(2), m.group(3), deps))
    if not graphs:
        raise RuntimeError("no thunk graph in the log: XLA's VLOG output was not captured")
    return graphs[-1]


def entry_operands(hlo: str) -> dict[str, list[str]]:
    """Returns each ENTRY instruction's operand names, from compiled HLO text."""
    entry = hlo[hlo.index("\nENTRY ") :]
    entry = entry[: entry.index("\n}")]
    ops = {}
    for line in entry.splitlines()[1:]:
        m = re.match(r"\s*(?:ROOT )?%(\S+) = .*?\b[a-z][a-z0-9_-]*\((.*)", line)
        if not m:
            continue
        # Operands are the %names before the closing parenthesis of the op call.
        args = m.group(2).split("), ")[0]
        ops[m.group(1)] = re.findall(r"%([\w.-]+)", args)
    return ops


def ancestors(ops: dict[str, list[str]]) -> dict[str, set[str]]:
    memo: dict[str, set[str]] = {}

    def visit(name: str) -> set[str]:
        if name not in memo:
            memo[name] = set()
            out = set()
            for o in ops.get(name, []):
                out.add(o)
                out |= visit(o)
            memo[name] = out
        return memo[name]

    for name in ops:
        visit(name)
    return memo


def analyse(kind: str) -> dict:
    scripts = str(Path(__file__).resolve().parent)
    with tempfile.TemporaryDirectory() as d:
        hlo_path = os.path.join(d, "step.hlo")
        env = dict(os.environ, TF_CPP_VMODULE="thunk_executor=6", TF_CPP_MIN_LOG_LEVEL="0")
        code = _CHILD.format(scripts=scripts, kind=kind, hlo=hlo_path)
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr[-3000:])
        graph = last_graph(proc.stderr)
        hlo = Path(hlo_path).read_text()
    up = ancestors(entry_operands(hlo))
    edges, false = 0, []
    for name, _, deps in graph:
        for dep in deps:
            edges += 1
            if dep not in up.get(name, set()):
                false.append(f"{dep} -> {name}")
    kinds = {name: k for name, k, _ in graph}
    heavy = [e for e in false if kinds.get(e.split(" -> ")[1]) in ("dot", "ynn-fusion")]
    return {
        "thunks": len(graph),
        "edges": edges,
        "buffer_only_edges": false,
        "into_matmuls": heavy,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", default="dense,cond-trivial,cond-fused")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from diag_cond_layout import KINDS

    known = ["dense", "prune-layer", "prune-global", *KINDS]
    unknown = [k for k in args.variants.split(",") if k not in known]
    if unknown:
        parser.error(f"--variants: unknown {unknown}; choose from {known}")
    out = {}
    for kind in args.variants.split(","):
        r = analyse(kind)
        out[kind] = r
        print(
            f"{kind}: {r['thunks']} thunks, {r['edges']} edges after transitive reduction, "
            f"{len(r['buffer_only_edges'])} without a data dependency "
            f"({len(r['into_matmuls'])} into a matmul)"
        )
        for e in r["buffer_only_edges"]:
            print(f"    {e}{'   <- matmul waits' if e in r['into_matmuls'] else ''}")
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    main()
