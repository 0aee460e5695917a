"""The slot pool by hand: where rows write, what they read, the mask and positions, moves between slots."""

from __future__ import annotations

import torch

from llmforge.infer import SlotKVCache


def _cache() -> SlotKVCache:
    return SlotKVCache(num_layers=2, num_slots=4, max_len=8, num_kv_heads=2, head_dim=3)


def test_rows_write_their_own_slots_at_their_own_positions():
    c = _cache()
    # row 0: slot 2, 3 new tokens from position 1; row 1: slot 0, 1 new token at position 4 (right-padded)
    c.bind([2, 0], starts=[1, 4], lengths=[3, 1])
    k = torch.arange(2 * 2 * 3 * 3, dtype=torch.float32).view(2, 2, 3, 3) + 1  # [B, H, T, D]
    keys, values = c.update(1, k, -k)
    assert torch.equal(values, -keys)
    assert torch.equal(c.k[1, 2, :, 1:4], k[0])
    assert torch.equal(c.k[1, 0, :, 4], k[1, :, 0])
    assert torch.equal(c.v[1, 0, :, 4], -k[1, :, 0])
    assert c.k[1, 0, :, 5:].abs().sum() == 0  # the padding columns of row 1 are not written
    assert c.k[0].abs().sum() == 0  # other layers untouched
    # the read covers positions 0..max(end)-1 of the rows' slots, in row order
    assert keys.shape == (2, 2, 5, 3)
    assert torch.equal(keys[0], c.k[1, 2, :, :5]) and torch.equal(keys[1], c.k[1, 0, :, :5])
    mask = c.attention_mask()[:, 0]  # [B, T, S]
    expected = torch.tensor(
        [
            [[1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0]],  # causal from position 1
            [[1, 1, 1, 1, 1]] * 3,  # the real query at 4 sees 0..4; padding queries repeat it
        ],
        dtype=torch.bool,
    )
    assert torch.equal(mask, expected)
    assert c.position_ids().tolist() == [[1, 2, 3], [4, 4, 4]]


def test_contiguous_rows_read_a_view_and_others_a_gather():
    c = _cache()
    c.bind([1, 2], starts=[0, 0], lengths=[1, 1])
    keys, _ = c.update(0, torch.ones(2, 2, 1, 3), torch.ones(2, 2, 1, 3))
    assert keys.data_ptr() == c.k[0, 1].data_ptr()  # no copy on the decode path
    c.bind([2, 1], starts=[1, 1], lengths=[1, 1])
    keys, _ = c.update(0, torch.full((2, 2, 1, 3), 2.0), torch.ones(2, 2, 1, 3))
    assert keys.data_ptr() != c.k[0, 2].data_ptr()
    assert torch.equal(keys[0, :, 1], torch.full((2, 3), 2.0)) and torch.equal(
        keys[1, :, 0], torch.ones(2, 3)
    )


def test_moves_read_every_source_before_writing():
    c = _cache()
    c.k[:, 0, :, :3], c.k[:, 1, :, :2] = 1.0, 2.0
    c.move([(0, 1, 3), (1, 0, 2)])  # a swap
    assert (c.k[:, 1, :, :3] == 1.0).all() and (c.k[:, 0, :, :2] == 2.0).all()
