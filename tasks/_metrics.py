"""Scoring functions of LongBench and SCBench, re-implemented from their definitions.

Sources (read to learn the definitions; no code copied):
- LongBench v1 `metrics.py` / `eval.py` (THUDM/LongBench): qa_f1 (SQuAD normalisation), qa_f1_zh (jieba),
  rouge-L (the `rouge` 1.0.1 package), classification, retrieval, count, code similarity (fuzzywuzzy).
- SCBench `compute_scores.py` / `repo_qa_utils.py` (microsoft/MInference, scbench/): kv / label-in-prediction,
  string_match_all, first-number match, choice letter, character F1 for Chinese, rougeLsum (`rouge_score`
  via HF `evaluate`), RepoQA (code block + BLEU with Chen & Cherry smoothing 4, as nltk's sentence_bleu).

All scores are floats in [0, 1]. `best_of` takes the max over reference answers, as both benchmarks do.
"""
from __future__ import annotations

import difflib
import math
import re
import string
from collections import Counter
from typing import Callable, Iterable

# ---------------------------------------------------------------- normalisation

_EN_PUNCT = set(string.punctuation)
# Chinese punctuation list of LongBench / SCBench `normalize_zh_answer` (data: a character list).
_ZH_PUNCT = set(
    string.punctuation
    + "！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣､、〃》「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿–—‘’‛“”„‟…‧﹏."
)


def normalize_answer(s: str) -> str:
    """SQuAD normalisation: lower, drop punctuation, drop articles a/an/the, collapse whitespace."""
    s = "".join(ch for ch in s.lower() if ch not in _EN_PUNCT)
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def normalize_zh_answer(s: str) -> str:
    """Chinese normalisation: lower, drop English and Chinese punctuation, remove all whitespace."""
    return "".join(ch for ch in s.lower() if ch not in _ZH_PUNCT and not ch.isspace())


def jieba_cut(text: str) -> list[str]:
    """Word segmentation used by LongBench for Chinese (jieba, accurate mode)."""
    import jieba  # imported lazily: loading its dictionary takes ~1 s
    jieba.setLogLevel(60)  # silence "Building prefix dict ..." on stderr
    return list(jieba.cut(text, cut_all=False))


def token_f1(pred_tokens: list, gold_tokens: list) -> float:
    """Bag-of-tokens F1 (multiset overlap)."""
    same = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if same == 0:
        return 0.0
    p = same / len(pred_tokens)
    r = same / len(gold_tokens)
    return 2 * p * r / (p + r)


def best_of(metric: Callable[..., float], prediction: str, answers: Iterable[str], **kw) -> float:
    """Max of `metric` over the reference answers (0 when there are none)."""
    return max([0.0] + [float(metric(prediction, a, **kw)) for a in answers])


# ---------------------------------------------------------------- LongBench metrics

def qa_f1(prediction: str, answer: str, **_) -> float:
    """LongBench/SCBench qa_f1: token F1 after SQuAD normalisation."""
    return token_f1(normalize_answer(prediction).split(), normalize_answer(answer).split())


def qa_f1_zh(prediction: str, answer: str, **_) -> float:
    """LongBench qa_f1_zh: jieba words, each normalised, empty ones dropped, then token F1."""
    def words(t):
        return [w for w in (normalize_zh_answer(x) for x in jieba_cut(t)) if w]
    return token_f1(words(prediction), words(answer))


def _lcs_table(a: list, b: list) -> list[list[int]]:
    t = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i in range(1, len(a) + 1):
        ai, row, prev = a[i - 1], t[i], t[i - 1]
        for j in range(1, len(b) + 1):
            row[j] = prev[j - 1] + 1 if ai == b[j - 1] else max(prev[j], row[j - 1])
    return t


def lcs_length(a: list, b: list) -> int:
    return _lcs_table(a, b)[-1][-1]


def _lcs_words_rouge_pkg(ref: list[str], hyp: list[str]) -> list[str]:
    """One LCS of ref and hyp, read back the way the `rouge` package does (ties move left in hyp)."""
    t = _lcs_table(ref, hyp)
    i, j, out = len(ref), len(hyp), []
    while i > 0 and j > 0:
        if ref[i - 1] == hyp[j - 1]:
            out.append(ref[i - 1])
            i, j = i - 1, j - 1
        elif t[i - 1][j] > t[i][j - 1]:
            i -= 1
        else:
            j -= 1
    return out[::-1]


