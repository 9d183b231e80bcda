"""RULER: every task generated at 4096 tokens fits and holds its answers; metrics on worked examples."""
import re

import pytest

from kvbench.prompts import PromptBuilder
from kvbench.task import Query, Sample
from kvbench.tasks._text import fit_count, n_tokens, split_sentences, token_prefix, essay_text
from kvbench.tasks.ruler import (SUBSETS, Ruler, RulerNIAH, postprocess_pred, string_match_all,
                                 string_match_part)

# RULER's constants.py: tokens_to_generate and metric per task family
OFFICIAL = {"niah": (128, "string_match_all"), "vt": (30, "string_match_all"), "cwe": (120, "string_match_all"),
            "fwe": (50, "string_match_all"), "qa": (32, "string_match_part")}
ALL13 = ["niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multikey_2",
         "niah_multikey_3", "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe", "qa_1", "qa_2"]


def fed_by_engine(tokenizer, sample):
    """Tokens the engine's own prompt builder feeds for the sample's first query (context + question)."""
    pb = PromptBuilder(tokenizer)
    q = sample.queries[0]
    ctx, rest = pb.first_turn(sample.context, q.question, q.answer_prefix, sample.chat_template)
    return len(pb.encode(ctx, first=True)) + len(pb.encode(rest))


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
    # what the engine feeds (chat template included: upstream counts its model template) + tokens to generate
    total = fed_by_engine(tokenizer, sample) + q.max_new_tokens
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


# ---------------------------------------------------------------- upstream RULER (NVIDIA/RULER@c3f5e3b)
# Facts below are read from github.com/NVIDIA/RULER at c3f5e3b (2026-07-22), scripts/data/synthetic/*.py.

def test_length_counts_the_chat_template(tokenizer):
    """prepare.py formats the model template around the task template and every generator keeps
    tokens(that input) + tokens_to_generate <= max_seq_length. SmolLM2's template (a system prompt and role
    markers, ~30 tokens) must be inside L, so a sample of length L fits a window of L."""
    assert tokenizer.chat_template  # the embedded model has one
    for subset in ("niah_single_1", "niah_single_2", "fwe"):
        s, _ = Ruler().generate(tokenizer, subset, 1024, 0)
        q = s.queries[0]
        fed = fed_by_engine(tokenizer, s)
        bare = n_tokens(tokenizer, s.context + q.question + q.answer_prefix)
        assert fed - bare >= 20                       # the template is really there
        assert 1024 - 40 <= fed + q.max_new_tokens <= 1024, subset


NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."


def test_vt_answer_prefix_spelled_assigned(tokenizer):
    """constants.py: ' Answer: According to the chain(s) of variable assignment in the text above, {num_v}
    variables are assigned the value {query}, they are: ' (upstream fixed the old "assgined")."""
    s, _ = Ruler().generate(tokenizer, "vt", 2048, 0)
    q = s.queries[0]
    value = re.search(r"assigned the value (\d{5}) in the text above\.$", q.question).group(1)
    assert q.answer_prefix == (" Answer: According to the chain(s) of variable assignment in the text above, "
                               f"5 variables are assigned the value {value}, they are: ")


def test_vt_one_statement_per_line(tokenizer):
    """variable_tracking.py (noise haystack): the noise sentence repeated, chain statements inserted, joined by
    "\n": every statement ("VAR X = 12345" / "VAR Y = VAR X ") is a line of its own."""
    s, _ = Ruler().generate(tokenizer, "vt", 2048, 0)
    lines = s.context.split("\n")
    chain = [ln for ln in lines if "VAR " in ln]
    assert len(chain) == 10                           # 5 statements in the example, 5 in the task
    for ln in chain:
        assert re.fullmatch(r"VAR ([A-Z]{3}|[A-Z]{5}) = (\d{5}|VAR ([A-Z]{3}|[A-Z]{5}) )", ln), ln
    assert sum(ln == NOISE for ln in lines) > 20
    assert sorted(s.queries[0].answers) == sorted(re.findall(r"VAR ([A-Z]{5}) =", s.context))


