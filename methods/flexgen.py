"""FlexGen's KV-cache compression — Sheng et al., "FlexGen: High-Throughput Generative Inference of Large
Language Models with a Single GPU" (ICML 2023, 2303.06865), Section 5 "Approximate methods".

Group-wise asymmetric min-max quantization to 4 bits in groups of 64 along the head dimension (the official
code's `group_dim=2` of its (tokens, batch x heads, head_dim) cache): keys and values alike, per token, every
token quantized as it is stored (no full-precision residual). Same packed format and machinery as KIVI
(methods/kivi.py), which differs in quantizing keys per channel and keeping a residual: here only the axis of
the key groups and the residual rule change. Decoding runs KIVI's kernels (methods/kernels/kivi_decode.py),
whose tiles and append read per-token keys as they read values: on the GPU the engine loop and the CUDA-graph
path (`KIVILayer.device_step`) both use them.
"""
from __future__ import annotations

from dataclasses import dataclass

from kvbench.method import Method, register_method
from kvbench.store import register_storage

from .kivi import BITS, KIVI


@register_storage("flexgen")
@dataclass
class FlexGenQuant(KIVI):
    bits: int = 4                # the paper's setting
    group_size: int = 64         # channels per group (per token), keys and values
    residual_length: int = 0     # FlexGen keeps none; > 0 keeps that many recent tokens in full precision

    paper = "FlexGen: High-Throughput Generative Inference of LLMs with a Single GPU (2303.06865), group-wise 4-bit"
    key_per_channel = False

    def __post_init__(self):
        if self.bits not in BITS:
            raise ValueError(f"method.storage.bits={self.bits!r}; allowed: {', '.join(map(str, BITS))}")
        if not isinstance(self.group_size, int) or self.group_size <= 0:
            raise ValueError(f"method.storage.group_size={self.group_size!r}; allowed: a positive integer")
        if not isinstance(self.residual_length, int) or self.residual_length < 0:
            raise ValueError(f"method.storage.residual_length={self.residual_length!r}; allowed: an integer >= 0")


@register_method("flexgen")
@dataclass
class FlexGenMethod(Method):
    """Every token kept, stored in FlexGen's group-wise 4-bit format."""
    bits: int = 4
    group_size: int = 64
    residual_length: int = 0

    paper = FlexGenQuant.paper
    family = "quantization: per-token groups along the head dim, keys and values"
    uses_budget = False

    def __post_init__(self):
        super().__post_init__()
        self.storage = FlexGenQuant(self.bits, self.group_size, self.residual_length)