def rouge_l(prediction: str, answer: str, **_) -> float:
    """LongBench rouge-L F: the summary-level ROUGE-L of the `rouge` 1.0.1 package (pltrdy).

    That package (i) splits each text into sentences on "." and re-joins each sentence's words with single
    spaces, (ii) counts words as a *set* (distinct words) for both lengths m (reference) and n (hypothesis),
    and (iii) takes as hits the number of distinct words in the union of the LCSs of every
    (reference sentence, hypothesis sentence) pair. F = 2PR / (P + R + 1e-8). Empty texts score 0, as
    LongBench's try/except does. (The package's recursive LCS read-back overflows Python's stack for very
    long sentence pairs and LongBench then scores 0; we don't reproduce that crash.)
    """
    def sentences(t):
        return [" ".join(s.split()) for s in t.split(".") if len(s) > 0]
    hyp_s, ref_s = sentences(prediction), sentences(answer)
    if not hyp_s or not ref_s:
        return 0.0
    hyp_words = [s.split(" ") for s in hyp_s]  # split(" ") keeps "" for an all-blank sentence, as the package
    ref_words = [s.split(" ") for s in ref_s]
    m = len({w for s in ref_words for w in s})
    n = len({w for s in hyp_words for w in s})
    union: set[str] = set()
    for r in ref_words:
        for h in hyp_words:
            union.update(_lcs_words_rouge_pkg(r, h))
    p, r_ = len(union) / n, len(union) / m
    return 2.0 * p * r_ / (p + r_ + 1e-8)


def rouge_l_zh(prediction: str, answer: str, **_) -> float:
    """LongBench rouge-zh: jieba words joined by spaces, then `rouge_l`."""
    return rouge_l(" ".join(jieba_cut(prediction)), " ".join(jieba_cut(answer)))


def classification(prediction: str, answer: str, all_classes: Iterable[str] = (), **_) -> float:
    """LongBench classification: 1/k if the right class is among the k class names found in the prediction.

    A found class name that is a substring of the right class (and not the right class itself) is not counted,
    so "Other location" is not penalised for also containing "location"-like shorter class names.
    (LongBench removes those from the list while iterating over it, which can skip the element after a removed
    one; we apply the rule as intended, to every such match.)
    """
    found = [c for c in all_classes if c in prediction]
    found = [c for c in found if not (c in answer and c != answer)]
    return 1.0 / len(found) if answer in found else 0.0


def _fraction_equal(numbers: list[str], target: str) -> float:
    return sum(n == target for n in numbers) / len(numbers) if numbers else 0.0


def count_score(prediction: str, answer: str, **_) -> float:
    """LongBench passage_count: share of the numbers in the prediction that equal the answer."""
    return _fraction_equal(re.findall(r"\d+", prediction), str(answer))


def retrieval(prediction: str, answer: str, **_) -> float:
    """LongBench passage_retrieval_en: answer "Paragraph k"; share of numbers in the prediction equal to k."""
    return _fraction_equal(re.findall(r"\d+", prediction), re.findall(r"Paragraph (\d+)", answer)[0])


def retrieval_zh(prediction: str, answer: str, **_) -> float:
    """LongBench passage_retrieval_zh: answer "段落k"; share of numbers in the prediction equal to k."""
    return _fraction_equal(re.findall(r"\d+", prediction), re.findall(r"段落(\d+)", answer)[0])


def fuzz_ratio(a: str, b: str) -> int:
    """fuzzywuzzy's `fuzz.ratio` without python-Levenshtein (LongBench's requirements don't install it).

    That is difflib.SequenceMatcher(None, a, b).ratio() (Ratcliff/Obershelp, with difflib's default autojunk)
    × 100, rounded to an int; equal strings give 100 (even empty ones), one empty string gives 0.
    """
    if a == b:
        return 100
    if not a or not b:
        return 0
    return int(round(100 * difflib.SequenceMatcher(None, a, b).ratio()))


