"""Context parallelism's layout (runtime.parallel.context): the 2*cp chunks of the cp ranks tile the sequence, the
causal work is the same on every rank, and the data loader hands each rank exactly its tokens."""

from __future__ import annotations

import pytest
import torch

from runtime import data
from runtime.parallel.context import chunk_ids, token_positions


@pytest.mark.parametrize("cp", [1, 2, 4])
def test_the_cp_ranks_chunks_tile_the_sequence_once(cp):
    seq_len = 32
    positions = torch.cat([token_positions(seq_len, cp, r) for r in range(cp)])
    assert sorted(positions.tolist()) == list(range(seq_len))
    assert chunk_ids(cp, 0) == (0, 2 * cp - 1)


@pytest.mark.parametrize("cp", [2, 4])
def test_every_cp_rank_does_the_same_causal_attention_work(cp):
    # Under the causal mask a query at position i reads i + 1 keys: each rank's sum is the same.
    work = [int((token_positions(64, cp, r) + 1).sum()) for r in range(cp)]
    assert len(set(work)) == 1, work


def test_a_cp_rank_gets_the_inputs_and_targets_of_its_own_tokens():
    source = data.synthetic(256, seed=0)
    kwargs = dict(step=3, seed=0, global_batch=4, seq_len=32, dp_rank=1, dp=2, vocab=256)
    x, y = data.get_batch(source, **kwargs)
    for r in range(2):
        xr, yr = data.get_batch(source, **kwargs, cp_rank=r, cp=2)
        mine = token_positions(32, 2, r)
        assert xr.shape == (2, 16) and torch.equal(xr, x[:, mine]) and torch.equal(yr, y[:, mine])
