"""NIAH (Kamradt): lengths fit, needle at the right depth, keyword score and ROUGE-1 on worked examples."""
import re

import pytest

from kvbench.task import Query, Sample
from kvbench.tasks._text import n_tokens
from kvbench.tasks.niah import NEEDLE, NIAH, keyword_score, rouge1_f

SENT_END = re.compile(r"[.!?][\"')\]]*\s+[A-Z\"']")


def _haystack_and_needle(sample):
    body = sample.context.split("<context>\n", 1)[1].rsplit("\n</context>", 1)[0]
    pos = body.index(NEEDLE)
    return body[:pos] + body[pos + len(NEEDLE):], pos


@pytest.mark.parametrize("depth", [0, 25, 50, 75, 100])
def test_needle_depth_and_length(tokenizer, depth):
    task = NIAH(lengths=[2000], depths=[depth])
    (sample,) = list(task.samples(tokenizer))
    q = sample.queries[0]
    assert sample.meta == {"subtask": "niah", "length": 2000, "depth": depth}
    total = n_tokens(tokenizer, sample.context + q.question + q.answer_prefix) + q.max_new_tokens
    assert 1990 <= total <= 2000
    hay, pos = _haystack_and_needle(sample)
    n = n_tokens(tokenizer, hay)
    if depth == 100:
        assert pos == len(hay)
        return
    # the character where depth% of the haystack tokens ends, found independently of the task code
    ids = tokenizer(hay, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    k = int(n * depth / 100)
    at = ids[k - 1][1] if k else 0
    assert pos <= at
    # the needle starts a sentence: the text before it ends a sentence (or is empty) ...
    assert pos == 0 or re.search(r"[.!?][\"')\]]*\s+$", hay[:pos])
    # ... and no sentence boundary lies between the needle and the depth point (within one sentence)
    assert not SENT_END.search(hay[pos:at])
    # token position of the needle ≈ depth × haystack tokens
    assert abs(n_tokens(tokenizer, hay[:pos]) / n - depth / 100) < 0.05


def test_grid_knobs_and_errors(tokenizer):
    task = NIAH(num_lengths=3, num_depths=5, min_length=1000, max_length=3000)
    assert task.grid() == ([1000, 2000, 3000], [0, 25, 50, 75, 100])
    with pytest.warns(UserWarning, match="skipping"):
        assert NIAH(lengths=[1000, 9000]).grid(max_context_tokens=8192)[0] == [1000]
    # at the model's limit, 64 tokens stay free for the chat template; the sample keeps its length label
    (s,) = NIAH(lengths=[1000], depths=[50]).samples(tokenizer, max_context_tokens=1000)
    q = s.queries[0]
    assert s.meta["length"] == 1000
    assert 900 <= n_tokens(tokenizer, s.context + q.question + q.answer_prefix) + q.max_new_tokens <= 936
    assert len(list(NIAH(lengths=[1000], depths=[0, 50, 100], num_samples=2).samples(tokenizer))) == 2
    with pytest.raises(ValueError, match="depths"):
        NIAH(depths=[150])
    with pytest.raises(ValueError, match="too short"):
        list(NIAH(lengths=[60]).samples(tokenizer))


def test_deterministic(tokenizer):
    a = list(NIAH(lengths=[1000], depths=[40]).samples(tokenizer))
    b = list(NIAH(lengths=[1000], depths=[40]).samples(tokenizer))
    assert a[0].context == b[0].context


# Needle words (21): the best thing to do in san francisco is eat a sandwich and sit in dolores park on a
# sunny day  -> "a" and "in" occur twice.
@pytest.mark.parametrize("pred, keywords, rouge", [
    ("The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day.", 1.0, 1.0),
    # 6 words, all in the needle: P = 1, R = 6/21, F = 2·(6/21)/(27/21) = 12/27
    ("Eat a sandwich in Dolores\n park.", 2 / 3, 12 / 27),
    # "a" ×3 clipped to 2: overlap 4 of 5 words, P = 4/5, R = 4/21, F = 32/104
    ("a SUNNY day a a", 1 / 3, 32 / 104),
    ("I don't know.", 0.0, 0.0),
    ("", 0.0, 0.0),
])
def test_keyword_and_rouge(pred, keywords, rouge):
    assert keyword_score(pred) == pytest.approx(keywords)
    assert rouge1_f(pred) == pytest.approx(rouge)


def test_score_postprocess_aggregate():
    task = NIAH()
    q = Query(question="q", answers=[NEEDLE.strip()], max_new_tokens=48)
    s = Sample(id="x", context="c", queries=[q], meta={"subtask": "niah", "length": 1000, "depth": 50})
    raw = "\n\n  Eat a sandwich in Dolores Park.\nThen something about a sunny day."
    pred = task.postprocess(raw, q, s)
    assert pred == "Eat a sandwich in Dolores Park."  # first non-empty line only
    assert task.score(pred, q, s) == pytest.approx(2 / 3)
    recs = [{"score": 2 / 3, "prediction": raw, "meta": s.meta},
            {"score": 0.0, "prediction": "no", "meta": {"subtask": "niah", "length": 2000, "depth": 50}},
            {"score": 1.0, "status": "error", "meta": s.meta}]
    agg = task.aggregate(recs)
    assert agg["score/niah"] == pytest.approx(1 / 3)
    assert agg["score/length=1000"] == pytest.approx(2 / 3) and agg["score/length=2000"] == 0.0
    assert agg["score/depth=50"] == pytest.approx(1 / 3)
    assert agg["rouge1_f"] == pytest.approx(12 / 27 / 2)  # "Eat a sandwich in Dolores Park." and "no"
