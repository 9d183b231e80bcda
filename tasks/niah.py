"""Needle in a Haystack (Kamradt, 2023: github.com/gkamradt/LLMTest_NeedleInAHaystack).

The needle sentence is hidden in Paul Graham essays at depth d% of the haystack, for a grid of context
lengths × depths, and the model is asked to retrieve it.

- Prompt: LLMTest_NeedleInAHaystack's Anthropic prompt. The user message holds the system line, the
  haystack inside <context> tags and the question + "Don't give information outside the document or
  repeat your findings"; the reply starts with "Here is the most relevant sentence in the context:"
  (Anthropic's Claude 2.1 long-context note; it stops models from refusing out-of-place sentences).
- Insertion: as in Kamradt's code, take depth d% of the haystack tokens and step back to the start of
  that sentence (our own sentence splitter, see tasks/_text.py); d=100 appends the needle at the end.
- Length L: the whole sequence budget, counted without chat-template tokens: tokens(context + question
  + answer prefix) + max_new_tokens <= L (Kamradt leaves a 200-token buffer for prompt and output;
  RULER counts prompt + tokens_to_generate the same way). The haystack is the longest token prefix of
  the essays (repeated if needed) that fits.
- Score: the original uses a GPT-4 judge (1-10). KV-cache papers score offline: PyramidKV /
  KVCache-Factory's run_needle_in_haystack.py (from Long-Context-Data-Engineering) reports ROUGE-1 F of
  the response against the needle (×10); many harnesses check for "sandwich" / "dolores park".
  Our primary `score` is keyword recall: the fraction of the needle's three facts — "sandwich",
  "dolores park", "sunny day" — present in the answer (case- and whitespace-insensitive).
  ROUGE-1 F (our implementation: lowercase [a-z0-9]+ words, no stemming, unlike rouge-score's
  use_stemmer=True) is reported by `aggregate` as `rouge1_f`, with per-length and per-depth means.
  The answer is the first non-empty line of the generation (PyramidKV stops generating at "\\n").
"""
from __future__ import annotations

import re
import warnings
from collections import Counter
from functools import lru_cache
from typing import Iterator

import numpy as np

from kvbench.task import Query, Sample, Task, register_task

from ._text import essay_text, fit_count, n_tokens, sentence_starts, token_prefix

NEEDLE = "\nThe best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day.\n"
QUESTION = "What is the best thing to do in San Francisco?"
SYSTEM = "You are a helpful AI bot that answers questions for a user. Keep your response short and direct"
ANSWER_PREFIX = "Here is the most relevant sentence in the context:"
KEYWORDS = ("sandwich", "dolores park", "sunny day")
CHAT_RESERVE = 64  # tokens left for the chat template when a length equals the model's limit


def keyword_score(prediction: str) -> float:
    """Fraction of the needle's keywords found in the prediction (case- and whitespace-insensitive)."""
    text = " ".join(prediction.lower().split())
    return sum(k in text for k in KEYWORDS) / len(KEYWORDS)


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def rouge1_f(prediction: str, reference: str = NEEDLE) -> float:
    """ROUGE-1 F1: unigram overlap (clipped counts) of lowercase alphanumeric words, no stemming."""
    pred, ref = Counter(_words(prediction)), Counter(_words(reference))
    overlap = sum((pred & ref).values())
    if overlap == 0:
        return 0.0
    p, r = overlap / sum(pred.values()), overlap / sum(ref.values())
    return 2 * p * r / (p + r)


def first_line(prediction: str) -> str:
    for line in prediction.strip().splitlines():
        if line.strip():
            return line.strip()
    return ""


def _grid(values, count, lo, hi, name) -> list[int]:
    if values is not None:
        values = [int(v) for v in values]
        if not values:
            raise ValueError(f"niah.{name}=[]; allowed: a non-empty list of integers")
        return values
    if count is None or int(count) < 1:
        raise ValueError(f"niah.num_{name}={count!r}; allowed: an integer >= 1 (or give niah.{name})")
    return sorted({int(round(x)) for x in np.linspace(lo, hi, int(count))})


