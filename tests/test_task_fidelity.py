"""Known published outputs as regression checks: each test runs a task's own pipeline (fixture row -> sample ->
prompt; prediction -> postprocess -> score -> aggregate) and compares with what the official code gives.

Sources (read, cited; nothing here imports them):
- LongBench v1: github.com/THUDM/LongBench at 2e00731f8d0b (2025-01-15), LongBench/pred.py, LongBench/eval.py,
  LongBench/metrics.py. tests/fixtures/longbench_official/*.json are byte copies of its LongBench/config/
  dataset2prompt.json, dataset2maxlen.json and model2maxlen.json (MIT licence), the oracle of the prompt checks.
- LongBench's rouge-L: the `rouge` package 1.0.1 (github.com/pltrdy/rouge at c1b90a7, rouge/rouge.py and
  rouge/rouge_score.py: sentences split on ".", words split on " ", rouge_l_summary_level with exclusive=True,
  i.e. distinct words: m, n and the LCS union are sets; F = 2PR / (P + R + 1e-8)).
- RULER: github.com/NVIDIA/RULER at c3f5e3b (2026-07-22), scripts/eval/evaluate.py (postprocess_pred) and
  scripts/eval/synthetic/constants.py (string_match_all / string_match_part, x100, rounded to 2 places).
The expected numbers are worked by hand in each docstring from those definitions.
"""
import json
from pathlib import Path

import pytest

from kvbench.task import Query, Sample
from kvbench.tasks import longbench as lb
from kvbench.tasks.ruler import Ruler

FIX = Path(__file__).parent / "fixtures" / "longbench"
OFFICIAL = Path(__file__).parent / "fixtures" / "longbench_official"


def official(name):
    return json.loads((OFFICIAL / f"{name}.json").read_text(encoding="utf-8"))


def rows(config):
    return [json.loads(line) for line in (FIX / f"{config}.jsonl").read_text(encoding="utf-8").splitlines()]


# ---------------------------------------------------------------- LongBench: the prompt, byte for byte

def test_prompt_tables_are_the_official_config_files():
    assert lb.DATASET2PROMPT == official("dataset2prompt")
    assert lb.DATASET2MAXLEN == official("dataset2maxlen")


def test_model2maxlen_is_reproduced_from_each_models_window():
    """model2maxlen.json, from the window each model is named or documented with (chatglm2-6b: 32K)."""
    window = {"llama2-7b-chat-4k": 4096, "longchat-v1.5-7b-32k": 32768, "xgen-7b-8k": 8192,
              "internlm-7b-8k": 8192, "chatglm2-6b": 32768, "chatglm2-6b-32k": 32768, "chatglm3-6b-32k": 32768,
              "vicuna-v1.5-7b-16k": 16384}
    table = official("model2maxlen")
    assert set(table) == set(window)
    for model, max_length in table.items():
        assert lb.official_max_length(window[model]) == max_length, model
        assert lb.LongBench().prompt_budget("gov_report", window[model]) == max_length, model


def test_fixture_prompts_are_the_official_strings(tokenizer):
    """pred.py: prompt = dataset2prompt[dataset].format(**json_obj), kept whole when it fits max_length. At the
    embedded model's 8K window the default max_length is 7,500 (model2maxlen's 8K value) and every fixture fits,
    so context + question is the official prompt byte for byte; samsum is also written out by hand."""
    prompts = official("dataset2prompt")
    configs = sorted(p.stem for p in FIX.glob("*.jsonl"))
    task = lb.LongBench(subsets=configs, data_dir=str(FIX))
    samples = list(task.samples(tokenizer, max_context_tokens=8192))
    assert len(samples) == sum(len(rows(c)) for c in configs)
    for s in samples:
        row = next(r for r in rows(s.meta["subtask"]) if r["_id"] == s.meta["_id"])
        assert s.context + s.queries[0].question == prompts[lb.base_name(s.meta["subtask"])].format(**row)
        assert s.queries[0].max_new_tokens == official("dataset2maxlen")[s.meta["dataset"]]
    samsum = next(s for s in samples if s.meta["dataset"] == "samsum")
    assert samsum.context + samsum.queries[0].question == (
        "Summarize the dialogue into a few short sentences. The following are some examples.\n\n"
        "Dialogue: Ann: Did you feed the cat?\nTom: Yes, twice.\nAnn: Twice?! She is on a diet.\nTom: Oops.\n"
        "Summary: Tom fed the cat twice, although she is on a diet.\n\n"
        "Dialogue: Sam: The train is late again.\nEva: How late?\nSam: 40 minutes, start without me.\n"
        "Summary: Sam's train is 40 minutes late, so Eva should start without him.\n\n"
        "\n\n"
        "Dialogue: Mia: Are we still on for lunch?\nLeo: Yes, 12:30 at the noodle place.\nMia: Great, see you there.\n"
        "Summary: ")
    assert samsum.chat_template is False  # pred.py: no chat prompt for trec, triviaqa, samsum, lsht, lcc, repobench-p


# ---------------------------------------------------------------- LongBench: eval.py's result.json

