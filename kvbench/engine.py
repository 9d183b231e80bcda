"""prefill → compress → decode, with explicit positions; shared-context queries and turns.

The engine owns the loop (no `model.generate()`): positions continue from the *original* length, because a
compressed cache is shorter than the positions it covers.
- query_aware=false: the context alone is prefilled and compressed, the question is fed on top afterwards
  (the reusable setting of kvpress / SCBench). query_aware=true: context+question are prefilled and
  compressed together (the setting of the SnapKV/PyramidKV papers).
- multi_request: the context is compressed once; every query starts from a copy of that compressed cache.
- multi_turn: the shared cache carries the context, each turn's question and its golden answer; generated
  tokens live only in a per-turn copy.
"""
from __future__ import annotations

import copy
import os
import time
from dataclasses import dataclass, field, replace

import torch

from kvbench.attention import session
from kvbench.cache import KVBenchCache, LayerKV
from kvbench.compat import cache_kwargs
from kvbench.method import Method
from kvbench.metrics import HostLoad, PeakMemory, Timer, attention_flops, attention_shape, linear_flops_per_token
from kvbench.models import LoadedModel
from kvbench.prompts import PromptBuilder
from kvbench.task import Query, Sample


class ContextTooLong(ValueError):
    pass


@dataclass
class Prefilled:
    logits: torch.Tensor     # (vocab,) logits of the last fed token
    ms: float                # wall time, compression included
    compress_ms: float       # time spent in the method's hooks
    path: str = "eager"      # "graph" (kvbench.graph_prefill) or "eager: <why not>"
    setup_ms: float = 0.0    # capturing the graph first (a one-time cost, not in `ms`)


