"""Merged rows carry a log-weight into attention (kvbench/cache.py side data, kvbench/attention.py): a row of
weight w attends exactly as w copies of itself, through every path, and survives keeps, appends and removals."""
import math

import pytest
import torch

from kvbench.attention import attend
from kvbench.cache import LayerKV


def _layer(n=6, h=2, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return LayerKV.from_dense(torch.randn(h, n, d, generator=g), torch.randn(h, n, d, generator=g), torch.arange(n))


@pytest.mark.parametrize("q_len,need_probs", [(1, False), (1, True), (3, False)])
def test_weighted_row_equals_its_copies(q_len, need_probs):
    layer = _layer()
    layer.set_side("log_weight", torch.tensor([[0, 0, math.log(4), 0, 0, 0], [0.0] * 6]))
    q = torch.randn(4, q_len, 8, generator=torch.Generator().manual_seed(1))
    out, probs = attend(q, layer, 0.3, need_probs=need_probs)
    k, v, _ = layer.dense()
    # the same cache with head 0's row 2 stored 4 times (3 extra copies before the new tokens, which stay last)
    k0 = torch.cat([k[0, :2], k[0, 2:3].repeat(4, 1), k[0, 3:]])
    v0 = torch.cat([v[0, :2], v[0, 2:3].repeat(4, 1), v[0, 3:]])
    ref0 = attend(q[:2], LayerKV.from_dense(k0[None], v0[None], torch.arange(9)), 0.3)[0]
    ref1 = attend(q[2:], LayerKV.from_dense(k[1:2], v[1:2], torch.arange(6)), 0.3)[0]
    assert torch.allclose(out, torch.cat([ref0, ref1]), atol=1e-5)
    if need_probs:  # the weighted row's probability is its 4 copies' together
        p_copies = attend(q[:2], LayerKV.from_dense(k0[None], v0[None], torch.arange(9)), 0.3, need_probs=True)[1][0]
        assert torch.allclose(probs[0][2], p_copies[2:6].sum(), atol=1e-5)


def test_side_data_follows_its_rows():
    layer = _layer(n=6, h=2)
    layer.set_side("log_weight", torch.arange(12, dtype=torch.float32).view(2, 6))
    layer.keep([torch.tensor([1, 4]), torch.tensor([0, 2, 5])])       # ragged keep
    assert layer.side_head("log_weight", 0).tolist() == [1, 4] and layer.side_head("log_weight", 1).tolist() == [6, 8, 11]
    layer.append(torch.zeros(2, 1, 8), torch.zeros(2, 1, 8), torch.tensor([6]))  # new rows weigh 1: log 0
    assert layer.side_head("log_weight", 1).tolist() == [6, 8, 11, 0]
    layer.remove(1, 0)                                                # the last row moves into the hole
    assert layer.side_head("log_weight", 1).tolist() == [0, 8, 11]
    layer.reserve(5)
    c = layer.clone()
    assert c.side_head("log_weight", 0).tolist() == [1, 4, 0] and c.side["log_weight"] is not layer.side["log_weight"]


def test_accumulated_scores_ride_with_their_rows():
    """H2O / D2O keep each row's accumulated attention as side data: new rows start at 0, a keep gathers the
    kept rows' scores, a removal takes the row's score with it (no hand-written mirror of the score array)."""
    layer = _layer(n=4, h=2)
    layer.add_side("s", torch.tensor([[1.0, 2, 3, 4], [5, 6, 7, 8]]))
    layer.append(torch.zeros(2, 1, 8), torch.zeros(2, 1, 8), torch.tensor([4]))
    layer.add_side("s", torch.ones(2, 5))                     # a step's attention over every row, new one included
    assert layer.side_dense("s").tolist() == [[2, 3, 4, 5, 1], [6, 7, 8, 9, 1]]
    layer.keep(torch.tensor([[0, 3, 4], [1, 2, 4]]))
    assert layer.side_dense("s").tolist() == [[2, 5, 1], [7, 8, 1]]
    layer.remove(0, 0)
    assert layer.side_head("s", 0).tolist() == [1, 5] and layer.side_head("s", 1).tolist() == [7, 8, 1]