def run_predictions(task, tokenizer, predictions: dict[str, list[str]]) -> dict:
    """Score raw generations as the runner does (postprocess, then score) and aggregate the records."""
    records = []
    for s in task.samples(tokenizer):
        pred = predictions[s.meta["subtask"]].pop(0)
        q = s.queries[0]
        records.append({"score": task.score(task.postprocess(pred, q, s), q, s), "status": "ok",
                        "meta": dict(s.meta)})
    assert all(not v for v in predictions.values())  # every prediction used, in the fixture's order
    return task.aggregate(records)


def test_eval_py_scores_of_a_fixed_prediction_set(tokenizer):
    """eval.py's result.json for these generations (round(100 * mean, 2) per dataset), worked by hand:

    narrativeqa (qa_f1, best answer; SQuAD normalisation drops punctuation and a/an/the):
      "Under the stairs of the lighthouse" -> [under stairs of lighthouse]; vs "Under the lighthouse stairs."
      [under lighthouse stairs]: 3 common, P 3/4, R 1, F1 6/7; vs "beneath the stairs of the lighthouse": F1 3/4.
      -> 6/7. "The Heron." -> [heron] = 1. "He needs money." vs [to pay for his sisters passage to mainland]: 0.
      mean 13/21 -> 61.9
    trec (classification, after eval.py's first-line cut): " City\\nQuestion: ..." -> " City": only "City" among
      the 50 classes -> 1. "Individual or Country": two classes named, the right one among them -> 1/2.
      "Country" for "Other location" -> 0. mean 1/2 -> 50.0
    samsum (rouge-L of the `rouge` package, first line only): hyp "Leo and Mia meet at the noodle place for
      lunch" (10 distinct words), ref "Mia and Leo will meet for lunch at 12:30 at the noodle place" (13 words,
      12 distinct: "at" twice). LCS = 1 of {Mia, and, Leo} + meet + at the noodle place = 6 distinct words.
      P = 6/10, R = 6/12, F = 2PR / (P + R + 1e-8) = 0.6 / 1.10000001 -> 54.55
    hotpotqa_e (scorer_e, buckets by the row's length 2500 / 6100 / 9400): "Dundee" = 1 -> 0-4k 100.0;
      "He died in 1979." vs "1979": P 1/4, R 1, F1 0.4 -> 4-8k 40.0; "Glasgow" vs "Dundee" -> 8k+ 0.0
    """
    configs = ["narrativeqa", "trec", "samsum", "hotpotqa_e"]
    task = lb.LongBench(subsets=configs, data_dir=str(FIX))
    preds = {
        "narrativeqa": ["Under the stairs of the lighthouse", "The Heron.", "He needs money."],
        "trec": [" City\nQuestion: Where is Lima ?\nType: City", "Individual or Country", "Country"],
        "samsum": ["\nLeo and Mia meet at the noodle place for lunch.\nDialogue: Ann: Hi\nSummary: Ann says hi."],
        "hotpotqa_e": ["Dundee", "He died in 1979.", "Glasgow"],
    }
    agg = run_predictions(task, tokenizer, preds)
    result_json = {k: round(100 * agg[f"score/{k}"], 2) for k in ["narrativeqa", "trec", "samsum"]}
    assert result_json == {"narrativeqa": 61.9, "trec": 50.0, "samsum": 54.55}
    assert agg["score/narrativeqa"] == pytest.approx(13 / 21)
    assert agg["score/samsum"] == pytest.approx(0.6 / (1.1 + 1e-8), abs=1e-12)
    assert {b: round(100 * agg[f"score/hotpotqa_e/{b}"], 2) for b in lb.E_BUCKETS} == \
        {"0-4k": 100.0, "4-8k": 40.0, "8k+": 0.0}


# ---------------------------------------------------------------- RULER: evaluate.py's scores

def test_ruler_evaluate_py_scores_of_a_fixed_prediction_set():
    """evaluate.py postprocess_pred (strip, [\\x00-\\x1f] -> "\\n", strip), then constants.py:
    string_match_all = mean over samples of (references found, case-insensitive) / references x 100;
    string_match_part = mean over samples of max(found) x 100; both round(score, 2).
      niah_multivalue (all): refs [1234567, 7654321, 1111111, 2222222]; "1234567, 7654321 and 1111111" -> 3/4;
        "\\t7654321\\x00" -> 1/4; "" -> 0 -> mean 1/3 -> 33.33
      vt (all): refs [ABCDE, FGHIJ]; "abcde fghij" -> 1 (case-insensitive); "ABCDE" -> 1/2 -> 75.0
      qa_1 (part): refs ["Denver Broncos", "Broncos"]; "the broncos" -> 1; "Carolina" -> 0 -> 50.0
    """
    task = Ruler()

    def score(subtask, refs, preds):
        q = Query(question="", answers=refs, max_new_tokens=8)
        s = Sample(id="x", context="", queries=[q], meta={"subtask": subtask, "length": 4096})
        return round(100 * sum(task.score(task.postprocess(p, q, s), q, s) for p in preds) / len(preds), 2)

    assert score("niah_multivalue", ["1234567", "7654321", "1111111", "2222222"],
                 ["1234567, 7654321 and 1111111", "\t7654321\x00", ""]) == 33.33
    assert score("vt", ["ABCDE", "FGHIJ"], ["abcde fghij", "ABCDE"]) == 75.0
    assert score("qa_1", ["Denver Broncos", "Broncos"], ["the broncos", "Carolina"]) == 50.0
