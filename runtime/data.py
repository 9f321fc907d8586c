"""Token batches: a seeded synthetic stream by default, or a uint16 token file (nanoGPT's train.bin format).

Both are indexed by step: the batch of step k depends only on (seed, k), never on what ran before, so a run
resumed from a checkpoint at step k sees exactly the batches the uninterrupted run saw. Each step draws
plan.global_batch sequences of seq_len + 1 tokens; data-parallel replica r takes rows
[r * B/dp, (r + 1) * B/dp) of them, and the pipeline schedule (or the plain loop) cuts those into microbatches.
Under context parallelism cp rank c keeps only the tokens of its two sequence chunks, of inputs and targets alike
(runtime.parallel.context.token_positions), so a token's target stays on the rank that predicts it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from planner.errors import SpecError
from runtime.parallel.context import token_positions

SUCCESSORS = 4
"""Tokens each token can be followed by in the synthetic chain."""


@dataclass(frozen=True)
class SyntheticBigram:
    """A fixed random Markov chain over the vocabulary: token t is followed by one of SUCCESSORS tokens with
    fixed probabilities. A model that learns the table reaches the chain's entropy (about 1 nat, against
    ln(vocab) at init), so the loss visibly falls within a few steps."""

    successors: torch.Tensor
    """(vocab, SUCCESSORS) int64: the tokens that may follow each token."""
    cum_probs: torch.Tensor
    """(vocab, SUCCESSORS) float64: cumulative probabilities of those successors."""


@dataclass(frozen=True)
class TokenFile:
    tokens: np.ndarray
    """np.memmap of uint16 token ids."""
    path: str


def synthetic(vocab: int, seed: int) -> SyntheticBigram:
    g = torch.Generator().manual_seed(seed)
    successors = torch.randint(0, vocab, (vocab, SUCCESSORS), generator=g)
    probs = torch.rand(vocab, SUCCESSORS, generator=g, dtype=torch.float64) + 0.1
    return SyntheticBigram(successors, torch.cumsum(probs / probs.sum(1, keepdim=True), dim=1))


def token_file(path: str, vocab: int, seq_len: int) -> TokenFile:
    """Open a flat uint16 token file with np.memmap (nothing is read until a batch needs it)."""
    p = Path(path)
    if not p.is_file():
        raise SpecError("--data", "data", f"no such token file {path!r}; give a flat uint16 file such as nanoGPT's train.bin")
    if p.stat().st_size % 2:
        raise SpecError(path, "data", f"size {p.stat().st_size} bytes is odd; expected uint16 tokens (2 bytes each)")
    tokens = np.memmap(p, dtype=np.uint16, mode="r")
    if len(tokens) < seq_len + 2:
        raise SpecError(path, "data", f"holds {len(tokens)} tokens; a sequence needs seq_len + 1 = {seq_len + 1} and an offset")
    return TokenFile(tokens, path)


def _step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + step + 1)


def get_batch(source: SyntheticBigram | TokenFile, *, step: int, seed: int, global_batch: int, seq_len: int,
              dp_rank: int, dp: int, vocab: int, cp_rank: int = 0, cp: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) of this replica for `step`: two (global_batch/dp, seq_len/cp) int64 tensors, targets
    shifted one token to the left (before the sequence is cut over cp)."""
    rows = global_batch // dp
    lo, hi = dp_rank * rows, (dp_rank + 1) * rows
    g = _step_generator(seed, step)
    if isinstance(source, TokenFile):
        # Every replica draws all global_batch offsets and keeps its own rows, as nanoGPT draws random offsets.
        offsets = torch.randint(0, len(source.tokens) - seq_len - 1, (global_batch,), generator=g)[lo:hi]
        seqs = np.stack([source.tokens[o:o + seq_len + 1] for o in offsets.tolist()]).astype(np.int64)
        seq = torch.from_numpy(seqs)  # (rows, T+1)
        if int(seq.max()) >= vocab:
            raise SpecError(source.path, "data", f"token id {int(seq.max())} at step {step} is outside the model's vocab {vocab}")
    else:
        u = torch.rand(global_batch, seq_len + 1, generator=g, dtype=torch.float64)[lo:hi]  # (rows, T+1)
        seq = torch.empty(rows, seq_len + 1, dtype=torch.int64)
        seq[:, 0] = (u[:, 0] * vocab).long().clamp_(max=vocab - 1)
        for t in range(1, seq_len + 1):
            prev = seq[:, t - 1]
            # Index of the successor: how many cumulative probabilities u[:, t] exceeds.
            choice = (u[:, t, None] > source.cum_probs[prev]).sum(1).clamp_(max=SUCCESSORS - 1)  # (rows,)
            seq[:, t] = source.successors[prev, choice]
    x, y = seq[:, :-1], seq[:, 1:]  # (rows, T), (rows, T)
    if cp > 1:
        mine = token_positions(seq_len, cp, cp_rank)
        x, y = x[:, mine], y[:, mine]  # (rows, T/cp) each: this cp rank's two chunks
    return x.contiguous(), y.contiguous()
