"""SCBench task: loading, official first-turn / follow-up prompts in both modes, truncation, scoring, aggregation."""
import json
from pathlib import Path

import pytest

from kvbench.task import TASKS, load_all_tasks
from kvbench.tasks import scbench as sc

FIX = Path(__file__).parent / "fixtures" / "scbench"
HAVE = ["scbench_kv", "scbench_qa_eng", "scbench_choice_eng", "scbench_repoqa", "scbench_summary", "scbench_qa_chn"]


def rows(name):
    return [json.loads(line) for line in (FIX / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()]


def samples(tokenizer, subsets, mode="multi_turn", **kw):
    return list(sc.SCBench(subsets=subsets, mode=mode, data_dir=str(FIX), **kw).samples(tokenizer))


def test_registered_and_bad_inputs(tmp_path, monkeypatch):
    load_all_tasks()
    assert TASKS["scbench"] is sc.SCBench
    with pytest.raises(ValueError, match="multi_query"):
        sc.SCBench(mode="multi_query")
    with pytest.raises(ValueError, match="scbench_nope"):
        sc.SCBench(subsets=["scbench_nope"])
    with pytest.raises(ValueError, match="scbench_vt"):
        sc.load_rows("scbench_vt", str(FIX))  # no fixture for it

    def offline(config):
        raise OSError("no network")
    monkeypatch.setattr(sc, "_hub_files", offline)
    with pytest.raises(ValueError, match="task.data_dir=") as e:
        sc.load_rows("scbench_kv")
    assert "\n" not in str(e.value)


def test_fixtures_follow_official_schema():
    for name in HAVE:
        for r in rows(name):
            assert {"id", "context", "multi_turns"} <= set(r)
            assert all({"input", "answer"} <= set(t) for t in r["multi_turns"])
    assert all(len(t["options"]) == 4 for r in rows("scbench_choice_eng") for t in r["multi_turns"])
    assert all({"repo", "lang"} <= set(r) and all("name" in t for t in r["multi_turns"]) for r in rows("scbench_repoqa"))


def test_multi_turn_prompts(tokenizer):
    s = samples(tokenizer, ["scbench_qa_eng"])[0]
    row = rows("scbench_qa_eng")[0]
    t = row["multi_turns"]
    assert s.mode == "multi_turn" and s.chat_template
    # turn 0: official first-turn prompt = context part + question part
    first = ("Read the book and answer the question. Be very concise in your answer.\n\n" + row["context"]
             + f"\n\nQuestion: {t[0]['input']}\nAnswer:")
    assert s.context + s.queries[0].question == first
    assert s.context.endswith(row["context"])
    # later turns: the follow-up user text used inside the chat template (no previous answer in it)
    assert s.queries[1].question == f"Question: {t[1]['input']}\nAnswer:"
    assert [q.answers for q in s.queries] == [[x["answer"]] for x in t]
    assert [q.meta["golden_answer"] for q in s.queries] == [x["answer"] for x in t]
    assert [q.meta["turn"] for q in s.queries] == [0, 1, 2]
    assert all(q.max_new_tokens == 40 for q in s.queries)


def test_multi_request_prompts(tokenizer):
    s = samples(tokenizer, ["scbench_kv"], mode="multi_request")[0]
    row = rows("scbench_kv")[0]
    assert s.mode == "multi_request"
    assert s.context == ("Extract the value corresponding to the specified key in the JSON object below.\n\n"
                         + row["context"])
    assert [q.question for q in s.queries] == [t["input"] for t in row["multi_turns"]]
    assert all(q.max_new_tokens == 150 for q in s.queries)
    # multi-turn mode: the first question follows the context after a blank line, later ones are the bare input
    m = samples(tokenizer, ["scbench_kv"])[0]
    assert m.context == s.context
    assert m.queries[0].question == "\n\n" + row["multi_turns"][0]["input"]
    assert m.queries[1].question == row["multi_turns"][1]["input"]


def test_choice_prompt_and_labels(tokenizer):
    s = samples(tokenizer, ["scbench_choice_eng"], mode="multi_request")[0]
    t = rows("scbench_choice_eng")[0]["multi_turns"][1]
    assert s.queries[1].question == (f"Question: {t['input']}\nA. Two days\nB. One week\nC. Three weeks\n"
                                     "D. They arrived on time\n\nThe the correct answer is")
    assert s.queries[1].answers == ["Three weeks", "C"]   # option text first: the golden answer


def test_summary_follow_ups_start_with_this_paper(tokenizer):
    mt = samples(tokenizer, ["scbench_summary"])[0]
    assert [q.answer_prefix for q in mt.queries] == ["", "This paper"]
    assert mt.queries[0].question == "\n\n" + rows("scbench_summary")[0]["multi_turns"][0]["input"]
    mr = samples(tokenizer, ["scbench_summary"], mode="multi_request")[0]
    assert [q.answer_prefix for q in mr.queries] == ["", ""]
    assert mr.context == rows("scbench_summary")[0]["context"]
    assert all(q.max_new_tokens == 200 for q in mr.queries)


def test_max_turns_and_num_samples(tokenizer):
    ss = samples(tokenizer, ["scbench_qa_eng", "scbench_kv"], max_turns=2, num_samples=1)
    assert [s.id for s in ss] == ["scbench_qa_eng/0", "scbench_kv/0"]
    assert all(len(s.queries) == 2 for s in ss)


def test_mf_prefix_and_int_context(tokenizer):
    # scbench_mf rows hold a list of ints as context and int answers (official schema)
    row = {"id": 3, "context": [5, 98, 12], "multi_turns": [
        {"input": "The largest number of the list is", "answer": 98},
        {"input": "The smallest number of the list is", "answer": 5}]}
    task = sc.SCBench(subsets=["scbench_mf"])
    s = task.make_sample("scbench_mf", 0, row, tokenizer, None)
    assert s.context == "What is the largest number of the list?\n\n[5, 98, 12]"
    assert s.queries[0].question == "\n\nThe largest number of the list is"
    assert s.queries[1].question == "What is the smallest number of the list?\n\nThe smallest number of the list is"
    assert s.queries[1].answers == ["5"] and s.queries[0].max_new_tokens == 5
    assert task.score("98", s.queries[0], s) == 1.0 and task.score("12", s.queries[1], s) == 0.0
    r = sc.SCBench(subsets=["scbench_mf"], mode="multi_request").make_sample("scbench_mf", 0, row, tokenizer, None)
    assert r.context == "The largest number of the list is\n\n[5, 98, 12]"   # multi-request: first input as prefix


def test_truncation_leaves_room_for_every_turn(tokenizer):
    row = rows("scbench_kv")[0]
    before = "Extract the value corresponding to the specified key in the JSON object below.\n\n"
    ids = tokenizer(before + row["context"], add_special_tokens=False)["input_ids"]
    # max_length 650, 3 turns x 150 new tokens -> 200 context tokens: first 100 + last 100
    s = samples(tokenizer, ["scbench_kv"], max_length=650, num_samples=1)[0]
    dec = lambda x: tokenizer.decode(x, skip_special_tokens=True, clean_up_tokenization_spaces=False)  # noqa: E731
    assert len(ids) > 650
    assert s.context == dec(ids[:100]) + dec(ids[-100:])
    assert s.meta["context_tokens"] == 200
    # multi-request also keeps 1000 tokens spare (run_scbench.py): 1650 - 450 - 1000 = 200
    r = samples(tokenizer, ["scbench_kv"], mode="multi_request", max_length=1650, num_samples=1)[0]
    assert r.context == s.context


def score(task, s, k, pred):
    q = s.queries[k]
    return task.score(task.postprocess(pred, q, s), q, s)


def test_scoring_with_fixed_predictions(tokenizer):
    task = sc.SCBench(subsets=HAVE, data_dir=str(FIX))
    by = {}
    for s in task.samples(tokenizer):
        by.setdefault(s.meta["subtask"], []).append(s)
    kv = by["scbench_kv"][0]
    assert score(task, kv, 0, f"The value is {kv.queries[0].answers[0]}.") == 1.0
    assert score(task, kv, 0, "I don't know") == 0.0
    qa = by["scbench_qa_eng"][0]
    assert score(task, qa, 0, "It was the albatross.") == 1.0      # label found, case-insensitive
    assert score(task, qa, 1, "Ada Reyes") == 0.0
    ch = by["scbench_choice_eng"][0]
    assert score(task, ch, 1, "C") == 1.0 and score(task, ch, 1, "Three weeks") == 1.0
    assert score(task, ch, 1, "B. One week") == 0.0
    zh = by["scbench_qa_chn"][0]
    assert score(task, zh, 1, "城里教书") == pytest.approx(8 / 9)     # 4 of 5 gold chars, precision 1
    sm = by["scbench_summary"][0]
    assert score(task, sm, 0, sm.queries[0].answers[0]) == 1.0
    assert score(task, sm, 0, "") == 0.0
    rq = by["scbench_repoqa"][0]
    names = [q.meta["name"] for q in rq.queries]
    code = {q.meta["name"]: q.answers[0] for q in rq.queries}
    asked = names[0]
    assert score(task, rq, 0, f"Here is the function:\n```python\n{code[asked]}\n```") == 1.0
    assert score(task, rq, 0, f"```python\n{code[names[1]]}\n```") == 0.0   # another function of the repo
    # the second row of the same repo asks "chunked" first; its needles include the first row's functions
    rq2 = by["scbench_repoqa"][1]
    assert sorted(n for n, _ in task._repo_needles(rq2)) == ["chunked", "merge_configs", "parse_version"]


def test_aggregate_per_turn_and_subtask():
    def rec(sub, turn, score, task=None):
        return {"score": score, "meta": {"subtask": sub, "turn": turn, "task": task or sub}}
    records = [rec("scbench_kv", 0, 1.0), rec("scbench_kv", 1, 0.0), rec("scbench_kv", 0, 0.0),
               rec("scbench_repoqa_and_kv", 0, 1.0, "scbench_repoqa"), rec("scbench_repoqa_and_kv", 1, 0.0, "scbench_kv"),
               rec("scbench_repoqa_and_kv", 2, 1.0, "scbench_kv"), {"score": None, "status": "error", "meta": {}}]
    out = sc.SCBench().aggregate(records)
    assert out["score/scbench_kv"] == pytest.approx(1 / 3)
    assert out["score/scbench_kv/turn0"] == 0.5 and out["score/scbench_kv/turn1"] == 0.0
    assert out["score/scbench_repoqa_and_kv/scbench_kv"] == 0.5
    assert out["score/scbench_repoqa_and_kv/scbench_repoqa"] == 1.0
    assert out["score/scbench_repoqa_and_kv"] == pytest.approx(2 / 3)
    assert out["score/avg"] == pytest.approx((1 / 3 + 2 / 3) / 2)
