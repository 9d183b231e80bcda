"""linear_flops_per_token against torch's FlopCounterMode for one decode token (issue 15).

Each tiny random model (fp32, hidden 64, 2 layers, eager attention) prefills a short prompt into its own cache;
then one forward of a single new token with logits_to_keep=1 (what the engine runs per decode step) is counted.
Eager attention does QKᵀ and PV as plain matmuls, which FlopCounterMode counts too: that part is computed
explicitly with attention_flops over the cache length and subtracted, so what is compared is the weight matmuls.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from kvbench.compat import cache_kwargs
from kvbench.metrics import attention_flops, attention_shape, decode_flops_per_token, linear_flops_per_token

PROMPT = 12
COMMON = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=256)
MOE = {
    # fused 3-D experts, 8 experts, top-2
    "qwen3_moe": dict(intermediate_size=128, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
                      num_key_value_heads=2, head_dim=16, decoder_sparse_step=1, mlp_only_layers=[]),
    # fused experts plus an always-on shared expert and its sigmoid gate
    "qwen2_moe": dict(intermediate_size=128, moe_intermediate_size=32, shared_expert_intermediate_size=64,
                      num_experts=8, num_experts_per_tok=2, num_key_value_heads=2, decoder_sparse_step=1,
                      mlp_only_layers=[]),
    "mixtral": dict(intermediate_size=32, num_local_experts=8, num_experts_per_tok=2, num_key_value_heads=2,
                    head_dim=16),
}
DENSE = {
    "llama": dict(intermediate_size=128, num_key_value_heads=2, head_dim=16),
    "gpt2": dict(n_inner=128, bos_token_id=0, eos_token_id=0),  # Conv1D projections
}


def build(model_type: str, extra: dict, experts: str | None = None):
    from transformers import AutoConfig, AutoModelForCausalLM
    torch.manual_seed(0)
    cfg = AutoConfig.for_model(model_type, **COMMON, **extra)
    kw = {"experts_implementation": experts} if experts else {}
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="eager", **kw)
    return model.eval()


def _grouped_mm_flops(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    """FlopCounterMode has no formula for aten._grouped_mm (transformers' default "grouped_mm" experts path):
    without one it counts the routed experts as 0. In the MoE form, input (S, K) sorted by expert and weights
    (E, K, N), each of the S token-expert rows is multiplied by its one expert's (K, N) matrix: 2·S·K·N."""
    assert len(a_shape) == 2 and len(b_shape) == 3
    return 2 * a_shape[0] * a_shape[1] * b_shape[2]


@torch.no_grad()
def counted_decode_flops(model) -> tuple[int, int]:
    """(FLOPs counted for one decode token, the eager-attention part of them)."""
    from transformers import DynamicCache
    ids = torch.randint(0, model.config.vocab_size, (1, PROMPT + 1))
    cache = DynamicCache(config=model.config)
    model(input_ids=ids[:, :PROMPT], **cache_kwargs(model, cache, torch.arange(PROMPT)), use_cache=True)
    with FlopCounterMode(display=False, custom_mapping={torch.ops.aten._grouped_mm: _grouped_mm_flops}) as fc:
        model(input_ids=ids[:, PROMPT:], **cache_kwargs(model, cache, torch.arange(PROMPT, PROMPT + 1)),
              use_cache=True, logits_to_keep=1)
    n_kv, group, d = attention_shape(model.config)
    attn = attention_flops([[PROMPT + 1] * n_kv] * model.config.num_hidden_layers, group, d)
    return fc.get_total_flops(), attn


def rel(a: float, b: float) -> float:
    return abs(a - b) / b


# eager loops over the experts hit (exactly top-k for one token, each an F.linear → mm); batched_mm gathers the
# top-k experts' weights into one bmm; grouped_mm (the default) runs one grouped kernel over the top-k rows.
@pytest.mark.parametrize("experts", ["eager", "batched_mm", "grouped_mm"])
@pytest.mark.parametrize("model_type", list(MOE))
def test_moe_counts_only_active_experts(model_type, experts):
    model = build(model_type, MOE[model_type], experts)
    counted, attn = counted_decode_flops(model)
    measured = counted - attn
    analytic = linear_flops_per_token(model)
    # every expert counted, as if top-k were all of them
    cfg = model.config
    k = cfg.num_experts_per_tok
    cfg.num_experts_per_tok = getattr(cfg, "num_experts", None) or cfg.num_local_experts
    all_experts = linear_flops_per_token(model)
    cfg.num_experts_per_tok = k
    print(f"{model_type}/{experts}: measured {measured} analytic {analytic} all-experts {all_experts}")
    assert rel(analytic, measured) < 0.05
    assert rel(all_experts, measured) > 0.05
    # the engine's per-step figure: weights + attention over the cache
    lens = [[PROMPT + 1] * attention_shape(cfg)[0]] * cfg.num_hidden_layers
    assert rel(decode_flops_per_token(model, lens), counted) < 0.05


@pytest.mark.parametrize("model_type", list(DENSE))
def test_dense_models(model_type):
    model = build(model_type, DENSE[model_type])
    counted, attn = counted_decode_flops(model)
    measured = counted - attn
    analytic = linear_flops_per_token(model)
    print(f"{model_type}: measured {measured} analytic {analytic}")
    assert rel(analytic, measured) < 0.05


class _MLP(torch.nn.Module):
    def __init__(self, h: int, i: int):
        super().__init__()
        self.w1, self.w3, self.w2 = torch.nn.Linear(h, i), torch.nn.Linear(h, i), torch.nn.Linear(i, h)

    def forward(self, x):
        return self.w2(torch.nn.functional.silu(self.w1(x)) * self.w3(x))


class _ListMoE(torch.nn.Module):
    """The older layout: a router Linear and a ModuleList of per-expert MLPs; only the top-k experts run."""

    def __init__(self, h=64, i=32, n=8, k=2, vocab=256):
        super().__init__()
        self.config = SimpleNamespace(num_experts_per_tok=k)
        self.embed = torch.nn.Embedding(vocab, h)
        self.gate = torch.nn.Linear(h, n, bias=False)
        self.experts = torch.nn.ModuleList(_MLP(h, i) for _ in range(n))
        self.lm_head = torch.nn.Linear(h, vocab, bias=False)

    def forward(self, ids):
        x = self.embed(ids)[0]
        w, idx = torch.topk(self.gate(x).softmax(-1), self.config.num_experts_per_tok, dim=-1)
        y = sum(w[0, j] * self.experts[int(e)](x) for j, e in enumerate(idx[0]))
        return self.lm_head(x + y)


@torch.no_grad()
def test_expert_module_list():
    torch.manual_seed(0)
    model = _ListMoE().eval()
    with FlopCounterMode(display=False) as fc:
        model(torch.tensor([[3]]))
    measured, analytic = fc.get_total_flops(), linear_flops_per_token(model)
    print(f"module-list moe: measured {measured} analytic {analytic}")
    assert rel(analytic, measured) < 0.05
    model.config.num_experts_per_tok = 8
    assert rel(linear_flops_per_token(model), measured) > 0.05