class Engine:
    def __init__(self, lm: LoadedModel, method: Method | None, query_aware: bool = False,
                 prefill_chunk: int = 0, use_chat_template: bool = True):
        self.lm = lm
        self.model = lm.model
        self.method = method
        self.query_aware = query_aware
        self.prefill_chunk = prefill_chunk
        self.prompts = PromptBuilder(lm.tokenizer, use_chat_template)
        self.n_layers = self.model.config.num_hidden_layers
        self.device = lm.device  # where inputs go (the embeddings' device)
        self.devices = list(getattr(lm, "devices", ()) or (lm.device,))  # a model spread over GPUs: all of them
        eos = self.model.generation_config.eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        if lm.tokenizer.eos_token_id is not None:
            eos.append(lm.tokenizer.eos_token_id)
        self.stop_ids = set(eos)
        n_kv, self._group, self._head_dim = attention_shape(self.model.config)
        for fmt in (method.formats() if method is not None else []):
            fmt.check_model(self.n_layers, n_kv, self._head_dim)  # before any sample: one clear line
            if hasattr(fmt, "prepare"):  # calibrated formats (eigen_attention): load or compute once per model
                fmt.prepare(lm)
        # K and V of one token in every layer and KV head: what an uncompressed cache stores per token
        self._full_bytes_per_token = 2 * self.n_layers * n_kv * self._head_dim * lm.dtype.itemsize
        self._linear_flops = linear_flops_per_token(self.model)  # once: it walks every module
        # On CUDA, methods without decode-time hooks decode through kvbench.fast_decode (in-place appends, Triton
        # decode attention, one CUDA graph per token): same greedy tokens, without the per-layer host overhead.
        self.fast_decode = os.environ.get("KVBENCH_FAST_DECODE", "1") != "0"
        from kvbench.fast_decode import default_compile
        self.compile_decode = default_compile()  # KVBENCH_COMPILE_DECODE=1|regional: torch.compile the step first
        self.last_setup_steps = 0  # leading decode steps of the last decode() that compiled / captured a graph
        self.last_read_bytes: list[int] = []  # per decode step of the last decode(): K/V bytes attention read
        self.last_decode_path = ""  # how the last decode() ran: FastDecoder.path ("graph", ...), "eager: <why>"
        # On CUDA a small model's full-cache prefill replays CUDA graphs (kvbench.graph_prefill): same logits and
        # cache, without the per-layer host work that otherwise sets its TTFT
        from kvbench import graph_prefill
        self._static_why = graph_prefill.wanted(self.model, self.devices)  # None: use it where it applies
        self._static: graph_prefill.GraphPrefill | None = None
        self.last_prefill_path = ""    # how the last prefill() ran: "graph" ("graph (triton ...)") or "eager: <why>"
        self.last_prefill_setup_ms = 0.0  # what the last prefill() spent capturing its graph (timed apart)

    # -- the loop's pieces ---------------------------------------------------------------------------
    def new_cache(self) -> KVBenchCache:
        return KVBenchCache(self.n_layers)

    @torch.inference_mode()
    def _forward(self, cache: KVBenchCache, ids: list[int] | torch.Tensor, method, phase: str,
                 is_last_chunk: bool = True):
        ids = torch.as_tensor(ids, device=self.device).view(1, -1)
        n = ids.shape[1]
        pos = torch.arange(cache.seen_tokens, cache.seen_tokens + n, device=self.device)
        cache.next_positions = pos
        with session(cache, method, phase, is_last_chunk) as s:
            out = self.model(input_ids=ids, **cache_kwargs(self.model, cache, pos), use_cache=True, logits_to_keep=1)
        cache.seen_tokens += n
        return out.logits[0, -1], s.hook_seconds()

    def prefill(self, cache: KVBenchCache, ids: list[int], method: Method | None, compress: bool,
                spare: int = 0) -> Prefilled:
        """Feed `ids` on top of the cache. compress=True: the method observes every chunk and compresses
        each layer right after the exact attention of the last chunk (memory is freed layer by layer).
        spare: rows per head to allocate beyond `ids` in layers this prefill creates (`spare_rows`)."""
        if not ids:
            raise ValueError("nothing to prefill")
        static = self._static_prefill(cache, ids, method, spare)
        if static is not None:
            return static
        phase = "prefill" if compress else "extend"
        step = self.prefill_chunk if self.prefill_chunk > 0 else len(ids)
        comp = 0.0
        # the first chunk creates the layers: room for the later chunks too
        cache.spare_rows = spare + max(0, len(ids) - step) if spare > 0 else 0
        with Timer(self.devices) as t:
            for i in range(0, len(ids), step):
                last = i + step >= len(ids)
                logits, c = self._forward(cache, ids[i:i + step], method, phase, last)
                comp += c
            if compress and method is not None:
                with Timer(self.devices) as t2:
                    method.after_prefill(cache)
                    if method.formats() and not method.encodes_per_layer():
                        method.encode_cache(cache)  # cross-layer formats, or after a cross-layer allocation
                comp += t2.s
        cache.spare_rows = 0
        return Prefilled(logits, t.ms, comp * 1e3, self.last_prefill_path, self.last_prefill_setup_ms)

    def static_prefill(self):
        """The engine's kvbench.graph_prefill.GraphPrefill (made on first use)."""
        if self._static is None:
            from kvbench.graph_prefill import GraphPrefill
            self._static = GraphPrefill(self.model)
        return self._static

    def _static_prefill(self, cache: KVBenchCache, ids: list[int], method: Method | None,
                        spare: int) -> Prefilled | None:
        """The full cache's prefill through kvbench.graph_prefill, or None (the reason: last_prefill_path).
        Capturing a new bucket's graph is a one-time cost: done before the clock starts, reported apart."""
        self.last_prefill_setup_ms = 0.0
        why = self._static_why or _static_method_why(method)
        if why is None and 0 < self.prefill_chunk < len(ids):
            why = f"chunked prefill (prefill_chunk={self.prefill_chunk})"
        run = None
        if why is None:
            gp = self.static_prefill()
            if all(layer is None for layer in cache.kv):
                why = gp.why_not_context(cache, len(ids))
                slot = None if why else gp.prepare_context(len(ids), spare)
                if why is None and slot is None:
                    why = gp.failure() or "its bucket's store is lent to a live cache"
                run = lambda: gp.context(slot, cache, ids)
            else:
                why, slot = gp.why_not_question(cache, len(ids))
                q = None if why else gp.prepare_question(slot, len(ids), cache)
                if why is None and q is None:
                    why = gp.failure() or "capture failed"
                run = lambda: gp.question(slot, q, cache, ids)
            self.last_prefill_setup_ms = gp.last_setup_ms
        if why is None:
            with Timer(self.devices) as t:
                logits = run()
            if logits is None:
                why = gp.failure() or "static prefill failed"
        self.last_prefill_path = f"eager: {why}" if why else gp.path
        return None if why else Prefilled(logits, t.ms, 0.0, gp.path, self.last_prefill_setup_ms)

    @torch.inference_mode()
    def decode(self, cache: KVBenchCache, method: Method | None, first_logits: torch.Tensor, max_new_tokens: int,
               on_step=None, stop_ids: set[int] | None = None,
               min_new_tokens: int = 0) -> tuple[list[int], list[float], list[int]]:
        """Greedy decoding. Returns (token ids, per-step ms after the first token, per-step FLOPs).
        stop_ids: where to stop (default: the model's EOS ids); min_new_tokens=1: the first token is never a stop
        id (transformers' min_length, as LongBench's pred.py generates samsum)."""
        stop = self.stop_ids if stop_ids is None else set(stop_ids)
        if min_new_tokens > 0 and stop:
            first_logits = first_logits.clone()
            first_logits[torch.tensor(sorted(stop), device=first_logits.device)] = float("-inf")
        self.last_decode_path = f"eager: {self._why_eager(method, on_step, max_new_tokens)}"
        if self.fast_decode and on_step is None and self.device.type == "cuda" and max_new_tokens > 1 \
                and len(self.devices) == 1:
            from kvbench import fast_decode
            plan = fast_decode.plan(method, cache, self.model)  # None: the method's hooks need the loop below
            if plan is not None:
                lens0 = cache.head_lengths()
                encoded = None  # storage formats: the loop's records, from the cache's state before decoding
                if any(not isinstance(layer, LayerKV) for layer in cache.kv):
                    encoded = fast_decode.EncodedRecords(cache, max_new_tokens - 1, self._group)
                fd = fast_decode.FastDecoder(self.model, cache, max_new_tokens, compile=self.compile_decode,
                                             ring=plan.ring, evict=plan.evict)
                out, step_ms = fd.decode(int(first_logits.argmax()), max_new_tokens, stop)
                self.last_setup_steps = fd.setup_steps
                self.last_decode_path = fd.path if fd.graph_error is None \
                    else f"eager: CUDA graph capture failed: {fd.graph_error}"
                if encoded is not None:
                    n = len(step_ms)
                    reads, attn_flops, peaks = encoded.get(n)
                    cache.held.observe(peaks[n])
                    cache.resync_held()
                    self.last_read_bytes = reads[:n]
                    return out, step_ms, [self._linear_flops + f for f in attn_flops[:n]]
                # per step, the rows every head reads: before the step + the token being decoded; a head with a
                # cap is back to it after the step (a ring keeps cap + 1)
                caps = plan.caps(len(lens0))
                rows = [fast_decode.step_rows(lens0, caps, i) for i in range(len(step_ms))]
                row_bytes = [layer.row_bytes for layer in cache.kv]
                read = [sum(b * sum(r) for b, r in zip(row_bytes, step)) for step in rows]
                ring = plan.ring is not None
                cache.held.observe(fast_decode.held_peak(lens0, caps, row_bytes, len(step_ms), ring=ring))
                cache.resync_held()
                flops = [self._linear_flops + attention_flops(step, self._group, self._head_dim) for step in rows]
                self.last_read_bytes = read
                return out, step_ms, flops
        self.last_setup_steps = 0
        cache.reserve(max_new_tokens)
        out: list[int] = []
        step_ms: list[float] = []
        flops: list[int] = []
        self.last_read_bytes = []  # K/V bytes each step's attention reads (stored format, selected rows)
        nxt = int(first_logits.argmax())
        for _ in range(max_new_tokens):
            out.append(nxt)
            if nxt in stop or len(out) == max_new_tokens:
                break
            # + the token being decoded; each layer counts what its format computes (rows selected, rank)
            flops.append(self._linear_flops + cache.attention_flops(1, self._group))
            self.last_read_bytes.append(cache.read_bytes(extra_tokens=1))
            with Timer(self.devices, collect=False) as t:
                logits, _ = self._forward(cache, [nxt], method, "decode")
                nxt = int(logits.argmax())
            step_ms.append(t.ms)
            if on_step is not None:
                on_step(cache)
        return out, step_ms, flops

    def _why_eager(self, method, on_step, max_new_tokens: int) -> str:
        """Why a decode would not take the graph path, before the method and cache are looked at."""
        if self.device.type != "cuda":
            return f"{self.device.type} device"
        if len(self.devices) > 1:  # one CUDA graph is captured on one device's stream
            return f"model spread over {len(self.devices)} devices"
        if not self.fast_decode:
            return "KVBENCH_FAST_DECODE=0"
        if on_step is not None or max_new_tokens <= 1:
            return "a per-step callback or a single new token"
        name = "the full cache" if method is None else getattr(method, "name", None) or type(method).__name__.lower()
        return f"{name}: its decode-time hooks, storage format or cache shape (kvbench.fast_decode.plan)"

    # -- one sample ----------------------------------------------------------------------------------
    def _check_length(self, n_prompt: int, q: Query):
        if n_prompt + q.max_new_tokens > self.lm.max_context:
            raise ContextTooLong(f"prompt of {n_prompt} tokens + {q.max_new_tokens} new tokens exceeds the "
                                 f"model's context of {self.lm.max_context}")

    def _answer(self, m: "Measure", cache, method, logits, q: Query) -> None:
        # a query may stop at more than EOS (LongBench samsum: "\n", as pred.py), after at least a few tokens
        extra = {self.lm.tokenizer.encode(t, add_special_tokens=False)[-1] for t in q.meta.get("stop", [])}
        ids, m.step_ms, m.flops = self.decode(cache, method, logits, q.max_new_tokens, stop_ids=self.stop_ids | extra,
                                              min_new_tokens=int(q.meta.get("min_new_tokens", 0)))
        m.setup_steps = self.last_setup_steps
        m.decode_path = self.last_decode_path
        m.read_bytes = list(self.last_read_bytes)
        m.ids = ids
        m.text = self.lm.tokenizer.decode([i for i in ids if i not in self.stop_ids], skip_special_tokens=True)

    def warmup(self, sample: Sample, max_new_tokens: int = 8) -> float:
        """Run a shortened copy of `sample` untimed (its first two queries, a few new tokens each), so that
        one-time costs — Triton compilation, cuBLAS/allocator initialisation, the first CUDA-graph capture —
        are paid here and never enter a recorded timing. Returns the wall ms it took (reported apart)."""
        queries = [replace(q, max_new_tokens=min(q.max_new_tokens, max_new_tokens)) for q in sample.queries[:2]]
        t0 = time.perf_counter()
        self.run_sample(replace(sample, queries=queries))
        return (time.perf_counter() - t0) * 1e3

    @staticmethod
    def _spare(method: Method | None, rows: int) -> int:
        """Rows to reserve per head at the context's prefill: the full cache keeps every context row, so the
        question and the answer land in that capacity (no per-layer regrowth copying the whole context on the
        question's prefill). A method that compresses repacks its layers anyway: none."""
        return rows if method is None or getattr(method, "name", "") == "full" else 0

    def run_sample(self, sample: Sample) -> list[dict]:
        """Run every query of a sample; returns one raw record per query (no scores yet)."""
        method = self.method.fork() if self.method is not None else None
        if method is not None:
            method.reset()
        if sample.mode == "multi_turn":
            return self._run_multi_turn(sample, method)
        records = []
        shared = None  # (cache, method, Prefilled, n_ctx, kv_bytes, kept) of the compressed context, reused
        for qi, q in enumerate(sample.queries):
            ctx_text, q_text = self.prompts.first_turn(sample.context, q.question, q.answer_prefix, sample.chat_template)
            ctx_ids = self.prompts.encode(ctx_text, first=True)
            q_ids = self.prompts.encode(q_text)
            self._check_length(len(ctx_ids) + len(q_ids), q)
            m = Measure(query_aware=self.query_aware)
            with PeakMemory(self.devices) as mem, HostLoad() as load:
                if self.query_aware:
                    cache, qm = self.new_cache(), (method.fork() if method is not None else None)
                    pre = self.prefill(cache, ctx_ids + q_ids, qm, compress=True, spare=self._spare(qm, q.max_new_tokens))
                    m.context(pre, len(ctx_ids) + len(q_ids), cache)
                    logits = pre.logits
                else:
                    if shared is None:
                        cache0 = self.new_cache()
                        pre0 = self.prefill(cache0, ctx_ids, method, compress=True,
                                            spare=self._spare(method, len(q_ids) + q.max_new_tokens))
                        shared = (cache0, pre0, cache0.held.peak)
                    cache0, pre0, prefill_peak = shared
                    last = qi == len(sample.queries) - 1
                    if last:  # the last query may consume the shared context itself
                        cache, qm = cache0, method
                    else:     # a copy only the harness needs (the next query starts from the context again)
                        with mem.uncounted():
                            cache = cache0.clone()
                            qm = method.fork() if method is not None else None
                    if qi > 0:
                        cache.held.reset_peak()  # this query's peak: the context as kept, question, answer
                    m.context(pre0, len(ctx_ids), cache0, reused=qi > 0)
                    m.question_tokens = len(q_ids)
                    qpre = self.prefill(cache, q_ids, qm, compress=False)
                    logits = m.question(qpre)
                self._answer(m, cache, qm, logits, q)
                m.held_max = cache.held.peak
                if not self.query_aware and qi == 0:
                    m.held_max = max(m.held_max, prefill_peak)  # the context's prefill is query 0's
            m.peak_mem = mem.peak
            m.other_cores = load.other_cores
            records.append(self._per_device(m.record(sample, qi, q, self._full_bytes_per_token), m, mem))
        return records

    def _per_device(self, rec: dict, m: "Measure", mem: PeakMemory) -> dict:
        """A model spread over GPUs: what each GPU held (KV bytes of the compressed context, peak growth)."""
        if len(self.devices) > 1:
            rec["kv_bytes_per_device"] = dict(m.kv_bytes_per_device)
            rec["peak_mem_bytes_per_device"] = dict(mem.per_device)
        return rec

    def _run_multi_turn(self, sample: Sample, method) -> list[dict]:
        records = []
        cache = self.new_cache()
        history: list[dict] = []
        pre = None
        for qi, q in enumerate(sample.queries):
            m = Measure(query_aware=self.query_aware)
            with PeakMemory(self.devices) as mem, HostLoad() as load:
                if qi == 0:
                    ctx_text, q_text = self.prompts.first_turn(sample.context, q.question, q.answer_prefix,
                                                               sample.chat_template)
                    ctx_ids = self.prompts.encode(ctx_text, first=True)
                    q_ids = self.prompts.encode(q_text)
                    self._check_length(len(ctx_ids) + len(q_ids), q)
                    if self.query_aware:
                        pre = self.prefill(cache, ctx_ids + q_ids, method, compress=True,
                                           spare=self._spare(method, q.max_new_tokens))
                        m.context(pre, len(ctx_ids) + len(q_ids), cache)
                        logits = pre.logits
                    else:
                        pre = self.prefill(cache, ctx_ids, method, compress=True,
                                           spare=self._spare(method, len(q_ids) + q.max_new_tokens))
                        m.context(pre, len(ctx_ids), cache)
                        m.question_tokens = len(q_ids)
                        qpre = self.prefill(cache, q_ids, method, compress=False)
                        logits = m.question(qpre)
                    history = [{"role": "user", "content": sample.context + q.question}]
                else:
                    cache.held.reset_peak()
                    q_ids = self.prompts.encode(self.prompts.next_turn(history, q.question, q.answer_prefix,
                                                                       sample.chat_template))
                    self._check_length(cache.seen_tokens + len(q_ids), q)
                    m.context(pre, m_first.n_ctx, None, reused=True, kv_bytes=m_first.kv_bytes, kept=m_first.kept)
                    m.question_tokens = len(q_ids)
                    qpre = self.prefill(cache, q_ids, method, compress=False)
                    logits = m.question(qpre)
                    history.append({"role": "user", "content": q.question})
                with mem.uncounted():  # the turn's answer is generated on a copy: the next turn gets the gold one
                    turn_cache = cache.clone()
                    turn_method = method.fork() if method is not None else None
                self._answer(m, turn_cache, turn_method, logits, q)
                m.held_max = max(cache.held.peak, turn_cache.held.peak)
                del turn_cache
            if qi == 0:
                m_first = m
            m.peak_mem = mem.peak
            m.other_cores = load.other_cores
            m.meta = {"turn": qi, "cache_tokens_before_answer": cache.seen_tokens}
            records.append(self._per_device(m.record(sample, qi, q, self._full_bytes_per_token), m, mem))
            if qi < len(sample.queries) - 1:
                gold = q.answers[0] if q.answers else ""
                g_ids = self.prompts.encode(self.prompts.golden_answer(history, gold, q.answer_prefix,
                                                                      sample.chat_template))
                if g_ids:
                    self.prefill(cache, g_ids, method, compress=False)
                history.append({"role": "assistant", "content": q.answer_prefix + gold})
        return records


