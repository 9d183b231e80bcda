"""Capacity planning: what a run's measured KV bytes mean for serving on a given GPU.

The README's "Capacity planning" section gives the formulas (after Fu et al. 2024, arXiv 2405.08944); the
functions below implement them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .tables import PaperTable

MIB, GIB = 2**20, 2**30
MEM_UTIL = 0.9      # vLLM's gpu_memory_utilization default
DEFAULT_GPU = "h100-80gb"


@dataclass(frozen=True)
class GPUSpec:
    name: str
    memory_bytes: int        # what the driver reports as the card's total (what a usable fraction applies to)
    bandwidth_bytes_per_s: float

    def describe(self) -> str:
        return f"{self.name}: {self.memory_bytes / GIB:.2f} GiB, {self.bandwidth_bytes_per_s / 1e12:.3g} TB/s"


# NVIDIA's datasheets give 80GB / 141GB / 48GB and the bandwidths below (TB = 10^12 B): H100 SXM5 80GB 3.35 TB/s,
# H200 SXM 141GB 4.8 TB/s, A100 SXM4 80GB 2.039 TB/s and 40GB 1.555 TB/s, L40S 48GB GDDR6 with ECC 864 GB/s.
# Their "GB" is not 10^9 bytes: the cards carry 80 / 144 / 80 / 40 / 48 GiB, and the driver reports a little
# less (reserved memory, ECC). We use the total nvidia-smi reports (memory.total, MiB), the number a usable
# fraction such as vLLM's applies to: H100 80GB HBM3 81559 MiB and H200 143771 MiB (seen on this project's
# machines, /work/.library/device/KINDS.md); A100 80GB 81920 MiB, A100 40GB 40960 MiB, L40S 46068 MiB (ECC on;
# nvidia-smi totals listed in modal-labs/modal-client PR #2797, the L40S's also in akash-network/provider-configs
# PR #99). So "141GB" is 140.4 GiB = 150.8e9 bytes, not 141e9.
GPUS = {
    "h100-80gb": GPUSpec("h100-80gb", 81559 * MIB, 3.35e12),
    "h200-141gb": GPUSpec("h200-141gb", 143771 * MIB, 4.8e12),
    "a100-80gb": GPUSpec("a100-80gb", 81920 * MIB, 2.039e12),
    "a100-40gb": GPUSpec("a100-40gb", 40960 * MIB, 1.555e12),
    "l40s-48gb": GPUSpec("l40s-48gb", 46068 * MIB, 0.864e12),
}
CUSTOM_FORM = "mem_gb=N,bw_tbs=N[,name=NAME] (or mem_gib=N)"


def parse_gpu(text: str) -> GPUSpec:
    """A shipped GPU by name, or a custom one `mem_gb=80,bw_tbs=3.35[,name=mycard]` (mem_gib= for GiB);
    ValueError with one line naming the bad value and the allowed ones."""
    allowed = f"allowed: {', '.join(GPUS)}, or {CUSTOM_FORM}"
    if text in GPUS:
        return GPUS[text]
    if "=" not in text:
        raise ValueError(f"--gpu {text!r} is not a known GPU; {allowed}")
    fields = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if not sep or key.strip() not in ("mem_gb", "mem_gib", "bw_tbs", "name") or key.strip() in fields:
            raise ValueError(f"--gpu {text!r}: bad field {part!r}; {allowed}")
        fields[key.strip()] = value.strip()
    try:
        mems = [float(fields[k]) * unit for k, unit in (("mem_gb", 1e9), ("mem_gib", GIB)) if k in fields]
        bandwidth = float(fields["bw_tbs"]) * 1e12 if "bw_tbs" in fields else math.nan
    except ValueError:
        raise ValueError(f"--gpu {text!r}: mem_gb, mem_gib and bw_tbs take numbers; {allowed}") from None
    if len(mems) != 1 or not mems[0] > 0 or not bandwidth > 0 or math.isinf(mems[0] + bandwidth):
        raise ValueError(f"--gpu {text!r} needs one positive memory size (mem_gb or mem_gib) and a positive "
                         f"bw_tbs; {allowed}")
    return GPUSpec(fields.get("name") or "custom", int(mems[0]), bandwidth)


# -- the arithmetic ---------------------------------------------------------------------------------------
def kv_room_bytes(memory_bytes: float, mem_util: float, weight_bytes: float) -> float:
    """Bytes left for KV caches: the usable part of the card minus the weights (negative: they do not fit)."""
    return memory_bytes * mem_util - weight_bytes


def max_concurrent_sequences(memory_bytes: float, mem_util: float, weight_bytes: float,
                             kv_bytes_per_sequence: float) -> int:
    """How many sequences' KV caches fit beside the weights (0 when not one does)."""
    return max(0, math.floor(kv_room_bytes(memory_bytes, mem_util, weight_bytes) / kv_bytes_per_sequence))


