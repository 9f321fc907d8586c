"""runtime/data.py: token batches indexed by step, split by dp replica, from the synthetic chain or a uint16 token file."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from planner.errors import SpecError
from runtime.data import SUCCESSORS, get_batch, synthetic, token_file

VOCAB, T = 256, 32


def batch(source, step, dp_rank=0, dp=1, seed=0, global_batch=8):
    return get_batch(source, step=step, seed=seed, global_batch=global_batch, seq_len=T, dp_rank=dp_rank, dp=dp, vocab=VOCAB)


def test_a_batch_depends_only_on_seed_and_step():
    a, b = synthetic(VOCAB, 0), synthetic(VOCAB, 0)
    x5, y5 = batch(a, 5)
    batch(b, 0), batch(b, 1)  # whatever ran before
    assert torch.equal(batch(b, 5)[0], x5) and torch.equal(batch(b, 5)[1], y5)
    assert not torch.equal(batch(a, 6)[0], x5)
    assert not torch.equal(batch(synthetic(VOCAB, 1), 5, seed=1)[0], x5)


def test_dp_replicas_see_disjoint_slices_of_the_global_batch():
    source = synthetic(VOCAB, 0)
    whole = batch(source, 3)[0]
    parts = [batch(source, 3, dp_rank=r, dp=4)[0] for r in range(4)]
    assert all(p.shape == (2, T) for p in parts)
    assert torch.equal(torch.cat(parts), whole)


def test_synthetic_targets_are_the_next_tokens_of_the_markov_chain():
    source = synthetic(VOCAB, 0)
    x, y = batch(source, 0)
    assert x.shape == y.shape == (8, T) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    # Every transition is one of the SUCCESSORS allowed ones: the stream is learnable.
    allowed = (source.successors[x] == y[..., None]).any(-1)
    assert allowed.all()
    assert source.successors.shape == (VOCAB, SUCCESSORS)


def test_token_file_batches_are_slices_of_the_file(tmp_path):
    tokens = (np.arange(10_000) % VOCAB).astype(np.uint16)
    path = tmp_path / "tokens.bin"
    tokens.tofile(path)
    source = token_file(str(path), VOCAB, T)
    x, y = batch(source, 2)
    assert x.shape == (8, T)
    # Consecutive tokens of the file: each row counts up by one (mod vocab), targets one further.
    assert torch.equal((x[:, 1:] - x[:, :-1]) % VOCAB, torch.ones(8, T - 1, dtype=torch.int64))
    assert torch.equal(y, (x + 1) % VOCAB)
    assert torch.equal(batch(source, 2, dp_rank=1, dp=2)[0], x[4:])


def test_token_file_with_an_id_outside_the_vocab_is_refused(tmp_path):
    path = tmp_path / "tokens.bin"
    np.full(1000, 300, dtype=np.uint16).tofile(path)
    with pytest.raises(SpecError, match="outside the model's vocab 256"):
        batch(token_file(str(path), VOCAB, T), 0)


@pytest.mark.parametrize("content,match", [(None, "no such token file"), (b"\x00" * 3, "odd"), (b"\x00" * 20, "holds 10 tokens")])
def test_bad_token_file_is_refused_naming_data(tmp_path, content, match):
    path = tmp_path / "tokens.bin"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(SpecError, match=match) as e:
        token_file(str(path), VOCAB, T)
    assert e.value.field == "data"


def test_launch_trains_on_a_token_file(tmp_path):
    from tests.runtime.planfiles import run_layout

    path = tmp_path / "tokens.bin"
    (np.arange(50_000) % 97).astype(np.uint16).tofile(path)  # a cycle: the next token is fully predictable
    losses = run_layout(tmp_path, steps=4, extra=("--data", str(path)))["losses"]
    assert len(losses) == 4 and losses[-1] < losses[0]
