"""LongBench task: loading (zip / folder / offline), official prompt, middle truncation, scoring, aggregation."""
import json
import zipfile
from pathlib import Path

import pytest

from kvbench.task import TASKS, load_all_tasks
from kvbench.tasks import longbench as lb

FIX = Path(__file__).parent / "fixtures" / "longbench"
ALL = ["narrativeqa", "hotpotqa", "trec", "lcc", "passage_count", "multifieldqa_zh", "gov_report", "hotpotqa_e"]


def rows(name):
    return [json.loads(line) for line in (FIX / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()]


@pytest.fixture
def data_zip(tmp_path):
    """A data.zip laid out like the official one: data/<config>.jsonl."""
    path = tmp_path / "data.zip"
    with zipfile.ZipFile(path, "w") as z:
        for f in sorted(FIX.glob("*.jsonl")):
            z.write(f, f"data/{f.name}")
    return path


def test_registered():
    load_all_tasks()
    assert TASKS["longbench"] is lb.LongBench


def test_fixtures_follow_official_schema():
    keys = {"input", "context", "answers", "length", "dataset", "language", "all_classes", "_id"}
    for name in ALL:
        for r in rows(name):
            assert set(r) == keys and isinstance(r["answers"], list)


def test_load_from_zip_folder_and_unzipped_folder(data_zip, tmp_path):
    from_zip = lb.load_rows("trec", str(data_zip))
    assert from_zip == rows("trec")
    # a folder holding data.zip, and an unzipped folder (data/<config>.jsonl)
    assert lb.load_rows("trec", str(data_zip.parent)) == from_zip
    unzipped = tmp_path / "unz"
    zipfile.ZipFile(data_zip).extractall(unzipped)
    assert lb.load_rows("lcc", str(unzipped)) == rows("lcc")


def test_bad_inputs_raise_value_error(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="nonsense"):
        lb.LongBench(subsets=["nonsense"])
    with pytest.raises(ValueError, match="does not exist"):
        lb.load_rows("trec", str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="qasper"):
        lb.load_rows("qasper", str(FIX))  # folder without that config

    def offline(*a, **k):
        raise OSError("no network")
    monkeypatch.setattr(lb, "_hub_download", offline)
    with pytest.raises(ValueError, match="task.data_dir=") as e:
        list(lb.LongBench(subsets=["trec"]).samples(None))
    assert "\n" not in str(e.value)


def test_prompt_is_the_official_one_split_after_the_context(tokenizer, data_zip):
    task = lb.LongBench(subsets=ALL, data_dir=str(data_zip))
    samples = list(task.samples(tokenizer))
    assert len(samples) == sum(len(rows(n)) for n in ALL)
    for s in samples:
        row = next(r for r in rows(s.meta["subtask"]) if r["_id"] == s.meta["_id"])
        name = s.meta["dataset"]
        q = s.queries[0]
        # untruncated: context + question is exactly the official prompt, the context part ends with the document
        assert s.context + q.question == lb.DATASET2PROMPT[name].format(**row)
        assert s.context.endswith(row["context"])
        assert q.max_new_tokens == lb.DATASET2MAXLEN[name]
        assert q.answers == row["answers"] and q.answer_prefix == ""
        assert s.chat_template == (name not in {"trec", "lcc"})
        assert s.meta["length"] == row["length"] and s.meta["language"] == row["language"]
        assert s.mode == "single"
    nqa = next(s for s in samples if s.meta["dataset"] == "narrativeqa")
    assert nqa.queries[0].question.startswith("\n\nNow, answer the question based on the story asconcisely")
    assert nqa.queries[0].question.endswith("\n\nAnswer:")
    lcc = next(s for s in samples if s.meta["dataset"] == "lcc")
    assert lcc.queries[0].question == "Next line of code:\n"
    e = [s for s in samples if s.meta["subtask"] == "hotpotqa_e"]
    assert len(e) == 3 and all(s.meta["dataset"] == "hotpotqa" for s in e)


def test_num_samples_caps_each_subtask(tokenizer):
    task = lb.LongBench(subsets=["narrativeqa", "trec"], data_dir=str(FIX), num_samples=1)
    assert [s.meta["subtask"] for s in task.samples(tokenizer)] == ["narrativeqa", "trec"]


def test_middle_truncation_keeps_head_and_tail(tokenizer):
    row = rows("narrativeqa")[0]
    full = lb.DATASET2PROMPT["narrativeqa"].format(**row)
    ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    assert len(ids) > 400
    task = lb.LongBench(subsets=["narrativeqa"], data_dir=str(FIX), max_length=200, num_samples=1)
    s = next(task.samples(tokenizer))
    prompt = s.context + s.queries[0].question
    dec = lambda x: tokenizer.decode(x, skip_special_tokens=True, clean_up_tokenization_spaces=False)  # noqa: E731
    assert prompt == dec(ids[:100]) + dec(ids[-100:])          # first half + last half of the tokens
    assert prompt.startswith("You are given a story")            # instruction kept
    assert prompt.endswith(f"Question: {row['input']}\n\nAnswer:")  # question kept, whole, in `question`
    assert s.queries[0].question.endswith(f"Question: {row['input']}\n\nAnswer:")
    assert s.meta["prompt_tokens"] == 200
    assert len(tokenizer(prompt, add_special_tokens=False)["input_ids"]) == 200


def test_budget_from_model_window(tokenizer):
    # window 400: prompt budget = 400 - 128 (narrativeqa max new tokens) - 64 (chat reserve) = 208 -> 104 + 104
    task = lb.LongBench(subsets=["narrativeqa"], data_dir=str(FIX), num_samples=1)
    assert task.prompt_budget("narrativeqa", 400) == 208
    s = next(task.samples(tokenizer, max_context_tokens=400))
    assert s.meta["prompt_tokens"] == 208
    # max_length below the window wins
    assert lb.LongBench(max_length=100).prompt_budget("narrativeqa", 400) == 100


def score(task, s, pred):
    q = s.queries[0]
    return task.score(task.postprocess(pred, q, s), q, s)


def test_scoring_with_fixed_predictions(tokenizer):
    task = lb.LongBench(subsets=ALL, data_dir=str(FIX))
    by = {}
    for s in task.samples(tokenizer):
        by.setdefault(s.meta["subtask"], []).append(s)
    # qa_f1: "Under the lighthouse stairs" vs "Under the lighthouse stairs." -> identical after normalisation
    assert score(task, by["narrativeqa"][0], " Under the lighthouse stairs") == 1.0
    # trec: the cut at the first line drops "Individual" on line 2 -> only "City" named -> 1.0
    # (without the cut both classes are named -> 0.5)
    assert score(task, by["trec"][0], "City\nQuestion: Who is it?\nType: Individual") == 1.0
    assert task.score("Individual or City", by["trec"][0].queries[0], by["trec"][0]) == 0.5
    # lcc keeps indentation: exact next line -> 1.0; unindented -> ratio 2*17/42 -> 81 -> 0.81
    assert score(task, by["lcc"][0], "        return ranked[:n]\n\n    def x(self):") == 1.0
    assert score(task, by["lcc"][0], "return ranked[:n]") == 0.81
    # count: answer 3; "3" -> 1.0, "3 or 4" -> 1/2
    assert score(task, by["passage_count"][0], "3") == 1.0
    assert score(task, by["passage_count"][0], "3 or 4") == 0.5
    # Chinese qa: exact answer -> 1.0
    assert score(task, by["multifieldqa_zh"][0], "林若溪") == 1.0
    # hotpotqa: max over answers, "Dundee, Scotland" -> tokens [dundee, scotland] vs [dundee]: F1 = 2/3
    assert score(task, by["hotpotqa"][0], "Dundee, Scotland") == pytest.approx(2 / 3)
    # gov_report: the reference itself -> rouge-L F = 2/(2+1e-8)
    ref = by["gov_report"][0].queries[0].answers[0]
    assert score(task, by["gov_report"][0], ref) == pytest.approx(1.0, abs=1e-7)
    assert score(task, by["gov_report"][0], "") == 0.0


def rec(sub, score, length=None, status="ok"):
    return {"score": score, "status": status, "meta": {"subtask": sub, "length": length}}


def test_aggregate():
    records = [rec("narrativeqa", 1.0), rec("narrativeqa", 0.5), rec("hotpotqa", 0.0), rec("hotpotqa", 1.0),
               rec("trec", 1.0), rec("multifieldqa_zh", 0.4), rec("trec", 0.0, status="error"),
               rec("hotpotqa_e", 1.0, 3000), rec("hotpotqa_e", 0.0, 5000), rec("hotpotqa_e", 0.5, 9000),
               rec("hotpotqa_e", 1.0, 12000)]
    out = lb.LongBench().aggregate(records)
    assert out["score/narrativeqa"] == 0.75 and out["score/hotpotqa"] == 0.5
    assert out["score/trec"] == 1.0                    # the errored record is ignored
    assert out["score/hotpotqa_e"] == 0.625             # (1 + 0 + 0.5 + 1) / 4
    assert out["score/hotpotqa_e/0-4k"] == 1.0 and out["score/hotpotqa_e/4-8k"] == 0.0
    assert out["score/hotpotqa_e/8k+"] == 0.75          # (0.5 + 1) / 2
    assert out["score/longbench_e/8k+"] == 0.75         # one LongBench-E task
    assert out["score/avg_en"] == pytest.approx(0.75)   # (0.75 + 0.5 + 1.0) / 3, _e configs excluded
    assert out["score/avg_zh"] == pytest.approx(0.4)
    assert out["score/cat/single_doc_qa"] == pytest.approx(0.575)   # (0.75 + 0.4) / 2
    assert out["score/cat/multi_doc_qa"] == 0.5 and out["score/cat/few_shot"] == 1.0
    assert out["score/category_avg"] == pytest.approx((0.575 + 0.5 + 1.0) / 3)
    assert "score/cat/code" not in out


def test_longbench_e_bucket_edges():
    assert [lb.length_bucket(n) for n in (0, 3999, 4000, 7999, 8000)] == ["0-4k", "0-4k", "4-8k", "4-8k", "8k+"]


# ---------------------------------------------------------------- issue 18: official truncation and generation
# Facts from github.com/THUDM/LongBench at 2e00731 (LongBench/pred.py, LongBench/config/model2maxlen.json).

def test_default_max_length_is_the_official_per_model_length():
    """config/model2maxlen.json: llama2-7b-chat-4k 3500, xgen-7b-8k / internlm-7b-8k 7500,
    vicuna-v1.5-7b-16k 15500, longchat-v1.5-7b-32k / chatglm*-32k 31500 (pred.py uses it as max_length for
    every dataset). Below 4K the 500-token margin scales with the window; the cap keeps room to generate."""
    task = lb.LongBench()
    for window, official in [(4096, 3500), (8192, 7500), (16384, 15500), (32768, 31500), (131072, 127500)]:
        assert lb.official_max_length(window) == official
        for config in lb.CONFIGS:
            assert task.prompt_budget(config, window) == official, (window, config)
    assert lb.official_max_length(2048) == 1750 and task.prompt_budget("hotpotqa", 2048) == 1750
    assert task.prompt_budget("gov_report", 2048) == 2048 - 512 - lb.CHAT_RESERVE  # 512 new tokens must fit
    assert lb.LongBench(max_length=1000).prompt_budget("gov_report", 4096) == 1000
    assert task.prompt_budget("gov_report", None) is None


@pytest.fixture(scope="module")
def bos_tokenizer(tokenizer):
    """The embedded tokenizer made to add a BOS (id 0, '<|endoftext|>') like Llama's tokenizers do."""
    import copy

    from tokenizers import processors
    tok = copy.deepcopy(tokenizer)
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", pair="<|endoftext|> $A $B", special_tokens=[("<|endoftext|>", 0)])
    assert tok("hi")["input_ids"][0] == 0 and tok("hi", add_special_tokens=False)["input_ids"][0] != 0
    return tok


def pred_py_prompt(tok, prompt: str, max_length: int) -> str:
    """LongBench pred.py get_pred, written out: tokenize with the tokenizer's special tokens (truncation=False),
    and if longer than max_length keep ids[:half] and ids[-half:] (half = int(max_length/2)), each decoded with
    skip_special_tokens=True. (We decode without clean_up_tokenization_spaces, a listed difference.)"""
    ids = tok(prompt)["input_ids"]
    if len(ids) > max_length:
        half = int(max_length / 2)
        dec = lambda x: tok.decode(x, skip_special_tokens=True, clean_up_tokenization_spaces=False)  # noqa: E731
        prompt = dec(ids[:half]) + dec(ids[-half:])
    return prompt


@pytest.mark.parametrize("max_length", [200, 201, 1000])
def test_bos_is_one_of_the_head_tokens_as_in_pred_py(bos_tokenizer, tmp_path, max_length):
    row = rows("narrativeqa")[0]
    if max_length == 1000:  # a long context: the bounded (two-ends) tokenization path
        row = dict(row, context=row["context"] * 12)
    (tmp_path / "narrativeqa.jsonl").write_text(json.dumps(row) + "\n", encoding="utf-8")
    s = next(lb.LongBench(subsets=["narrativeqa"], data_dir=str(tmp_path), max_length=max_length)
             .samples(bos_tokenizer))
    full = lb.DATASET2PROMPT["narrativeqa"].format(**row)
    assert len(bos_tokenizer(full)["input_ids"]) > max_length
    assert s.context + s.queries[0].question == pred_py_prompt(bos_tokenizer, full, max_length)
    assert s.meta["prompt_tokens"] == 2 * (max_length // 2)


def test_bos_counts_against_max_length(bos_tokenizer):
    """A prompt of n text tokens is n + 1 tokens with BOS: max_length = n + 1 keeps it whole, n cuts it."""
    row = rows("trec")[0]
    full = lb.DATASET2PROMPT["trec"].format(**row)
    n = len(bos_tokenizer(full, add_special_tokens=False)["input_ids"])
    whole = next(lb.LongBench(subsets=["trec"], data_dir=str(FIX), max_length=n + 1).samples(bos_tokenizer))
    assert whole.context + whole.queries[0].question == full and whole.meta["prompt_tokens"] == n + 1
    cut = next(lb.LongBench(subsets=["trec"], data_dir=str(FIX), max_length=n).samples(bos_tokenizer))
    assert cut.context + cut.queries[0].question == pred_py_prompt(bos_tokenizer, full, n) != full


def test_samsum_generation_stops_at_a_newline(tokenizer):
    """pred.py: samsum is generated with eos_token_id=[EOS, id of "\\n"] and min_length=context_length+1 (at
    least one new token): the query asks the engine to stop at the first newline after one token; the other
    tasks generate up to their length (or EOS). eval.py's first-line cut scores the same text."""
    task = lb.LongBench(subsets=["samsum", "trec", "narrativeqa"], data_dir=str(FIX))
    got = {s.meta["dataset"]: s for s in task.samples(tokenizer)}
    q = got["samsum"].queries[0]
    assert q.meta["stop"] == ["\n"] and q.meta["min_new_tokens"] == 1
    assert q.max_new_tokens == 128 and got["samsum"].chat_template is False
    for name in ("trec", "narrativeqa"):
        assert "stop" not in got[name].queries[0].meta
    pred = "\nMia and Leo will meet for lunch at 12:30 at the noodle place.\nDialogue: Mia: Bye"
    assert task.postprocess(pred, q, got["samsum"]) == "Mia and Leo will meet for lunch at 12:30 at the noodle place."