def longest_context_tokens(memory_bytes: float, mem_util: float, weight_bytes: float,
                           kv_bytes_held: float, context_tokens: float) -> int:
    """The longest context one sequence fits: the room for KV over the bytes held per context token at the
    measured length (a linear extrapolation)."""
    held_per_token = kv_bytes_held / context_tokens
    return max(0, math.floor(kv_room_bytes(memory_bytes, mem_util, weight_bytes) / held_per_token))


def decode_tokens_per_s_bound(batch: int, bandwidth_bytes_per_s: float, weight_bytes: float,
                              kv_bytes_read_per_token: float) -> float:
    """Memory-bound decoding: one step of `batch` sequences reads the weights once and each sequence's KV,
    so it takes at least (weights + batch × KV read) / bandwidth and yields `batch` tokens."""
    return batch * bandwidth_bytes_per_s / (weight_bytes + batch * kv_bytes_read_per_token)


# -- weights --------------------------------------------------------------------------------------------
def param_count(shape: dict) -> int:
    """Parameters of a Llama-style decoder shape (kvbench.models.SYNTHETIC_SHAPES): embeddings; per layer
    q/k/v/o projections (+ q/k/v biases for qwen2, as its attention_bias), MLP gate/up/down and two RMSNorms;
    the final norm; the lm_head unless tied to the embeddings."""
    hidden, inter, layers, vocab = (shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"],
                                    shape["vocab_size"])
    head_dim = shape.get("head_dim") or hidden // shape["num_attention_heads"]
    q_out, kv_out = shape["num_attention_heads"] * head_dim, shape["num_key_value_heads"] * head_dim
    bias = shape.get("attention_bias", shape["model_type"] == "qwen2")
    per_layer = (hidden * q_out + 2 * hidden * kv_out + q_out * hidden  # q, k, v, o
                 + (q_out + 2 * kv_out if bias else 0)
                 + 3 * hidden * inter                                   # gate, up, down
                 + 2 * hidden)                                          # input and post-attention norms
    embeddings = vocab * hidden
    lm_head = 0 if shape.get("tie_word_embeddings") else vocab * hidden
    return embeddings + layers * per_layer + hidden + lm_head


DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def dtype_bytes(config: dict, conditions: dict) -> int | None:
    """Bytes per parameter as the run loaded them: its dtype; `auto` is bf16 on a GPU, float32 on a CPU."""
    dtype = str(conditions.get("dtype") or config.get("dtype") or "auto").removeprefix("torch.")
    if dtype in DTYPE_BYTES:
        return DTYPE_BYTES[dtype]
    device = str(conditions.get("device") or "")
    if dtype == "auto" and device:
        return 2 if device.startswith("cuda") else 4
    return None


def weight_bytes_of(summary: dict, config: dict) -> tuple[float | None, str]:
    """(weight bytes of the run's model, where from); None and why not when they cannot be known."""
    conditions = summary.get("conditions") or {}
    if isinstance(conditions.get("model_weight_bytes"), (int, float)):
        return float(conditions["model_weight_bytes"]), "measured"
    from kvbench.models import EMBEDDED, SYNTHETIC_SHAPES  # plain dicts: no torch
    model = config.get("model") if isinstance(config.get("model"), dict) else {}
    name = model.get("name")
    # a synthetic shape, or an embedded model of that very shape (smollm2-135m)
    shape = model.get("shape") if name == "synthetic" else name if name in EMBEDDED and not model.get("path") else None
    if shape not in SYNTHETIC_SHAPES:
        return None, ("the summary carries no conditions.model_weight_bytes (written before it was recorded) and "
                      "the model is not a synthetic shape")
    nbytes = dtype_bytes(config, conditions)
    if nbytes is None:
        return None, f"shape {shape}: its dtype is unknown (dtype auto and no conditions.device)"
    return float(param_count(SYNTHETIC_SHAPES[shape]) * nbytes), f"{shape} parameter count"


