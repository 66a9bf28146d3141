"""``nnfast.RotaryEmbedding``: the cached tables and the module's checks."""

from __future__ import annotations

import pytest
import torch

import nnfast
from nnfast.reference import rope as ref
from tests.helpers import CUDA


def test_cache_is_fp32_non_persistent_and_exact():
    m = nnfast.RotaryEmbedding(16, 64, base=500.0)
    cos, sin = ref.rotary_cos_sin(64, 16, 500.0)
    assert m.cos.dtype == m.sin.dtype == torch.float32 and m.cos.shape == (64, 8)
    assert torch.equal(m.cos, cos) and torch.equal(m.sin, sin)
    assert dict(m.state_dict()) == {}
    assert {n for n, _ in m.named_buffers()} == {"cos", "sin"}


def test_cache_moves_with_to_but_stays_fp32():
    m = nnfast.RotaryEmbedding(8, 32)
    m.to("meta")  # a device move with no GPU: the buffers follow
    assert m.cos.device.type == "meta" and m.sin.device.type == "meta"
    m = nnfast.RotaryEmbedding(8, 32).half()
    assert m.cos.dtype == torch.float32
    assert torch.equal(m.cos, ref.rotary_cos_sin(32, 8)[0])  # rebuilt, not round-tripped
    m.to(torch.bfloat16)
    assert m.sin.dtype == torch.float32
    if CUDA:
        m.to("cuda")
        assert m.cos.is_cuda and m.cos.dtype == torch.float32


@pytest.mark.parametrize("interleaved", [False, True])
def test_forward_matches_reference_partial_rotary(interleaved):
    torch.manual_seed(0)
    m = nnfast.RotaryEmbedding(16, 64, interleaved=interleaved)
    q, k = torch.randn(2, 4, 5, 24), torch.randn(2, 2, 5, 24)
    qo, ko = m(q, k, offset=7)
    qe, ke = ref.apply_rotary(q, k, m.cos, m.sin, None, 7, interleaved)
    torch.testing.assert_close(qo, qe)
    torch.testing.assert_close(ko, ke)
    assert torch.equal(qo[..., 16:], q[..., 16:])
    pos = torch.tensor([[0, 3, 9, 63, 1], [5, 5, 5, 5, 5]])
    qo, ko = m(q, k, position_ids=pos)
    qe, ke = ref.apply_rotary(q, k, m.cos, m.sin, pos, 0, interleaved)
    torch.testing.assert_close(qo, qe)
    torch.testing.assert_close(ko, ke)


def test_positions_past_the_table_raise():
    m = nnfast.RotaryEmbedding(8, 16)
    q = torch.randn(1, 2, 4, 8)
    m(q, q, offset=12)  # positions 12..15: the last rows, fine
    with pytest.raises(ValueError, match="max_seq_len"):
        m(q, q, offset=13)
    with pytest.raises(ValueError, match="max_seq_len"):
        m(q, q, position_ids=torch.tensor([0, 1, 2, 16]))
    with pytest.raises(ValueError, match="max_seq_len"):
        m(q, q, position_ids=torch.tensor([0, -1, 2, 3]))


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="dim"):
        nnfast.RotaryEmbedding(7, 16)
    with pytest.raises(ValueError, match="max_seq_len"):
        nnfast.RotaryEmbedding(8, 0)