def code_sim(prediction: str, answer: str, **_) -> float:
    """LongBench code similarity: the first generated line without ` # or // is compared to the answer."""
    line = ""
    for candidate in prediction.lstrip("\n").split("\n"):
        if "`" not in candidate and "#" not in candidate and "//" not in candidate:
            line = candidate
            break
    return fuzz_ratio(line, answer) / 100


# ---------------------------------------------------------------- SCBench metrics

def label_in_prediction(prediction: str, answers: Iterable[str]) -> float:
    """SCBench qa_eng / many_shot (InfiniteBench longdialogue_qa_eng): any label, upper-cased, in the prediction."""
    up = prediction.strip().upper()
    return float(any(a.upper() in up for a in answers))


def kv_match(prediction: str, answer: str) -> float:
    """SCBench kv / prefix_suffix (InfiniteBench kv_retrieval): the value appears verbatim (case-sensitive)."""
    return float(answer in prediction)


def string_match_all(prediction: str, answers: list[str]) -> float:
    """SCBench vt (RULER's string_match_all): share of references found (case-insensitive), rounded to 2 places."""
    p = prediction.lower()
    return round(sum(a.lower() in p for a in answers) / len(answers), 2)


def first_int(prediction: str) -> str:
    """The first maximal run of digits in the prediction ('' if none)."""
    m = re.search(r"[0-9]+", prediction)
    return m.group(0) if m else ""


def passkey_match(prediction: str, answer: str) -> float:
    """SCBench passkey (summary_with_needles): the first digit run equals the answer string."""
    return float(first_int(prediction) == str(answer))


def first_number_match(prediction: str, answer) -> float:
    """SCBench mf (InfiniteBench math_find): first number (int or decimal) in the prediction equals the label.

    An int label is compared with int(float(first number)); a float label with float(first number).
    """
    m = re.search(r"\d+\.\d+|\d+", prediction)
    if m is None:
        return 0.0
    label = answer
    if isinstance(label, str):
        label = int(label) if re.fullmatch(r"-?\d+", label.strip()) else float(label)
    if isinstance(label, int):
        return float(int(float(m.group(0))) == label)
    return float(float(m.group(0)) == label)


def choice_match(prediction: str, labels: list[str]) -> float:
    """SCBench choice_eng (InfiniteBench longbook_choice_eng). `labels` = [option text, option letter].

    In order: the first character if it is A-D; the whole prediction equal to a label; the text after
    "answer is:", "answer:", "answer is" or "option is" starting with a label; the first word that is a
    substring of "ABCD".
    """
    pred = prediction.strip()
    if pred == "":
        return 0.0
    if pred[0] in "ABCD":
        return float(pred[0] in labels)
    if pred in labels:
        return 1.0
    for c in ["\n", '"', "'", ".", ",", "?", "!", "{", "}"]:
        pred = pred.replace(c, " ")
    while "  " in pred:
        pred = pred.replace("  ", " ")
    for prefix in ["answer is:", "answer:", "answer is", "option is"]:
        idx = pred.find(prefix)
        if idx == -1:
            continue
        if len(pred) < idx + len(prefix) + 1:  # the prediction ends with the prefix
            return 0.0
        after = pred[idx + len(prefix) + 1:]
        return float(any(after.startswith(s) for s in labels))
    for word in pred.split():
        if word in "ABCD":  # substring test, as the official code does
            return float(word in labels)
    return 0.0


def char_f1_zh(prediction: str, answer: str) -> float:
    """SCBench qa_chn (InfiniteBench longbook_qa_chn): F1 over characters after Chinese normalisation."""
    return token_f1(list(normalize_zh_answer(prediction)), list(normalize_zh_answer(answer)))


def _rouge_score_tokens(text: str) -> list[str]:
    """`rouge_score`'s default tokenizer (no stemmer): lower, non [a-z0-9] → space, split."""
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).split()


def _lcs_indices(ref: list[str], can: list[str]) -> list[int]:
    """Indices in ref of one LCS, read back as `rouge_score` does (ties move up in ref)."""
    t = _lcs_table(ref, can)
    i, j, out = len(ref), len(can), []
    while i > 0 and j > 0:
        if ref[i - 1] == can[j - 1]:
            out.append(i - 1)
            i, j = i - 1, j - 1
        elif t[i][j - 1] > t[i - 1][j]:
            j -= 1
        else:
            i -= 1
    return out[::-1]


