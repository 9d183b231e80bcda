"""Decoding FLOPs follow what each storage format computes (issue 13): hand-counted per format."""
import torch

from kvbench.cache import KVBenchCache, LayerKV
from kvbench.metrics import attention_flops
from kvbench.methods.eigen_attention import EigenAttention
from kvbench.methods.kivi import KIVI, KIVILayer
from kvbench.methods.quest import Quest, QuestLayer
from kvbench.methods.think import ThinK, ThinKLayer


def _layer(lens=(100, 60), d=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = max(lens)
    layer = LayerKV.from_dense(torch.randn(len(lens), n, d, generator=g), torch.randn(len(lens), n, d, generator=g),
                               torch.arange(n))
    layer.keep([torch.arange(x) for x in lens])
    return layer


def test_plain_and_kivi_count_full_attention():
    layer = _layer()
    # 2 query heads per KV head, one new token per head: 4 d (L + 1) per query head
    assert layer.attention_flops(1, 2) == 4 * 32 * 2 * (101 + 61) == attention_flops([[101, 61]], 2, 32)
    st = KIVILayer.encode(KIVI(bits=2, group_size=16, residual_length=32), layer)
    assert st.attention_flops(1, 2) == layer.attention_flops(1, 2)
    cache = KVBenchCache(2)
    cache.kv = [layer, st]
    assert cache.attention_flops(1, 2) == 2 * layer.attention_flops(1, 2)


def test_think_counts_the_pruned_width():
    layer = _layer(lens=(100, 60))
    st = ThinKLayer.encode(ThinK(ratio=0.5, recent_size=32), layer, torch.randn(4, 32, 32))
    # pruned rows 68 + 28 at dk = 16, full rows 32 + 32 (+1 new each) at d = 32; PV at d over every row
    n_p, n_f = 68 + 28, 64 + 2
    assert st.attention_flops(1, 2) == 2 * 2 * (16 * n_p + 32 * n_f) + 2 * 2 * 32 * (n_p + n_f)


def test_eigen_counts_the_rank_and_the_projections():
    layer = _layer(lens=(50, 50), d=16)
    fmt = EigenAttention(rank=4)
    q = torch.linalg.qr(torch.randn(16, 16))[0]
    fmt.use_bases({"key_basis": q.unsqueeze(0), "value_basis": torch.stack([q, q]).unsqueeze(0)})
    st = fmt.encode(layer, 0, 1)
    # 4 r per row per query head over 2 * 51 rows; 4 query heads each project q (2 d r) and lift out (2 r d)
    assert st.attention_flops(1, 2) == 4 * 4 * 2 * 102 + 4 * 4 * 16 * 4


def test_quest_counts_the_selected_rows_and_the_scoring():
    layer = _layer(lens=(100, 30))
    st = QuestLayer.encode(Quest(page_size=16, token_budget=48, skip_layers=0), layer, True, 4)
    # head 0: 101 rows = 7 pages > 3: (3 - 1) full pages + the last page's 5 rows, + 6 scored pages, per query head
    # head 1: 31 rows = 2 pages <= 3: dense
    assert st.attention_flops(1, 2) == 2 * 4 * 32 * (2 * 16 + 5 + 6) + 2 * 4 * 32 * 31
    wide = QuestLayer.encode(Quest(page_size=16, token_budget=1024, skip_layers=0), layer, True, 4)
    assert wide.attention_flops(1, 2) == layer.attention_flops(1, 2)
