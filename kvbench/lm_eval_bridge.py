"""kvbench as an lm-evaluation-harness model (EleutherAI lm-eval, github.com/EleutherAI/lm-evaluation-harness).

Every request goes through kvbench's compressed KV cache, so a method changes the scores. lm-eval's own HF
model scores a log-likelihood in one forward pass of context+continuation, which never reads a compressed cache.

- generate_until: the whole prompt is prefilled and compressed by the method (lm-eval hands us one string, so
  there is no question to hold back: the `query_aware=true` setting), then greedy decoding token by token until
  a stop string, EOS or `max_gen_toks`; the text is cut at the first stop string (as lm-eval's HF model does).
- loglikelihood: the context alone is prefilled and compressed (`query_aware=false`), then the continuation
  tokens are fed one at a time on top of the compressed cache, exactly as if they were being generated
  (decode-time methods such as H2O/StreamingLLM evict while scoring); positions continue from the original
  context length. The compressed context is reused (copied) for consecutive requests with the same context,
  e.g. the choices of a multiple-choice question.
- loglikelihood_rolling: lm-eval's rolling windows (`get_rolling_token_windows`, context_len=1, window = the
  model's max length), each scored as a loglikelihood request. The first window's context is the prefix
  token and every other full window's context is the one token before it (only a last, shorter window gets
  a longer context), so for documents within the model's window prefill-time methods (SnapKV, PyramidKV...)
  have nothing to compress and the result is the full-cache perplexity, while decode-time methods
  (StreamingLLM, H2O, TOVA...) evict as the document streams through the cache token by token.
Note: lm-eval's context usually ends with the question ("...\nAnswer:"), and the first continuation token is
predicted by the prefill's exact attention, so a one-token continuation (most multiple-choice letters/words)
scores the same under every prefill-time method. model_arg `split_last_line=true` holds the context's last
line back: the text before it is compressed, the last line is fed on top uncompressed (the query_aware=false
split of task=lm_eval), so every continuation token reads the compressed cache; it applies to generate_until
too (there the default compresses the whole prompt).
Batch size is 1 (kvbench runs one sequence at a time); other batch sizes are accepted and ignored.

Usage (lm-eval has no plugin discovery for models, so the model must be registered in-process):

    python -m kvbench.lm_eval_bridge --model kvbench \\
        --model_args model=smollm2-135m,method=snapkv,budget=256 --tasks hellaswag [--include_path DIR]

(`python -m kvbench.lm_eval_bridge` registers `kvbench` and then runs lm-eval's own CLI with the same
arguments.) From Python: `import kvbench.lm_eval_bridge as b; b.register()` and then
`lm_eval.simple_evaluate(model="kvbench", model_args="...", tasks=[...])`, or pass a `KVBenchLM` instance.
model_args: model (kvbench model name, hub id or local dir), shape (model=synthetic), path, device, dtype,
max_length (context window), method (default full), budget, compression_ratio, prefill_chunk, seed,
add_bos_token, split_last_line (see the note above), and any knob of the method (e.g. window_size=16 for snapkv).
"""
from __future__ import annotations

import sys

import torch

from kvbench.engine import Engine
from kvbench.method import build_method

try:  # lm-eval is optional for kvbench itself; the bridge needs it
    from lm_eval.api.model import TemplateLM
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as _e:  # pragma: no cover - exercised only without lm-eval
    raise ImportError("kvbench-lm-eval needs lm-eval and its task data tools: pip install 'kvbench[lmeval]'") from _e


# -- scoring and decoding on a compressed cache (Engine's public pieces) -----------------------------
def prefill_context(engine: Engine, ctx_ids: list[int], method=None, compress: bool = True):
    """A fresh cache holding ctx_ids, compressed by (a fork of) `method`. Returns (cache, method, last logits)."""
    m = method.fork() if method is not None else None
    if m is not None:
        m.reset()
    cache = engine.new_cache()
    pre = engine.prefill(cache, list(ctx_ids), m, compress=compress)
    return cache, m, pre.logits


@torch.inference_mode()
def score_continuation(engine: Engine, cache, method, first_logits: torch.Tensor,
                       cont_ids: list[int]) -> tuple[list[float], bool]:
    """Log-probabilities of cont_ids fed on top of `cache` (consumed), and whether each was the argmax.

    first_logits are the logits after the cache's last token (they predict cont_ids[0]). The tokens go in one
    at a time in the "decode" phase: the same path as generation, so decode-time evictions apply too.
    """
    cache.reserve(len(cont_ids))
    logprobs, greedy = [], True
    logits = first_logits
    for i, tok in enumerate(cont_ids):
        lp = torch.log_softmax(logits.float(), dim=-1)
        logprobs.append(float(lp[tok]))
        greedy = greedy and int(logits.argmax()) == tok
        if i + 1 < len(cont_ids):
            logits, _ = engine._forward(cache, [tok], method, "decode")
    return logprobs, greedy


@torch.inference_mode()
def greedy_until(engine: Engine, cache, method, first_logits: torch.Tensor, max_new_tokens: int,
                 until: list[str]) -> str:
    """Greedy decoding as Engine.decode, stopping also when the text contains a stop string; the returned
    text is cut at the first stop string."""
    tok = engine.lm.tokenizer
    cache.reserve(max_new_tokens)
    ids: list[int] = []

    def text() -> str:
        return tok.decode([i for i in ids if i not in engine.stop_ids], skip_special_tokens=True)

    nxt = int(first_logits.argmax())
    for _ in range(max_new_tokens):
        ids.append(nxt)
        if nxt in engine.stop_ids or len(ids) == max_new_tokens:
            break
        if until and any(s in text() for s in until):
            break
        logits, _ = engine._forward(cache, [nxt], method, "decode")
        nxt = int(logits.argmax())
    return cut_at_stop(text(), until)