def rouge_lsum(prediction: str, answer: str) -> float:
    """SCBench summary: rougeLsum F of `rouge_score` (HF `evaluate` defaults: no stemmer, split on newlines).

    Sentences are the non-empty lines; for each reference sentence, the union (over prediction sentences) of
    LCS token positions gives candidate hits, each counted at most as often as the token occurs in both texts.
    P = hits / prediction tokens, R = hits / reference tokens.
    """
    ref = [_rouge_score_tokens(s) for s in answer.split("\n") if s]
    can = [_rouge_score_tokens(s) for s in prediction.split("\n") if s]
    m, n = sum(map(len, ref)), sum(map(len, can))
    if not m or not n:
        return 0.0
    cnt_r = Counter(t for s in ref for t in s)
    cnt_c = Counter(t for s in can for t in s)
    hits = 0
    for r in ref:
        union = sorted(set().union(*[_lcs_indices(r, c) for c in can]))
        for tok in (r[i] for i in union):
            if cnt_c[tok] > 0 and cnt_r[tok] > 0:
                hits += 1
                cnt_c[tok] -= 1
                cnt_r[tok] -= 1
    p, r_ = hits / n, hits / m
    return 0.0 if p + r_ == 0 else 2 * p * r_ / (p + r_)


def _ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def sentence_bleu(reference: list[str], hypothesis: list[str], max_n: int = 4) -> float:
    """Sentence BLEU with uniform 1..4-gram weights and Chen & Cherry (2014) smoothing method 4 (k=5),
    matching nltk's `sentence_bleu(..., smoothing_function=SmoothingFunction().method4)` for one reference.

    p_n = clipped n-gram matches / max(1, hypothesis n-grams). If no unigram matches, BLEU = 0. Each zero p_n
    (when the hypothesis has more than one token) becomes 1 / (2^i * k / ln(len(hyp))) / denominator with
    i = 1, 2, ... over the zero orders. BP = 1 if len(hyp) > len(ref) else exp(1 - len(ref)/len(hyp)).
    """
    hyp_len, ref_len = len(hypothesis), len(reference)
    nums, dens = [], []
    for n in range(1, max_n + 1):
        h, r = _ngrams(hypothesis, n), _ngrams(reference, n)
        nums.append(sum(min(c, r[g]) for g, c in h.items()))
        dens.append(max(1, sum(h.values())))
    if nums[0] == 0:
        return 0.0
    p = [a / b for a, b in zip(nums, dens)]
    inc = 1
    for i in range(max_n):
        if nums[i] == 0 and hyp_len > 1:
            p[i] = 1 / (2 ** inc * 5 / math.log(hyp_len)) / dens[i]
            inc += 1
    bp = 1.0 if hyp_len > ref_len else math.exp(1 - ref_len / hyp_len)
    return bp * math.exp(math.fsum(w * math.log(x) for w, x in zip([1 / max_n] * max_n, p) if x > 0))


def code_bleu(candidate: str, reference: str) -> float:
    """RepoQA function similarity: BLEU over whitespace-separated tokens of the stripped texts."""
    return sentence_bleu(re.split(r"\s+", reference.strip()), re.split(r"\s+", candidate.strip()))


def extract_code(output: str) -> str:
    """RepoQA output sanitising: the first ``` fenced block's body, or the whole (stripped) output if none.

    RepoQA then uses tree-sitter to cut the first function definition out of the block; we keep the whole
    block (identical when the block holds just the function, as the prompt asks).
    """
    output = output.strip()
    blocks = re.findall(r"^```(?:\w+)?\s*\n(.*?)(?=^```)```", output, re.DOTALL | re.MULTILINE)
    return blocks[0] if blocks else output


def repoqa_match(prediction: str, name: str, needles: list[tuple[str, str]], threshold: float = 0.8) -> float:
    """RepoQA retrieval: 1 if the most BLEU-similar function among the repo's needles is the asked one
    (`name`) and its similarity is >= threshold (SCBench reports pass@1 at 0.8)."""
    code = extract_code(prediction)
    best_name, best = None, 0.0
    for needle_name, needle_code in needles:
        s = code_bleu(code, needle_code)
        if s > best:
            best_name, best = needle_name, s
    return float(best_name == name and best >= threshold)
