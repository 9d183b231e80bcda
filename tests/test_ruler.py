"""RULER: every task generated at 4096 tokens fits and holds its answers; metrics on worked examples."""
import re

import pytest

from kvbench.task import Query, Sample
from kvbench.tasks._text import fit_count, n_tokens, split_sentences, token_prefix, essay_text
from kvbench.tasks.ruler import (SUBSETS, Ruler, RulerNIAH, postprocess_pred, string_match_all,
                                 string_match_part)

# RULER's constants.py: tokens_to_generate and metric per task family
OFFICIAL = {"niah": (128, "string_match_all"), "vt": (30, "string_match_all"), "cwe": (120, "string_match_all"),
            "fwe": (50, "string_match_all"), "qa": (32, "string_match_part")}
ALL13 = ["niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multikey_2",
         "niah_multikey_3", "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe", "qa_1", "qa_2"]


def test_thirteen_tasks():
    assert sorted(SUBSETS) == sorted(ALL13)
    assert Ruler().subsets == list(SUBSETS)


@pytest.mark.parametrize("subset", ALL13)
def test_sample_fits_and_holds_answers(tokenizer, subset):
    kind = SUBSETS[subset][0]
    sample, _ = Ruler().generate(tokenizer, subset, 4096, 0)
    (q,) = sample.queries
    assert (q.max_new_tokens, q.meta["metric"]) == OFFICIAL[kind]
    assert sample.meta == {"subtask": subset, "length": 4096, "index": 0} and sample.mode == "single"
    total = n_tokens(tokenizer, sample.context + q.question + q.answer_prefix) + q.max_new_tokens
    # qa adds whole documents (a few hundred tokens each); the others fill to within one step
    margin = 600 if kind == "qa" else q.max_new_tokens
    assert 4096 - margin <= total <= 4096
    assert q.answers
    for a in q.answers:
        if subset == "qa_2" and a.lower() in ("yes", "no"):
            continue  # HotpotQA comparison answers are not spans of the documents (as in RULER)
        assert a in sample.context
    if kind == "niah":  # each answer sits in an official needle sentence
        v = SUBSETS[subset][1]["v"]
        for a in q.answers:
            assert re.search(rf"One of the special magic {v} for \S+ is: {re.escape(a)}\.", sample.context)


def test_niah_single_wording(tokenizer):
    s, _ = Ruler().generate(tokenizer, "niah_single_1", 1024, 3)
    q = s.queries[0]
    key = re.search(r"One of the special magic numbers for (\S+) is: ", s.context).group(1)
    assert s.context.startswith("A special magic number is hidden within the following text. Make sure to "
                                "memorize it. I will quiz you about the number afterwards.\nThe grass is green.")
    assert q.question == f"\nWhat is the special magic number for {key} mentioned in the provided text?"
    assert q.answer_prefix == f" The special magic number for {key} mentioned in the provided text is"
    assert re.fullmatch(r"\d{7}", q.answers[0])
    m, _ = Ruler().generate(tokenizer, "niah_multiquery", 2048, 0)
    assert m.queries[0].question.startswith("\nWhat are all the special magic numbers for ")
    assert m.queries[0].question.count(", ") == 3 and ", and " in m.queries[0].question
    assert len(m.queries[0].answers) == 4


def test_deterministic(tokenizer):
    for subset in ("niah_single_2", "vt", "fwe"):
        a, _ = Ruler().generate(tokenizer, subset, 2048, 1)
        b, _ = Ruler(seed=42).generate(tokenizer, subset, 2048, 1)
        c, _ = Ruler().generate(tokenizer, subset, 2048, 2)
        assert a.context == b.context and a.queries[0].answers == b.queries[0].answers
        assert a.context != c.context
    d, _ = Ruler(seed=7).generate(tokenizer, "vt", 2048, 1)
    assert d.context != a.context