# -- per-sequence bytes while decoding ------------------------------------------------------------------
def decode_held_bytes(record: dict) -> float | None:
    """The most K+V bytes one query held while it decoded, from its record: the compressed context (kv_bytes)
    plus every token appended after it (the question when it was fed after compression, the answer), each at
    the full cache's bytes per token (plain storage; a quantized format holds less), at most its measured
    kv_bytes_held_max (methods that evict while decoding hold less). None when the record cannot say (a
    query-agnostic first query of a run written before records carried `question_tokens`)."""
    held_max = record.get("kv_bytes_held_max")
    meta = record.get("meta") or {}
    ctx, new = record.get("context_tokens"), record.get("new_tokens")
    if record.get("context_reused") and "cache_tokens_before_answer" not in meta:
        return held_max  # its peak was reset before its question: the held max is the decode-phase peak
    if "cache_tokens_before_answer" in meta and ctx:
        appended = meta["cache_tokens_before_answer"] - ctx  # multi-turn: questions and earlier turns' answers
    elif record.get("query_aware") is True:
        appended = 0  # the question was compressed with the context (context_tokens counts it)
    elif record.get("question_tokens") is not None:
        appended = record["question_tokens"]  # fed on top of the compressed context (recorded since issue 14)
    else:
        return None
    if not ctx or new is None or record.get("kv_bytes") is None or not record.get("kv_bytes_full"):
        return None
    held = record["kv_bytes"] + (appended + new) * record["kv_bytes_full"] / ctx
    return min(held, held_max) if held_max is not None else held


def run_decode_held_bytes(records: list[dict]) -> float | None:
    """Mean over the run's ok records of decode_held_bytes (as the summary's means); None unless every one
    can be derived."""
    values = [decode_held_bytes(r) for r in records if r.get("status", "ok") == "ok"]
    if not values or any(v is None for v in values):
        return None
    return sum(values) / len(values)


# -- tables ---------------------------------------------------------------------------------------------
COLUMNS = ["budget", "task", "status", "KV after compression MiB", "KV held max MiB", "KV held decoding MiB",
           "max sequences", "longest context tokens", "decode tok/s bound, max sequences",
           "decode tok/s bound, batch 1", "measured decode tok/s, batch 1", "measured on"]


class CapacityTable(PaperTable):
    """A PaperTable whose cells are already text (so to_markdown / to_html render it); nothing in bold."""

    def cells(self) -> list[list[str]]:
        return [list(vals) for _, vals, _ in self.rows]

    def bold(self) -> list[list[bool]]:
        return [[False] * len(self.columns) for _ in self.rows]


def _num(v) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def _mib(v) -> str:
    return "-" if v is None else f"{v / MIB:.2f}"


def _count(v) -> str:
    return "-" if v is None else f"{v:,}"


def _rate(v) -> str:
    return "-" if v is None else f"{v:,.1f}"


