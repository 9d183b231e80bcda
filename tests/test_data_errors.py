"""Issue 12, defects 3 and 9, in the LongBench / SCBench loaders.

3: a malformed row names its file, line (and column, or the missing field) and fails its own sample only:
   the loader yields a placeholder the runner records as one failed record (DataError); the others run.
9: middle truncation never tokenizes a long text whole (a 20 MB line: only pieces of O(budget) characters
   reach the tokenizer), and its result equals the official tokenize-whole-then-cut.
"""
import json
import random
import re
from pathlib import Path

import pytest

from kvbench import runner
from kvbench.task import DataError
from kvbench.tasks import longbench as lb
from kvbench.tasks import scbench as sc
from kvbench.tasks._text import edge_ids

FIX = Path(__file__).parent / "fixtures"


def fixture_lines(bench: str, config: str) -> list[str]:
    return (FIX / bench / f"{config}.jsonl").read_text(encoding="utf-8").splitlines()


BAD_JSON = '{"input": "Who?", "context": oops, "answers": ["x"]}'  # "Expecting value" at the `oops`
BAD_COL = BAD_JSON.index("oops") + 1


@pytest.fixture
def lb_dir(tmp_path):
    """hotpotqa.jsonl in the official schema: line 1 good, line 2 malformed JSON, line 3 good,
    line 4 without 'answers' (one record of the fixture, one key dropped)."""
    good = [json.loads(line) for line in fixture_lines("longbench", "hotpotqa")]
    assert len(good) >= 2
    third = dict(good[0], _id="no-answers")
    del third["answers"]
    lines = [json.dumps(good[0]), BAD_JSON, json.dumps(good[1]), json.dumps(third)]
    d = tmp_path / "lb"
    d.mkdir()
    (d / "hotpotqa.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return d, good


@pytest.fixture
def sc_dir(tmp_path):
    """scbench_kv.jsonl: line 1 good, line 2 a row whose second turn lacks 'answer', line 3 malformed JSON,
    line 4 a row without turns."""
    row = json.loads(fixture_lines("scbench", "scbench_kv")[0])
    bad = json.loads(json.dumps(row))
    bad["id"] = 7
    del bad["multi_turns"][1]["answer"]
    d = tmp_path / "sc"
    d.mkdir()
    lines = [json.dumps(row), json.dumps(bad), '{"id": 8, "context": "x",', '{"id": 9, "context": "y"}']
    (d / "scbench_kv.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return d, row


def test_longbench_bad_rows_name_file_line_and_field(lb_dir, tokenizer):
    d, good = lb_dir
    path = d / "hotpotqa.jsonl"
    ss = list(lb.LongBench(subsets=["hotpotqa"], data_dir=str(d), max_length=512).samples(tokenizer))
    assert [s.error is None for s in ss] == [True, False, True, False]
    assert ss[1].error == f"{path}:2: invalid JSON at column {BAD_COL}: Expecting value"
    assert ss[3].error == f"{path}:4: missing field 'answers'"
    assert ss[3].id == "hotpotqa/no-answers" and ss[3].meta["subtask"] == "hotpotqa"
    # the good rows are whole samples, as if the bad ones were not there
    assert [s.id for s in ss if s.error is None] == [f"hotpotqa/{good[0]['_id']}", f"hotpotqa/{good[1]['_id']}"]
    assert ss[2].queries[0].answers == good[1]["answers"]
    # load_rows (every row or an error) names the first bad line
    with pytest.raises(DataError, match=f"hotpotqa.jsonl:2: invalid JSON at column {BAD_COL}"):
        lb.load_rows("hotpotqa", str(d))


def test_longbench_bad_rows_inside_data_zip(lb_dir, tokenizer):
    import zipfile
    d, _ = lb_dir
    z = d.parent / "data.zip"
    with zipfile.ZipFile(z, "w") as f:
        f.write(d / "hotpotqa.jsonl", "data/hotpotqa.jsonl")
    ss = list(lb.LongBench(subsets=["hotpotqa"], data_dir=str(z), max_length=512).samples(tokenizer))
    assert ss[1].error.startswith(f"{z}!data/hotpotqa.jsonl:2: invalid JSON at column {BAD_COL}")
    assert ss[3].error == f"{z}!data/hotpotqa.jsonl:4: missing field 'answers'"


def test_line_numbers_count_only_newlines(tmp_path, tokenizer):
    # a JSON string may hold U+2028 or a lone CR unescaped: str.splitlines() would cut the row there
    row = json.loads(fixture_lines("longbench", "trec")[0])
    row["context"] = "first\u2028second\rthird " + row["context"]
    text = json.dumps(row, ensure_ascii=False) + "\n\n" + '{"input": 1}\n'  # a blank line, then a bad row
    (tmp_path / "trec.jsonl").write_text(text, encoding="utf-8", newline="")
    ss = list(lb.LongBench(subsets=["trec"], data_dir=str(tmp_path)).samples(tokenizer))
    assert ss[0].error is None and "first\u2028second\rthird" in ss[0].context
    assert ss[1].error == f"{tmp_path / 'trec.jsonl'}:3: missing fields 'context', 'answers'"


def test_longbench_wrong_types(tmp_path, tokenizer):
    row = json.loads(fixture_lines("longbench", "trec")[0])
    rows = [dict(row, answers="a string"), dict(row, context=None), [1, 2]]
    (tmp_path / "trec.jsonl").write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    errs = [s.error.split(": ", 1)[1] for s in lb.LongBench(subsets=["trec"], data_dir=str(tmp_path)).samples(tokenizer)]
    assert errs == ["field 'answers' is a string, expected a list", "field 'context' is null, expected a string",
                    "expected a JSON object, got a list"]


def test_row_that_breaks_make_sample_fails_alone(lb_dir, tokenizer, monkeypatch):
    """A row that passes the field checks but still breaks the sample's making fails alone, with its place."""
    d, good = lb_dir
    orig = lb.LongBench.make_sample

    def make_sample(self, config, index, row, tok, limit):
        if index == 2:
            raise KeyError("length")
        return orig(self, config, index, row, tok, limit)
    monkeypatch.setattr(lb.LongBench, "make_sample", make_sample)
    ss = list(lb.LongBench(subsets=["hotpotqa"], data_dir=str(d), max_length=512).samples(tokenizer))
    assert ss[2].error == f"{d / 'hotpotqa.jsonl'}:3: cannot make a sample of this row: KeyError: 'length'"
    assert ss[2].id == f"hotpotqa/{good[1]['_id']}" and ss[0].error is None


def test_scbench_bad_rows_name_file_line_and_field(sc_dir, tokenizer):
    d, row = sc_dir
    path = d / "scbench_kv.jsonl"
    ss = list(sc.SCBench(subsets=["scbench_kv"], data_dir=str(d), max_length=2048).samples(tokenizer))
    assert [s.error is None for s in ss] == [True, False, False, False]
    assert ss[1].error == f"{path}:2: missing field 'multi_turns[1].answer'"
    assert ss[3].error == f"{path}:4: missing field 'multi_turns'" and ss[3].id == "scbench_kv/9"
    assert ss[1].id == "scbench_kv/7"
    assert ss[2].error.startswith(f"{path}:3: invalid JSON at column ")
    assert len(ss[0].queries) == len(row["multi_turns"])
    # a turn cut off by max_turns does not matter
    assert [s.error is None for s in sc.SCBench(subsets=["scbench_kv"], data_dir=str(d), max_turns=1,
                                                max_length=2048).samples(tokenizer)] == [True, True, False, False]
    with pytest.raises(DataError, match="scbench_kv.jsonl:3: invalid JSON"):
        sc.load_rows("scbench_kv", str(d))


def test_scbench_turn_checks(tmp_path, tokenizer):
    row = json.loads(fixture_lines("scbench", "scbench_choice_eng")[0])
    bad_opt = json.loads(json.dumps(row))
    bad_opt["multi_turns"][0]["options"] = bad_opt["multi_turns"][0]["options"][:3]
    no_turns = dict(row, multi_turns=[])
    (tmp_path / "scbench_choice_eng.jsonl").write_text("\n".join(json.dumps(r) for r in (row, bad_opt, no_turns)),
                                                       encoding="utf-8")
    errs = [s.error for s in sc.SCBench(subsets=["scbench_choice_eng"], data_dir=str(tmp_path)).samples(tokenizer)]
    assert errs[0] is None
    assert errs[1].endswith(":2: field 'multi_turns[0].options' must hold 4 options, one of them the answer")
    assert errs[2].endswith(":3: field 'multi_turns' is empty")


def e2e_config(tmp_path, task: dict, warmup: bool = False) -> dict:
    return {"model": {"name": "synthetic", "shape": "tiny"}, "device": "cpu", "dtype": "float32",
            "method": {"name": "snapkv", "window_size": 32, "kernel_size": 7, "pooling": "max"},
            "budget": 64, "query_aware": False, "task": task, "results_dir": str(tmp_path / "results"),
            "sweep": "data", "seed": 0, "warmup": warmup}


def run_records(cfg):
    summary = runner.execute(cfg)
    recs = [json.loads(line) for line in open(Path(summary["_dir"]) / "records.jsonl")]
    return summary, recs


def test_runner_records_bad_rows_and_runs_the_others(lb_dir, tmp_path):
    d, good = lb_dir
    path = d / "hotpotqa.jsonl"
    task = {"name": "longbench", "subsets": ["hotpotqa"], "data_dir": str(d), "max_length": 256}
    summary, recs = run_records(e2e_config(tmp_path, task, warmup=True))
    assert [r["status"] for r in recs] == ["ok", "failed", "ok", "failed"]
    bad = [r for r in recs if r["status"] == "failed"]
    assert [r["error_type"] for r in bad] == ["DataError", "DataError"]
    assert bad[0]["error"] == f"{path}:2: invalid JSON at column {BAD_COL}: Expecting value"
    assert bad[1]["error"] == f"{path}:4: missing field 'answers'" and bad[1]["sample_id"] == "hotpotqa/no-answers"
    assert bad[0]["meta"]["subtask"] == "hotpotqa"
    ok = [r for r in recs if r["status"] == "ok"]
    assert [r["sample_id"] for r in ok] == [f"hotpotqa/{g['_id']}" for g in good[:2]]
    assert all(0.0 <= r["score"] <= 1.0 and r["context_tokens"] > 64 for r in ok)
    assert summary["status"] == "partial" and summary["n"] == 2 and summary["n_failed"] == 2
    assert summary["failures"] == {"DataError": 2}
    assert summary["setup"]["warmup_sample"] == ok[0]["sample_id"]  # the warm-up never picks a bad row


def test_runner_bad_first_row_scbench(sc_dir, tmp_path):
    d, row = sc_dir
    # three bad rows first (the warm-up tries 3 samples): the warm-up and the run still go to the good one
    lines = (d / "scbench_kv.jsonl").read_text(encoding="utf-8").splitlines()
    (d / "scbench_kv.jsonl").write_text("\n".join(lines[1:] + lines[:1]) + "\n", encoding="utf-8")
    task = {"name": "scbench", "subsets": ["scbench_kv"], "mode": "multi_turn", "data_dir": str(d),
            "max_length": 1024}
    summary, recs = run_records(e2e_config(tmp_path, task, warmup=True))
    assert [(r["sample_id"], r["status"]) for r in recs] == (
        [("scbench_kv/7", "failed"), ("scbench_kv/1", "failed"), ("scbench_kv/9", "failed")]
        + [(f"scbench_kv/{row['id']}", "ok")] * len(row["multi_turns"]))
    path = d / "scbench_kv.jsonl"
    assert recs[0]["error"] == f"{path}:1: missing field 'multi_turns[1].answer'"
    assert recs[1]["error"] == f"{path}:2: invalid JSON at column 26: Expecting property name enclosed in double quotes"
    assert recs[2]["error"] == f"{path}:3: missing field 'multi_turns'"
    assert summary["setup"]["warmup_sample"] == f"scbench_kv/{row['id']}"
    assert summary["failures"] == {"DataError": 3} and summary["n_failed"] == 3


# ---------------------------------------------------------------- defect 9: bounded truncation

def mixed_text(seed: int, copies: int = 3, emoji: bool = True) -> str:
    """Every fixture context, shuffled, with pieces that tokenize oddly: long runs without a space, long
    whitespace runs, Chinese, emoji (several byte-level tokens per character), digits."""
    parts = [str(json.loads(line)["context"]) for f in sorted(FIX.glob("*/*.jsonl"))
             for line in f.read_text(encoding="utf-8").splitlines()]
    parts += ["x" * 5000, " " * 3000, "\n" * 500, "中文测试" * 800, "ab1" * 3000,
              "1234567890" * 300, "=" * 2000, "\t  \n" * 400] + ["😀" * 1000] * emoji
    rng = random.Random(seed)
    rng.shuffle(parts)
    return "".join(parts) * copies


def official(tokenizer, text, max_tokens, ids):
    """LongBench pred.py: tokenize the whole prompt (`ids`), keep the first and last max_tokens // 2 tokens."""
    if len(ids) <= max_tokens:
        return text, len(ids)
    half = max_tokens // 2
    dec = lambda x: tokenizer.decode(x, skip_special_tokens=True, clean_up_tokenization_spaces=False)  # noqa: E731
    return dec(ids[:half]) + dec(ids[-half:]), 2 * half


def test_truncation_equals_tokenizing_the_whole_text(tokenizer):
    for seed in range(3):
        text = mixed_text(seed)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert len(text) > 200_000
        for max_tokens in (2, 101, 1000, 4097, 30000, 10 ** 6):
            assert lb.truncate_middle(text, tokenizer, max_tokens) == official(tokenizer, text, max_tokens, ids), \
                (seed, max_tokens)


def test_edge_ids_exact_at_every_cut(tokenizer):
    """Tight pieces (1 character per token guessed, no floor): the cuts fall everywhere, inside words,
    runs and multi-token characters; the ids kept are always those of the whole text."""
    text = mixed_text(7, copies=1)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    rng = random.Random(1)
    for k in sorted(rng.sample(range(1, 3000), 50)):
        got = edge_ids(tokenizer, text, k, chars_per_token=1, min_chars=0)
        assert got is not None
        assert got[0] == ids[:k] and got[1] == ids[-k:], k


class WordLengthTokenizer:
    """A toy tokenizer in which a cut anywhere in a word changes every token of that word (each id carries
    the word's length), as a merge reaching far back in a long word without spaces could (SentencePiece on
    Chinese): edge_ids must never keep a token of a word that a piece cuts."""

    def __init__(self):
        self.vocab = {}

    def __call__(self, text, add_special_tokens=False):
        ids = [self.vocab.setdefault((w[i:i + 7], len(w)), len(self.vocab))
               for w in re.findall(r"\S+|\s+", text) for i in range(0, len(w), 7)]
        return {"input_ids": ids}


def test_edge_ids_never_keep_a_cut_word():
    rng = random.Random(2)
    words = ["x" * rng.choice([1, 2, 3, 8, 40, 300, 3000, 20000]) for _ in range(200)]
    text = " ".join(words)
    tok = WordLengthTokenizer()
    ids = tok(text)["input_ids"]
    checked = 0
    for k in sorted(rng.sample(range(1, len(ids) // 3), 40)):
        got = edge_ids(tok, text, k, chars_per_token=1, min_chars=0)
        if got is not None:
            checked += 1
            assert got[0] == ids[:k] and got[1] == ids[-k:], k
    assert checked > 20


class CountingTokenizer:
    """Wraps a tokenizer; records the length of every text it is asked to tokenize."""

    def __init__(self, tok):
        self.tok, self.lengths = tok, []

    def __call__(self, text, **kw):
        self.lengths.append(len(text))
        return self.tok(text, **kw)

    def decode(self, *a, **kw):
        return self.tok.decode(*a, **kw)


BIG = 20_000_000  # a 20 MB single-line context


def big_context() -> str:
    base = mixed_text(3, copies=1, emoji=False)  # 2 bytes a character in memory, not 4
    return (base * (BIG // len(base) + 1))[:BIG]


def test_20mb_longbench_line_tokenizes_bounded_pieces(tmp_path, tokenizer):
    ctx = big_context()
    row = json.loads(fixture_lines("longbench", "narrativeqa")[0])
    row["context"] = ctx
    (tmp_path / "narrativeqa.jsonl").write_text(json.dumps(row) + "\n", encoding="utf-8")
    tok = CountingTokenizer(tokenizer)
    s = next(lb.LongBench(subsets=["narrativeqa"], data_dir=str(tmp_path), max_length=4000).samples(tok))
    assert s.error is None and s.meta["prompt_tokens"] == 4000
    assert max(tok.lengths) <= 100_000 and sum(tok.lengths) <= 300_000, tok.lengths  # never the 20 MB text
    # the kept head and tail are those of the whole prompt
    prompt = lb.DATASET2PROMPT["narrativeqa"].format(context=ctx, input=row["input"])
    head = tokenizer(prompt[:50_000], add_special_tokens=False)["input_ids"][:2000]
    tail = tokenizer(prompt[-50_000:], add_special_tokens=False)["input_ids"][-2000:]
    dec = lambda x: tokenizer.decode(x, skip_special_tokens=True, clean_up_tokenization_spaces=False)  # noqa: E731
    assert s.context + s.queries[0].question == dec(head) + dec(tail)


def test_20mb_scbench_line_tokenizes_bounded_pieces(tmp_path, tokenizer):
    row = json.loads(fixture_lines("scbench", "scbench_kv")[0])
    row["context"] = big_context()
    (tmp_path / "scbench_kv.jsonl").write_text(json.dumps(row) + "\n", encoding="utf-8")
    tok = CountingTokenizer(tokenizer)
    s = next(sc.SCBench(subsets=["scbench_kv"], data_dir=str(tmp_path), max_length=8000).samples(tok))
    assert s.error is None and s.meta["context_tokens"] == 8000 - 150 * len(row["multi_turns"])
    assert max(tok.lengths) <= 150_000 and sum(tok.lengths) <= 500_000, tok.lengths