def test_samples_knobs_and_errors(tokenizer):
    got = list(RulerNIAH(lengths=[1024, 2048], num_samples=2).samples(tokenizer))
    assert [(s.meta["subtask"], s.meta["length"]) for s in got][:2] == [("niah_single_1", 1024)] * 2
    assert len(got) == 3 * 2 * 2
    with pytest.warns(UserWarning, match="skipping length 4096"):
        got = list(Ruler(lengths=[1024, 4096], subsets=["vt"], num_samples=1).samples(tokenizer, 2048))
    assert [s.meta["length"] for s in got] == [1024]
    with pytest.raises(ValueError, match="allowed: niah_single_1"):
        RulerNIAH(subsets=["vt"])
    with pytest.raises(ValueError, match="'nope'"):
        Ruler(subsets=["nope"])
    with pytest.raises(ValueError, match="lengths"):
        Ruler(lengths=[])


@pytest.mark.parametrize("pred, refs, all_, part", [
    ("The numbers are 123 and 456.", ["123", "456", "789"], 2 / 3, 1.0),
    ("xufxo, ILHGN", ["XUFXO", "ilhgn"], 1.0, 1.0),  # case-insensitive
    ("Paris, France", ["France", "Kingdom of France"], 0.5, 1.0),
    ("in the 10th century", ["10th and 11th centuries", "10th century"], 0.5, 1.0),
    ("", ["yes"], 0.0, 0.0),
])
def test_string_match(pred, refs, all_, part):
    assert string_match_all(pred, refs) == pytest.approx(all_)
    assert string_match_part(pred, refs) == pytest.approx(part)


def test_postprocess_and_score():
    assert postprocess_pred("  1. ab\x00cd\te \n\x1f") == "1. ab\ncd\ne"
    task = Ruler()
    q = Query(question="q", answers=["10th and 11th centuries", "10th century"], max_new_tokens=32)
    qa = Sample(id="a", context="c", queries=[q], meta={"subtask": "qa_1", "length": 4096})
    vt = Sample(id="b", context="c", queries=[q], meta={"subtask": "vt", "length": 4096})
    assert task.score(" the 10th century\n", q, qa) == 1.0  # part: any reference
    assert task.score(" the 10th century\n", q, vt) == 0.5  # all: fraction of references


def test_aggregate_ruler_score():
    recs = [{"score": s, "meta": {"subtask": t, "length": L}} for t, L, s in [
        ("vt", 4096, 1.0), ("vt", 4096, 0.0), ("cwe", 4096, 0.5), ("vt", 8192, 0.0), ("cwe", 8192, 1.0)]]
    recs.append({"score": 1.0, "status": "error", "meta": {"subtask": "vt", "length": 8192}})
    agg = Ruler().aggregate(recs)
    assert agg["score/vt"] == pytest.approx(1 / 3) and agg["score/cwe"] == pytest.approx(0.75)
    assert agg["score/vt/4096"] == 0.5 and agg["score/cwe/8192"] == 1.0
    assert agg["ruler/4096"] == pytest.approx(0.5)  # mean of task means (0.5, 0.5)
    assert agg["ruler/8192"] == pytest.approx(0.5)  # (0.0, 1.0)
    assert agg["ruler"] == pytest.approx(0.5)


def test_sentence_splitter():
    text = "Dr. Smith went home. He slept!  Did he? yes, he did. The U.S. is big (really). \"Yes.\" No"
    assert split_sentences(text) == ["Dr. Smith went home.", "He slept!", "Did he? yes, he did.",
                                     "The U.S. is big (really).", "\"Yes.\"", "No"]
    assert split_sentences("one.two. Three") == ["one.two.", "Three"]  # no space: not a boundary


def test_fit_count_matches_brute_force():
    calls = []

    def length_of(n):  # uneven but non-decreasing growth, like tokens of a growing haystack
        calls.append(n)
        return 50 + 3 * n + (n * n) // 1000 + (n % 7 == 0)
    for target in (51, 52, 200, 4096, 12345):
        calls.clear()
        want = max(n for n in range(0, 5000) if length_of(n) <= target)
        calls.clear()
        assert fit_count(length_of, target, hi=10**6) == want
        assert len(calls) <= 20  # far fewer than a linear scan; about log2 at worst
    assert fit_count(length_of, 10**9, hi=100) == 100  # capped at hi
    with pytest.raises(ValueError, match="too short"):
        fit_count(length_of, 10, hi=100)


def test_token_prefix(tokenizer):
    text = essay_text()
    for n in (1, 37, 500):
        prefix = token_prefix(tokenizer, text, n)
        assert text.startswith(prefix) and abs(n_tokens(tokenizer, prefix) - n) <= 1