def capacity_row(summary: dict, decode_held: float | None, weight_bytes: float | None, gpu: GPUSpec,
                 mem_util: float) -> tuple[list[str], bool]:
    """The cells of one run from its measured numbers (after `budget`, `task`, `status`); and whether its
    sequences were counted at kv_bytes_held_max (no decode-phase size)."""
    kv, held_max = _num(summary.get("kv_bytes")), _num(summary.get("kv_bytes_held_max"))
    ctx, read = _num(summary.get("context_tokens")), _num(summary.get("kv_bytes_read_per_token"))
    ms = _num(summary.get("decode_ms_per_token"))
    per_sequence = decode_held if decode_held is not None else held_max
    seqs = longest = bound_max = bound_1 = None
    if weight_bytes is not None and per_sequence:
        seqs = max_concurrent_sequences(gpu.memory_bytes, mem_util, weight_bytes, per_sequence)
    if weight_bytes is not None and held_max and ctx:
        longest = longest_context_tokens(gpu.memory_bytes, mem_util, weight_bytes, held_max, ctx)
    fits = weight_bytes is not None and kv_room_bytes(gpu.memory_bytes, mem_util, weight_bytes) > 0
    if fits and read is not None:
        bound_1 = decode_tokens_per_s_bound(1, gpu.bandwidth_bytes_per_s, weight_bytes, read)
        if seqs:
            bound_max = decode_tokens_per_s_bound(seqs, gpu.bandwidth_bytes_per_s, weight_bytes, read)
    fallback = decode_held is None and seqs is not None
    device = (summary.get("conditions") or {}).get("device")
    return [_mib(kv), _mib(held_max), _mib(decode_held), _count(seqs) + (" *" if fallback else ""),
            _count(longest), _rate(bound_max), _rate(bound_1), _rate(1000 / ms if ms else None),
            str(device) if device else "-"], fallback


def capacity_tables(df, runs, gpus: list[GPUSpec], mem_util: float) -> tuple[list[CapacityTable], list[str]]:
    """One table per (GPU, model): a row per run (the tidy table's whole-run rows, in its order); and one line
    per model whose weight bytes are unknown, saying why."""
    from .load import ALL
    by_dir = {str(r.path): r for r in runs}
    whole = df[df["subtask"] == ALL]
    tables, reasons = [], {}
    inputs = []  # per model: (model, [(row, summary, decode-phase bytes, weight bytes)])
    for model, g in whole.groupby("model", sort=False, dropna=False):
        rows = []
        for r in g.itertuples():
            run = by_dir[r.run_dir]
            weights, why = weight_bytes_of(run.summary, run.config)
            if weights is None:
                reasons.setdefault(model, why)
            rows.append((r, run.summary, run_decode_held_bytes(run.records), weights))
        inputs.append((model, rows))
    for gpu in gpus:
        for model, rows in inputs:
            cells, fallback = [], False
            for r, summary, decode_held, weights in rows:
                values, fb = capacity_row(summary, decode_held, weights, gpu, mem_util)
                fallback |= fb
                cells.append((r.method_label, [r.budget_label, str(r.task), str(r.status)] + values,
                              r.method == "full"))
            weights = sorted({w for *_, w in rows if w is not None})
            shown = ", ".join(f"{w / MIB:,.1f} MiB" for w in weights) or "unknown"
            title = (f"Capacity on {gpu.describe()}, {mem_util:g} of it usable: {model} (weights {shown}); "
                     f"max sequences from the KV held while decoding")
            tables.append(CapacityTable(title, COLUMNS, cells, note=_note(fallback, reasons.get(model))))
    return tables, [f"capacity: model {m}: weight bytes unknown ({why}): capacity cells '-'"
                    for m, why in reasons.items()]


def _note(fallback: bool, why_no_weights: str | None) -> str:
    parts = ["max sequences = floor((memory × usable − weights) / KV held decoding: the compressed context, "
             "question and answer of one sequence, as measured)",
             "longest context = (memory × usable − weights) / (KV held max / context tokens measured): a linear "
             "extrapolation",
             "tok/s bound = B × bandwidth / (weights + B × KV bytes read per token measured)"]
    if fallback:
        parts.append("* counted at KV held max (prefill included: fewer sequences than decoding needs), the "
                     "records not giving the decode-phase size (a query-agnostic first query's question length)")
    if why_no_weights:
        parts.append(f"weight bytes unknown for some runs ({why_no_weights}): their capacity cells are -")
    return "; ".join(parts)


def capacity_markdown(tables: list[CapacityTable]) -> str:
    from .tables import to_markdown
    return "\n".join(["## Capacity planning", "", "Measured KV bytes turned into serving capacity "
                      "(Fu et al. 2024, arXiv 2405.08944): upper bounds, activations not counted.", ""]
                     + [to_markdown(t) for t in tables])
