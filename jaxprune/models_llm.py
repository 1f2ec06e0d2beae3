"""A small GPT-style decoder (flax nnx) for one-shot LLM pruning tests and benchmarks.

Pre-LayerNorm blocks with causal multi-head self-attention and a GELU MLP,
learned position embeddings, an untied output head. Each :class:`Block` can
return the input of one of its linear layers (``tap=``), which is what
:func:`jaxprune.llm.prune_decoder` needs to build that layer's Hessian.
"""

from __future__ import annotations

import math
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxprune._tree import as_float, as_int

__all__ = ["Block", "GPT", "train_lm", "lm_loss", "markov_corpus"]


class Block(nnx.Module):
    """A pre-LN transformer block whose linear layers are ``qkv``, ``out``, ``fc``, ``proj``."""

    LINEARS: ClassVar[tuple[str, ...]] = ("qkv", "out", "fc", "proj")

    def __init__(self, dim: int, heads: int, *, rngs: nnx.Rngs, mlp_ratio: int = 4):
        if dim % heads:
            raise ValueError(f"dim must be divisible by heads, got dim={dim}, heads={heads}.")
        self.heads = heads
        self.ln1 = nnx.LayerNorm(dim, rngs=rngs)
        self.qkv = nnx.Linear(dim, 3 * dim, rngs=rngs)
        self.out = nnx.Linear(dim, dim, rngs=rngs)
        self.ln2 = nnx.LayerNorm(dim, rngs=rngs)
        self.fc = nnx.Linear(dim, mlp_ratio * dim, rngs=rngs)
        self.proj = nnx.Linear(mlp_ratio * dim, dim, rngs=rngs)

    def __call__(self, x: jax.Array, *, tap: str | None = None) -> jax.Array:
        """Returns the block's output, or the input of linear layer ``tap`` if given."""
        b, t, d = x.shape
        h = self.ln1(x)
        if tap == "qkv":
            return h
        q, k, v = jnp.split(self.qkv(h), 3, axis=-1)
        split = lambda z: z.reshape(b, t, self.heads, d // self.heads)  # noqa: E731
        att = jnp.einsum("bqhd,bkhd->bhqk", split(q), split(k)) / jnp.sqrt(d / self.heads)
        causal = jnp.tril(jnp.ones((t, t), bool))
        att = jax.nn.softmax(jnp.where(causal, att, -1e9), axis=-1)
        h = jnp.einsum("bhqk,bkhd->bqhd", att, split(v)).reshape(b, t, d)
        if tap == "out":
            return h
        x = x + self.out(h)
        h = self.ln2(x)
        if tap == "fc":
            return h
        h = jax.nn.gelu(self.fc(h))
        if tap == "proj":
            return h
        return x + self.proj(h)


class GPT(nnx.Module):
    """A GPT-style decoder: token + position embeddings, ``depth`` blocks, LN, head.

    Examples:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from jaxprune.models_llm import GPT
      >>> model = GPT(vocab=16, dim=32, depth=1, heads=2, max_len=8, rngs=nnx.Rngs(0))
      >>> model(jnp.zeros((2, 8), jnp.int32)).shape
      (2, 8, 16)
    """

    def __init__(
        self, *, vocab: int, dim: int, depth: int, heads: int, max_len: int, rngs: nnx.Rngs
    ):
        self.vocab, self.max_len = vocab, max_len
        self.embed = nnx.Embed(vocab, dim, rngs=rngs)
        self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (max_len, dim)))
        self.blocks = nnx.List([Block(dim, heads, rngs=rngs) for _ in range(depth)])
        self.ln_f = nnx.LayerNorm(dim, rngs=rngs)
        self.head = nnx.Linear(dim, vocab, rngs=rngs)

    def embed_tokens(self, tokens: jax.Array) -> jax.Array:
        """Returns the input of the first block for ``tokens`` ``[batch, time]``.

        Raises:
          ValueError: ``tokens`` not ``[batch, time]``, ``time`` above
            ``max_len``, or (when concrete) ids outside ``[0, vocab)``, for
            which the embedding would return NaN.
        """
        if jnp.ndim(tokens) != 2:
            raise ValueError(
                f"tokens must be [batch, time], got shape {jnp.shape(tokens)}. Fix: add the "
                "batch axis, e.g. tokens[None] for one sequence."
            )
        if tokens.shape[1] > self.max_len:
            raise ValueError(
                f"tokens has {tokens.shape[1]} positions, more than max_len={self.max_len}. "
                f"Fix: cut the sequences to tokens[:, :{self.max_len}] or build the model with "
                "a larger max_len."
            )
        if not isinstance(tokens, jax.core.Tracer) and tokens.size:
            lo, hi = int(jnp.min(tokens)), int(jnp.max(tokens))
            if lo < 0 or hi >= self.vocab:
                raise ValueError(
                    f"tokens holds ids in [{lo}, {hi}], outside the vocabulary [0, "
                    f"{self.vocab - 1}] (the embedding would return NaN). Fix: tokenize with "
                    f"this model's vocabulary of {self.vocab}."
                )
        return self.embed(tokens) + self.pos[: tokens.shape[1]]

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """Returns next-token logits ``[batch, time, vocab]``."""
        h = self.embed_tokens(tokens)
        for block in self.blocks:
            h = block(h)
        return self.head(self.ln_f(h))