def _static_method_why(method: Method | None) -> str | None:
    """Why this method's prefill cannot skip its hooks (kvbench.graph_prefill runs none): None for the full
    cache, which has none."""
    if method is None:
        return None
    cls = type(method)
    hooks = ("observe_prefill", "compress_layer", "after_prefill")
    if getattr(method, "name", "") != "full" or method.formats() or \
            any(getattr(cls, h) is not getattr(Method, h) for h in hooks):
        return f"{getattr(method, 'name', None) or cls.__name__.lower()} compresses (the static prefill is the full cache's)"
    return None


def _mean_len(cache: KVBenchCache) -> float:
    lens = [L for layer in cache.head_lengths() for L in layer]
    return sum(lens) / max(1, len(lens))


@dataclass
class Measure:
    """What one query measured, filled in as the engine goes; `record()` turns it into a record.

    TTFT comes in two kinds that are never mixed: `ttft_ms` when the query paid for prefilling and
    compressing its context (+ its question), `ttft_reused_ms` when it started from a context compressed
    earlier (multi_request's later queries, multi_turn's later turns: only its question is prefilled)."""
    query_aware: bool = False
    reused: bool = False
    prefill_ms: float = 0.0        # the context's prefill + compression (shared by reusing queries)
    compress_ms: float = 0.0
    question_ms: float = 0.0       # feeding the question on top of the compressed context
    question_tokens: int = 0       # tokens fed on top of the compressed context before answering (0: query-aware)
    n_ctx: int = 0
    kv_bytes: int = 0              # right after compression
    kept: float = 0.0
    held_max: int = 0              # the most K+V bytes held at any point of this query
    peak_mem: int = 0
    other_cores: float | None = None
    step_ms: list = field(default_factory=list)
    flops: list = field(default_factory=list)
    read_bytes: list = field(default_factory=list)  # per decode step: K/V bytes attention read
    setup_steps: int = 0
    decode_path: str = ""          # graph / compiled graph / regional compiled graph / eager: why
    prefill_path: str = ""         # the context's prefill: graph (kvbench.graph_prefill) / eager: why
    question_path: str = ""        # the question's, when fed on top ("" for query-aware)
    prefill_setup_ms: float = 0.0  # capturing prefill graphs for this query (one-time costs, not in the TTFT)
    kv_bytes_per_device: dict = field(default_factory=dict)  # a model spread over GPUs: the context's KV on each
    ids: list = field(default_factory=list)
    text: str = ""
    meta: dict = field(default_factory=dict)

    def context(self, pre: Prefilled, n_ctx: int, cache: KVBenchCache | None, reused: bool = False,
                kv_bytes: int | None = None, kept: float | None = None) -> None:
        self.reused, self.n_ctx = reused, n_ctx
        self.prefill_ms, self.compress_ms = pre.ms, pre.compress_ms
        self.prefill_path = pre.path
        self.prefill_setup_ms += 0.0 if reused else pre.setup_ms
        self.kv_bytes = cache.nbytes() if kv_bytes is None else kv_bytes
        per_device: dict[str, int] = {}
        for layer in (cache.kv if cache is not None else []):
            if isinstance(layer, LayerKV):
                d = str(layer.keys.device)
                per_device[d] = per_device.get(d, 0) + layer.nbytes()
        self.kv_bytes_per_device = per_device if len(per_device) > 1 else {}  # a model spread over GPUs only
        self.kept = _mean_len(cache) if kept is None else kept

    def question(self, pre: Prefilled) -> torch.Tensor:
        """The question fed on top: its time and path; returns its logits."""
        self.question_ms, self.question_path = pre.ms, pre.path
        self.prefill_setup_ms += pre.setup_ms
        return pre.logits

    def record(self, sample: Sample, qi: int, q: Query, full_bytes_per_token: int) -> dict:
        meta = copy.deepcopy(sample.meta)
        meta.update(q.meta)
        meta.update(self.meta)
        # the GPU fast path's first steps also compile / capture its CUDA graph: a one-time cost, reported apart
        # (decode_setup_ms) so decode_ms_per_token is the steady per-token latency (all steps if none are left)
        w = min(self.setup_steps, len(self.step_ms))
        steady = self.step_ms[w:] or self.step_ms
        ttft = self.question_ms + (0.0 if self.reused else self.prefill_ms)
        return {
            "sample_id": sample.id, "query_idx": qi, "status": "ok", "error_type": None, "error": None,
            "score": None, "prediction": self.text, "answers": q.answers, "new_tokens": len(self.ids),
            "ttft_ms": None if self.reused else ttft, "ttft_reused_ms": ttft if self.reused else None,
            "prefill_ms": self.prefill_ms, "compress_ms": self.compress_ms, "question_ms": self.question_ms,
            "decode_ms_per_token": (sum(steady) / len(steady)) if steady else None,
            "decode_setup_ms": sum(self.step_ms[:w]), "decode_path": self.decode_path,
            "prefill_path": self.prefill_path, "question_path": self.question_path,
            "prefill_setup_ms": self.prefill_setup_ms,
            "kv_bytes": self.kv_bytes, "kv_bytes_held_max": self.held_max,
            "kv_bytes_full": self.n_ctx * full_bytes_per_token, "peak_mem_bytes": self.peak_mem,
            "decode_flops_per_token": (sum(self.flops) / len(self.flops)) if self.flops else None,
            "kv_bytes_read_per_token": (sum(self.read_bytes) / len(self.read_bytes)) if self.read_bytes else None,
            "context_tokens": self.n_ctx, "question_tokens": self.question_tokens, "kept_tokens": self.kept, "context_reused": self.reused,
            "query_aware": self.query_aware, "mode": sample.mode, "other_cores": self.other_cores, "meta": meta,
        }