@register_task("niah")
class NIAH(Task):
    description = "Needle in a Haystack (Kamradt): Paul Graham essays, San Francisco needle, length × depth grid"

    def __init__(self, lengths=(1000, 2000), depths=(0, 50, 100), num_lengths=None, num_depths=None,
                 min_length=1000, max_length=None, max_new_tokens=48, num_samples=None, **knobs):
        super().__init__(num_samples=num_samples, **knobs)
        # num_lengths / num_depths (when given) build Kamradt's linear grid instead of explicit lists.
        self.lengths = None if num_lengths is not None else lengths
        self.depths = None if num_depths is not None else depths
        self.num_lengths, self.num_depths = num_lengths, num_depths
        self.min_length, self.max_length = int(min_length), max_length
        self.max_new_tokens = int(max_new_tokens)
        for d in _grid(self.depths, self.num_depths, 0, 100, "depths"):
            if not 0 <= d <= 100:
                raise ValueError(f"niah.depths contains {d}; allowed: integers in [0, 100]")

    def grid(self, max_context_tokens: int | None = None) -> tuple[list[int], list[int]]:
        top = self.max_length or max_context_tokens
        if self.lengths is None and top is None:
            raise ValueError("niah.num_lengths needs niah.max_length or a model context limit")
        lengths = _grid(self.lengths, self.num_lengths, self.min_length, top, "lengths")
        if max_context_tokens is not None and any(L > max_context_tokens for L in lengths):
            warnings.warn(f"niah: skipping lengths above the model context {max_context_tokens}")
            lengths = [L for L in lengths if L <= max_context_tokens]
        return lengths, _grid(self.depths, self.num_depths, 0, 100, "depths")

    def build(self, tokenizer, length: int, depth: int) -> tuple[str, str]:
        """(context, question) whose tokens plus the answer prefix and max_new_tokens fit `length`."""
        question = f"{QUESTION} Don't give information outside the document or repeat your findings"
        essays = _haystack(length)
        cache: dict[int, str] = {}

        def context_of(n: int) -> str:
            if n not in cache:
                hay = token_prefix(tokenizer, essays, n)
                at = len(token_prefix(tokenizer, essays, int(n * depth / 100)))  # char offset of depth%
                cache[n] = f"{SYSTEM}\n\n<context>\n{insert_needle(hay, at, depth)}\n</context>\n\n"
            return cache[n]

        budget = length - self.max_new_tokens
        overhead = n_tokens(tokenizer, question + ANSWER_PREFIX + NEEDLE + SYSTEM) + 8
        n = fit_count(lambda k: n_tokens(tokenizer, context_of(k) + question + ANSWER_PREFIX), budget,
                      hi=10 * length, guess=budget - overhead)
        return context_of(n), question

    def samples(self, tokenizer, max_context_tokens: int | None = None) -> Iterator[Sample]:
        lengths, depths = self.grid(max_context_tokens)
        count = 0
        for L in lengths:
            # Lengths exclude chat-template tokens: at the model's limit keep CHAT_RESERVE tokens for them.
            budget = min(L, max_context_tokens - CHAT_RESERVE) if max_context_tokens else L
            for d in depths:
                if self.num_samples is not None and count >= self.num_samples:
                    return
                context, question = self.build(tokenizer, budget, d)
                yield Sample(id=f"niah-{L}-{d}", context=context,
                             queries=[Query(question=question, answers=[NEEDLE.strip()],
                                            max_new_tokens=self.max_new_tokens, answer_prefix=ANSWER_PREFIX)],
                             meta={"subtask": "niah", "length": L, "depth": d})
                count += 1

    def postprocess(self, prediction: str, query: Query, sample: Sample) -> str:
        return first_line(prediction)

    def score(self, prediction: str, query: Query, sample: Sample) -> float:
        return keyword_score(prediction)

    def aggregate(self, records: list[dict]) -> dict[str, float]:
        ok = [r for r in records if r.get("status", "ok") == "ok"]
        out = super().aggregate(ok)
        groups: dict[str, list[float]] = {}
        for r in ok:
            meta = r.get("meta", {})
            groups.setdefault(f"score/length={meta.get('length')}", []).append(r["score"])
            groups.setdefault(f"score/depth={meta.get('depth')}", []).append(r["score"])
            if "prediction" in r:
                groups.setdefault("rouge1_f", []).append(rouge1_f(first_line(r["prediction"])))
        out.update({k: sum(v) / len(v) for k, v in groups.items()})
        return out


def _haystack(length: int) -> str:
    """The essays, repeated when a (very long) length needs more text than they hold (~700k tokens)."""
    return _repeated(1 + length // 500_000)


@lru_cache(maxsize=4)
def _repeated(times: int) -> str:
    return " ".join([essay_text()] * times)


def insert_needle(haystack: str, at: int, depth: int) -> str:
    """Put NEEDLE at the start of the sentence holding character `at` (depth%); depth 100 appends it."""
    if depth >= 100:
        return haystack + NEEDLE
    starts = sentence_starts(haystack[:at + 1])
    pos = starts[-1] if starts and starts[-1] <= at else 0
    return haystack[:pos] + NEEDLE + haystack[pos:]