def lm_loss(model: GPT, tokens: jax.Array) -> jax.Array:
    """Returns the mean next-token cross-entropy of ``model`` on ``tokens`` (nats, float32).

    The logits are cast to float32 before the log-softmax, as reference
    evaluation code does (``logits.float()``): in bfloat16 a mean loss near 3
    nats falls on a grid of 1/64 nat, so perplexities up to 1.6% apart can tie.
    A float32 loss is also the usual practice for training; for a float32
    model the cast does nothing.

    Raises:
      ValueError: ``model(tokens[:, :-1])`` does not return logits
        ``[batch, time - 1, vocab]``.
    """
    targets = tokens[:, 1:]
    logits = model(tokens[:, :-1])
    shape = getattr(logits, "shape", None)
    if shape is None or len(shape) != 3 or tuple(shape[:2]) != tuple(targets.shape):
        raise ValueError(
            f"model(tokens) must return next-token logits [batch, time, vocab] = "
            f"[{targets.shape[0]}, {targets.shape[1]}, vocab] for tokens[:, :-1], got "
            f"{type(logits).__name__} of shape {shape}. Fix: return the output head's "
            "logits from __call__, as jaxprune.models_llm.GPT does."
        )
    logits = logits.astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


def train_lm(
    model: GPT, tokens: jax.Array, *, steps: int, batch_size: int, lr: float, key: jax.Array
) -> list[float]:
    """Trains ``model`` in place with AdamW on random batches of ``tokens``; returns the losses.

    Each of the ``steps`` steps draws ``batch_size`` rows of ``tokens`` ``[n,
    time]`` at random (from ``key``, folded with the step) and minimizes
    :func:`lm_loss` with ``optax.adamw(lr, weight_decay=0.0)`` in one jitted
    step; the losses are those of the batches before each update.

    Examples:
      Marked skip: compiling the train step takes about 3 s of CPU.

      >>> import jax
      >>> from flax import nnx
      >>> from jaxprune.models_llm import GPT, markov_corpus, train_lm
      >>> model = GPT(vocab=16, dim=32, depth=1, heads=2, max_len=8, rngs=nnx.Rngs(0))
      >>> (tokens,) = markov_corpus(vocab=16, time=8, sizes=(64,))
      >>> losses = train_lm(  # doctest: +SKIP
      ...     model, tokens, steps=30, batch_size=16, lr=3e-3, key=jax.random.key(0)
      ... )
      >>> len(losses), losses[-1] < 0.6 * losses[0]  # doctest: +SKIP
      (30, True)
    """
    opt = nnx.Optimizer(model, optax.adamw(lr, weight_decay=0.0), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt, batch):
        loss, grads = nnx.value_and_grad(lm_loss)(model, batch)
        opt.update(model, grads)
        return loss

    losses = []
    for i in range(steps):
        idx = jax.random.randint(jax.random.fold_in(key, i), (batch_size,), 0, tokens.shape[0])
        losses.append(float(step(model, opt, tokens[idx])))
    return losses


def _check_corpus_args(vocab, time, sizes, seed, concentration) -> None:
    for name, value, low, fix in (
        ("vocab", vocab, 2, "vocab=64"),
        ("time", time, 2, "time=32"),
        ("seed", seed, 0, "seed=0"),
    ):
        v = as_int(value)
        if v is None or v < low:
            raise ValueError(
                f"markov_corpus's {name} must be an int >= {low}, got {value!r}. Fix: e.g. {fix}."
            )
    ns = [as_int(n) for n in sizes] if isinstance(sizes, (tuple, list)) else [None]
    if not ns or any(n is None or n < 1 for n in ns):
        raise ValueError(
            f"markov_corpus's sizes must be a tuple of ints >= 1 (examples per set), got "
            f"{sizes!r}. Fix: e.g. sizes=(2048, 256) for a train and a test set."
        )
    c = as_float(concentration)
    if not (math.isfinite(c) and c > 0):
        raise ValueError(
            f"markov_corpus's concentration must be a finite number > 0 (the Dirichlet's; small "
            f"is sparse), got {concentration!r}. Fix: e.g. concentration=0.02 (the default)."
        )


def markov_corpus(
    *, vocab: int, time: int, sizes: tuple[int, ...], seed: int = 0, concentration: float = 0.02
) -> list[jax.Array]:
    """Returns token sets ``[n, time]`` (one per ``sizes`` entry) from one generated language.

    The language is a second-order Markov chain over ``vocab`` tokens whose
    transition rows are drawn from a sparse Dirichlet (``concentration``), so
    a trained model reaches a perplexity far below ``vocab`` and pruning damage
    is measurable. Each set is sampled with its own seed; nothing is downloaded.

    Raises:
      ValueError: ``vocab`` is not an int >= 2, ``time`` not an int >= 2 (the
        chain starts from two random tokens), ``sizes`` not a sequence of ints
        >= 1, ``concentration`` not a finite number > 0, or ``seed`` not an int >= 0.
    """
    _check_corpus_args(vocab, time, sizes, seed, concentration)
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.full(vocab, concentration), size=(vocab, vocab))
    cum = probs.cumsum(-1)
    out = []
    for i, n in enumerate(sizes):
        r = np.random.default_rng(1000 * seed + i + 1)
        tokens = np.zeros((n, time), np.int32)
        tokens[:, :2] = r.integers(0, vocab, (n, 2))
        for t in range(2, time):
            u = r.random(n)[:, None]
            nxt = (u > cum[tokens[:, t - 2], tokens[:, t - 1]]).sum(-1)
            tokens[:, t] = nxt.clip(0, vocab - 1)
        out.append(jnp.asarray(tokens))
    return out