def test_vt_example_fitted_like_upstream(tokenizer):
    """variable_tracking.py main(): the solved example is generated with max_seq_length=500 and nothing to
    generate (tokens_to_generate is 0 while icl_example is None), 3-letter names; it is the example's input
    + " " + names + "\n", and one more "\n" before the task's template."""
    s, _ = Ruler().generate(tokenizer, "vt", 2048, 0)
    m = re.search(r"they are:  ((?:[A-Z]{3} ){4}[A-Z]{3})\n\nMemorize and track", s.context)
    assert m, s.context[:3000]
    ex_prompt = s.context[:m.start() + len("they are: ")]
    assert ex_prompt.startswith("Memorize and track the chain(s) of variable assignment hidden in the following text.")
    assert n_tokens(tokenizer, ex_prompt) <= 500
    grown = ex_prompt.replace(NOISE + "\n", NOISE + "\n" + NOISE + "\n", 1)  # one more noise line
    assert n_tokens(tokenizer, grown) > 500


def test_cwe_example_answer_spacing(tokenizer):
    """common_words_extraction.py: the few-shot is template.format(...) + ' ' + '1. w1 2. w2 ...', so the
    example's answer reads "... in the list are: 1. <word>"."""
    for length in (2048, 4096):
        s, _ = Ruler().generate(tokenizer, "cwe", length, 0)
        assert re.search(r"appear most often in the list are: 1\. [a-z-]+ 2\. ", s.context), length
        assert "are:1." not in s.context


def test_fwe_vocabulary_size():
    """freq_words_extraction.py: max_seq_length -= tokens_to_generate, vocab_size = max_seq_length // 50:
    (4096 - 50) // 50 = 80 coded words (the top one shown as '...')."""
    import random as _random
    from kvbench.tasks.ruler import KINDS, gen_fwe
    parts, answers, _ = gen_fwe(_random.Random(0), 4096, alpha=2.0)
    head = KINDS["fwe"][0].split("{context}")[0]
    words = set(parts(200_000)[0][len(head):].split())  # enough words that every rank appears
    assert len(words) == 80 and "..." in words and len(answers) == 3


def test_essay_haystack_repeats_past_the_essays():
    """niah.py: a haystack needing more words than the essays hold repeats them."""
    import random as _random
    from kvbench.tasks.ruler import _essay_words, gen_niah
    n = len(_essay_words())
    parts, _, hi = gen_niah(_random.Random(0), 10 * n, "essay", "words", "numbers", 1, 1, 1)
    assert hi >= 10 * n
    longer, base = parts(n + 5000)[0], parts(n)[0]
    assert len(longer) > len(base) + 5000


def test_data_version_names_upstream():
    assert "NVIDIA/RULER@c3f5e3b" in Ruler.data_version and RulerNIAH.data_version == Ruler.data_version


# ---------------------------------------------------------------- issue 11: lengths a subtask cannot fit

def test_too_short_subtask_fails_alone(tokenizer):
    """At 1024 tokens qa_2's question + gold HotpotQA documents + template exceed the length: its samples are
    failed placeholders naming the subtask, the length typed and the length needed; niah runs."""
    task = Ruler(lengths=[1024], subsets=["niah_single_1", "qa_2"], num_samples=2)
    with pytest.warns(UserWarning, match=r"qa_2 does not fit length 1024"):
        got = list(task.samples(tokenizer))
    assert [s.meta["subtask"] for s in got] == ["niah_single_1"] * 2 + ["qa_2"] * 2
    assert all(s.error is None for s in got[:2])
    for s in got[2:]:
        assert re.fullmatch(r"ruler qa_2: length 1024 is too short, it needs at least \d+ tokens .*", s.error)
        need = int(re.search(r"at least (\d+)", s.error).group(1))
        assert need > 1024
        s_ok, _ = Ruler(subsets=["qa_2"]).generate(tokenizer, "qa_2", need, s.meta["index"])  # and that is enough
        assert s_ok.queries[0].answers


def test_no_subtask_fits_is_one_clear_error(tokenizer):
    import warnings
    with warnings.catch_warnings(), pytest.raises(ValueError) as e:
        warnings.simplefilter("error")  # no "the other subtasks run" warning when none does
        list(Ruler(lengths=[300], subsets=["vt", "qa_1"], num_samples=1).samples(tokenizer))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("ruler.lengths=[300]: too short for every subtask; allowed: a length")
    assert "vt " in msg and "qa_1 " in msg