def cut_at_stop(text: str, until: list[str]) -> str:
    for s in until:
        if s:
            text = text.split(s)[0]
    return text


# -- the lm-eval model -------------------------------------------------------------------------------
class KVBenchLM(TemplateLM):
    """lm-eval model `kvbench`: a kvbench model + KV-cache method (see the module docstring)."""

    def __init__(self, model: str = "smollm2-135m", method: str = "full", budget: int | None = None,
                 compression_ratio: float | None = None, shape: str | None = None, path: str | None = None,
                 device: str | None = None, dtype: str = "auto", max_length: int | None = None,
                 prefill_chunk: int = 0, seed: int = 0, add_bos_token: bool = False, split_last_line: bool = False,
                 batch_size=1, max_batch_size=None, lm=None, **method_knobs):
        super().__init__()
        from kvbench.models import load_model
        torch.manual_seed(int(seed))
        self.lm = lm if lm is not None else load_model(
            name=model, path=path, shape=shape, device=device or "auto", dtype=dtype, seed=int(seed),
            max_context=max_length)
        self.tokenizer = self.lm.tokenizer
        self.method = build_method(method, budget=budget if method != "full" else None,
                                   compression_ratio=compression_ratio, **method_knobs)
        if hasattr(self.method, "prepare"):  # methods that need the model (as in kvbench.runner)
            self.method.prepare(self.lm)
        self.engine = Engine(self.lm, self.method, query_aware=True, prefill_chunk=int(prefill_chunk))
        self.add_bos_token = bool(add_bos_token)
        self.split_last_line = bool(split_last_line)
        self._memo = None  # (ctx_ids tuple, cache, method, logits): the last compressed context

    # lm-eval's tokenization hooks
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self.lm.max_context

    @property
    def tokenizer_name(self) -> str:
        return getattr(self.tokenizer, "name_or_path", "kvbench").replace("/", "__")

    def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        special = self.add_bos_token if add_special_tokens is None else add_special_tokens
        return self.tokenizer(string, add_special_tokens=special)["input_ids"]

    # scoring
    def _split(self, ids: list[int]) -> tuple[list[int], list[int]]:
        """split_last_line: (context, question) at the last token holding a newline; else (ids, [])."""
        if self.split_last_line:
            for k in range(len(ids) - 1, 0, -1):
                if "\n" in self.tokenizer.decode([ids[k]]):
                    return ids[:k], ids[k:]
        return ids, []

    def _compressed(self, ids: list[int]):
        """A private copy of the compressed prompt and the logits after its last token. The context part is
        compressed once per distinct context; with split_last_line the last line is fed on top, uncompressed."""
        ctx_ids, q_ids = self._split(list(ids))
        key = tuple(ctx_ids)
        if self._memo is None or self._memo[0] != key:
            self._memo = (key, *prefill_context(self.engine, ctx_ids, self.method))
        _, cache, m, logits = self._memo
        cache, m = cache.clone(), (m.fork() if m is not None else None)
        if q_ids:
            logits = self.engine.prefill(cache, q_ids, m, compress=False).logits
        return cache, m, logits

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        out = []
        for _, ctx_ids, cont_ids in requests:
            if not cont_ids:
                raise ValueError("loglikelihood: the continuation encodes to no tokens; allowed: a non-empty text")
            if len(cont_ids) > self.max_length:
                raise ValueError(f"loglikelihood: continuation of {len(cont_ids)} tokens; allowed: at most "
                                 f"the model's max_length {self.max_length}")
            # the last continuation token is never fed: at most max_length tokens go through the model
            # (left truncation of the context, as lm-eval's HF model does)
            ctx_ids = list(ctx_ids)[-(self.max_length + 1 - len(cont_ids)):]
            cache, m, logits = self._compressed(ctx_ids)
            lps, greedy = score_continuation(self.engine, cache, m, logits, list(cont_ids))
            out.append((sum(lps), greedy))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for (string,) in [r.args for r in requests]:
            windows = map(make_disjoint_window, get_rolling_token_windows(
                token_list=self.tok_encode(string, add_special_tokens=False), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1))
            scored = self._loglikelihood_tokens([(None, c, t) for c, t in windows])
            out.append(sum(ll for ll, _ in scored))
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for context, gen_kwargs in [r.args[:2] for r in requests]:
            kw = dict(gen_kwargs or {})
            if kw.get("do_sample"):
                raise ValueError(f"do_sample={kw['do_sample']!r}; allowed: false (kvbench decodes greedily)")
            until = kw.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_gen = int(kw.get("max_gen_toks", 256))
            ids = self.tok_encode(context)
            ids = ids[-max(1, self.max_length - max_gen):]  # keep room for the generation (left truncation)
            cache, m, logits = self._compressed(ids)
            out.append(greedy_until(self.engine, cache, m, logits, max_gen, until))
        return out


def register() -> type[KVBenchLM]:
    """Register `KVBenchLM` with lm-eval under the name `kvbench` (idempotent)."""
    import lm_eval.models  # noqa: F401  (built-in models first: lm-eval imports them only into an empty registry)
    from lm_eval.api.registry import get_model, register_model
    try:
        if get_model("kvbench") is KVBenchLM:
            return KVBenchLM
    except ValueError:
        pass
    register_model("kvbench")(KVBenchLM)
    return KVBenchLM


def main(argv: list[str] | None = None) -> None:
    """lm-eval's CLI with the `kvbench` model registered."""
    register()
    from lm_eval.__main__ import cli_evaluate
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
