"""transformers moves fast; the few places where its API changed inside our tested range live here.

Tested range: pyproject.toml pins it (lowest = the GPU machine's 5.17, highest = the newest release CI ran).
- 5.24 renamed the model's `past_key_values` argument to `cache` (the old name warns, and is removed in 5.40)
  and dropped `cache_position` from the model's signature (positions come from `position_ids`); attention
  layers call `cache.update(k, v, layer_idx, kwargs=...)`, which `KVBenchCache.update` accepts.
"""
from __future__ import annotations

import inspect

import torch


_PARAMS: dict[type, frozenset[str]] = {}  # a plain dict, not lru_cache: torch.compile traces through this


def _forward_params(cls: type) -> frozenset[str]:
    if cls not in _PARAMS:
        _PARAMS[cls] = frozenset(inspect.signature(cls.forward).parameters)
    return _PARAMS[cls]


def cache_kwargs(model: torch.nn.Module, cache, positions: torch.Tensor,
                 cache_position: torch.Tensor | None = None) -> dict:
    """The keyword arguments that hand `cache` and the new tokens' positions (1-D) to `model`'s forward,
    under the names this transformers version uses (never a deprecated one). `cache_position` (slots in a
    transformers cache; versions before 5.24 only) defaults to the positions, as in a KVBenchCache."""
    params = _forward_params(type(model))
    kw = {"cache" if "cache" in params else "past_key_values": cache, "position_ids": positions.view(1, -1)}
    if "cache_position" in params:
        kw["cache_position"] = (positions if cache_position is None else cache_position).view(-1)
    return kw
