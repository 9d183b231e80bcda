"""SCBench (Li et al., 2024, "SCBench: A KV Cache-Centric Analysis of Long-Context Methods"; code:
github.com/microsoft/MInference/tree/main/scbench, data: huggingface.co/datasets/microsoft/SCBench).

One shared context, up to 5 queries, in the two official modes:
- multi_turn: turn 0 is the official first-turn prompt (instruction + context + first question); later turns are
  the official follow-up texts used inside a chat template; the engine prefills the golden previous answer
  (query.meta["golden_answer"]) as the assistant turn before each follow-up.
- multi_request ("same context, different query"): every query is appended to the same context prompt.
Prompts, max new tokens and metrics follow scbench/eval_utils.py, compute_scores.py and repo_qa_utils.py.
"""
from __future__ import annotations

import re
from pathlib import Path

from kvbench.task import Query, Sample, Task, register_task

from . import _metrics as M
from ._data import Row, check_fields, kind_of, raise_bad, read_jsonl, sample_or_failure, table_rows
from .longbench import truncate_middle

CONFIGS = ["scbench_kv", "scbench_prefix_suffix", "scbench_vt", "scbench_repoqa", "scbench_qa_eng",
           "scbench_qa_chn", "scbench_choice_eng", "scbench_many_shot", "scbench_mf", "scbench_summary",
           "scbench_summary_with_needles", "scbench_repoqa_and_kv"]
MODES = ("multi_turn", "multi_request")

# eval_utils.DATA_NAME_TO_MAX_NEW_TOKENS (per subtask for the two mixed tasks).
MAX_NEW_TOKENS = {
    "scbench_choice_eng": 40, "scbench_qa_eng": 40, "scbench_qa_chn": 40, "scbench_kv": 150, "scbench_mf": 5,
    "scbench_prefix_suffix": 150, "scbench_repoqa": 1024, "scbench_summary": 200, "scbench_vt": 30,
    "scbench_many_shot": 10,
    "scbench_summary_with_needles": {"scbench_summary": 800, "scbench_passkey": 15},
    "scbench_repoqa_and_kv": {"scbench_repoqa": 1024, "scbench_kv": 80},
}

_CHOICE_Q = "Question: {question}\nA. {OPTION_A}\nB. {OPTION_B}\nC. {OPTION_C}\nD. {OPTION_D}\n\nThe the correct answer is"
# Official first-turn prompts of multi-turn mode (multiturn_templates), typos included.
FIRST_TURN = {
    "scbench_kv": "Extract the value corresponding to the specified key in the JSON object below.\n\n{context}\n\n{input}",
    "scbench_choice_eng": "Read the book and answer the question.\n\n{context}\n\n" + _CHOICE_Q,
    "scbench_qa_eng": "Read the book and answer the question. Be very concise in your answer.\n\n{context}\n\nQuestion: {question}\nAnswer:",
    "scbench_qa_chn": "阅读以下书籍然后回答问题。\n\n{context}\n\n问题：{question}\n答案：",
    "scbench_mf": "{prefix}\n\n{context}\n\n{input}",
    "scbench_repoqa": "Based on the function description and code context, please retrieve and repeat the exact described function from the code context in a code block wrapped by ```:\n\n{context}\n\n{input}",
}
for _c in CONFIGS:
    FIRST_TURN.setdefault(_c, "{context}\n\n{input}")

# Official context prompts of multi-request mode (multiturn_templates_scdq, the part holding {context}).
REQUEST_CONTEXT = {
    "scbench_kv": "Extract the value corresponding to the specified key in the JSON object below.\n\n{context}",
    "scbench_choice_eng": "Read the book and answer the question.\n\n{context}",
    "scbench_qa_eng": "Read the book and answer the question. Be very concise in your answer.\n\n{context}",
    "scbench_qa_chn": "阅读以下书籍然后回答问题。\n\n{context}",
    "scbench_mf": "{prefix}\n\n{context}",
    "scbench_repoqa": "Based on the function description and code context, please retrieve and repeat the exact described function from the code context in a code block wrapped by ```:\n\n{context}",
}
for _c in CONFIGS:
    REQUEST_CONTEXT.setdefault(_c, "{context}")

# Official follow-up user texts inside a chat template (multiturn_follow_up_templates_in_chat_tempate); these are
# also the queries of multi-request mode.
FOLLOW_UP = {
    "scbench_choice_eng": _CHOICE_Q,
    "scbench_qa_eng": "Question: {question}\nAnswer:",
    "scbench_qa_chn": "问题：{question}\n答案：",
    "scbench_mf": "{prefix}\n\n{input}",
}
for _c in CONFIGS:
    FOLLOW_UP.setdefault(_c, "{input}")

HUB_REPO = "microsoft/SCBench"
HUB_HINT = ("pass task.data_dir=<folder with <config>.jsonl or <config>/*.parquet from "
            "https://huggingface.co/datasets/microsoft/SCBench>")


def _mf_prefix(turn_input: str) -> str:
    """scbench_mf: "The largest number of the list is" -> "What is the largest number of the list?"."""
    return f"What is {re.findall(r'The .+ is', turn_input)[0].lower()[:-3]}?"


def _fields(config: str, turn: dict) -> dict:
    f = {"input": turn["input"], "question": turn["input"]}
    if config == "scbench_choice_eng":
        f.update({f"OPTION_{k}": o for k, o in zip("ABCD", turn["options"])})
    if config == "scbench_mf":
        f["prefix"] = _mf_prefix(turn["input"])
    return f


def _labels(config: str, turn: dict) -> list[str]:
    """Reference labels of one turn, as compute_scores expects them (always a list of strings here)."""
    ans = turn["answer"]
    if config == "scbench_choice_eng":
        return [ans, "ABCD"[list(turn["options"]).index(ans)]]
    if isinstance(ans, (list, tuple)):
        return [str(a) for a in ans]
    return [str(ans)]


def _turn_task(config: str, turn: dict) -> str:
    """Subtask of a turn: the turn's `task` for the two mixed tasks, else the config."""
    return turn["task"] if isinstance(MAX_NEW_TOKENS[config], dict) else config


def _read_rows(path: Path) -> list[Row]:
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ValueError(f"reading {path} needs pyarrow: pip install pyarrow (or give .jsonl files)") from None
        return table_rows(pq.read_table(path).to_pylist(), str(path))
    return read_jsonl(path)


def _local_files(root: Path, config: str) -> list[Path]:
    if root.is_file():
        return [root]
    for cand in (root / f"{config}.jsonl", root / "data" / f"{config}.jsonl"):
        if cand.is_file():
            return [cand]
    return sorted((root / config).glob("*.parquet")) if (root / config).is_dir() else sorted(root.glob(f"{config}*.parquet"))


def load_rows(config: str, data_dir: str | None = None) -> list[dict]:
    """The rows of `read_rows` as dicts; raises DataError (file, line, what) at the first unreadable one."""
    return raise_bad(read_rows(config, data_dir))


def read_rows(config: str, data_dir: str | None = None) -> list[Row]:
    """Rows of one SCBench config, each with its file and line, from a local folder (jsonl or parquet) or,
    when online, the hub. A bad line is a Row with `error`, not an exception."""
    if data_dir is not None:
        root = Path(data_dir).expanduser()
        files = _local_files(root, config) if root.exists() else []
        if not files:
            raise ValueError(f"no {config}.jsonl or {config}/*.parquet under task.data_dir={data_dir!r}: {HUB_HINT}")
    else:
        try:
            files = [Path(p) for p in _hub_files(config)]
        except Exception as e:  # offline, no cache, hub error
            raise ValueError(f"SCBench data not found ({type(e).__name__}): {HUB_HINT}") from None
    return [row for f in files for row in _read_rows(f)]


def row_problem(config: str, row: dict) -> str | None:
    """What keeps `row` (its turns already cut to max_turns) from being a sample of `config`
    ("missing field 'multi_turns[1].answer'"), or None."""
    if "context" not in row and "input" not in row:
        return "missing field 'context'"
    err = check_fields(row, {"multi_turns": list})
    if err is None and not row["multi_turns"]:
        err = "field 'multi_turns' is empty"
    for k, turn in enumerate(row["multi_turns"] if err is None else []):
        err = _turn_problem(config, row, turn, f"multi_turns[{k}]")
        if err is not None:
            break
    return err


def _turn_problem(config: str, row: dict, t, at: str) -> str | None:
    if not isinstance(t, dict):
        return f"field '{at}' is {kind_of(t)}, expected an object"
    mixed = MAX_NEW_TOKENS[config] if isinstance(MAX_NEW_TOKENS[config], dict) else None
    need: dict = {"input": str, "answer": object}
    if mixed:
        need["task"] = str
    if config == "scbench_choice_eng":
        need["options"] = list
    err = check_fields(t, need, f"{at}.")
    if err is not None:
        return err
    if t["answer"] is None:
        return f"field '{at}.answer' is null"
    if mixed and t["task"] not in mixed:
        return f"field '{at}.task' is {t['task']!r}, expected one of {', '.join(mixed)}"
    if config == "scbench_choice_eng" and (len(t["options"]) != 4 or t["answer"] not in t["options"]):
        return f"field '{at}.options' must hold 4 options, one of them the answer"
    if _turn_task(config, t) == "scbench_repoqa":
        return check_fields(t, {"name": str}, f"{at}.") or check_fields(row, {"repo": str})
    if config == "scbench_mf" and not re.findall(r"The .+ is", t["input"]):
        return f"field '{at}.input' does not read 'The ... is'"
    return None


def _hub_files(config: str) -> list[str]:
    from huggingface_hub import HfApi, hf_hub_download
    names = HfApi().list_repo_files(HUB_REPO, repo_type="dataset")
    wanted = sorted(n for n in names if n.startswith(f"{config}/") and n.endswith(".parquet"))
    wanted = wanted or [n for n in names if n in (f"data/{config}.jsonl", f"{config}.jsonl")]
    if not wanted:
        raise FileNotFoundError(config)
    return [hf_hub_download(HUB_REPO, n, repo_type="dataset") for n in wanted]


@register_task("scbench")
class SCBench(Task):
    """SCBench, 12 configs, multi-turn or multi-request shared-context mode.

    Knobs: subsets (default all 12), mode (multi_turn | multi_request), max_turns (5, as official),
    max_length (official max_seq_length 131072; the context is middle-truncated to max_length minus the turns'
    generation budget, minus 1000 more in multi_request mode, as run_scbench.py does), data_dir.
    """
    description = "SCBench shared-context multi-turn / multi-request with official prompts and metrics"

    def __init__(self, num_samples: int | None = None, subsets: list[str] | None = None,
                 mode: str = "multi_turn", max_turns: int = 5, max_length: int | None = 131072,
                 data_dir: str | None = None, **knobs):
        super().__init__(num_samples=num_samples, **knobs)
        self.subsets = list(subsets) if subsets is not None else list(CONFIGS)
        for s in self.subsets:
            if s not in CONFIGS:
                raise ValueError(f"scbench subset {s!r} unknown; allowed: {', '.join(CONFIGS)}")
        if mode not in MODES:
            raise ValueError(f"scbench mode={mode!r}; allowed: {', '.join(MODES)}")
        if int(max_turns) < 1:
            raise ValueError(f"scbench max_turns={max_turns!r}; allowed: an integer >= 1")
        self.mode, self.max_turns, self.data_dir = mode, int(max_turns), data_dir
        self.max_length = None if max_length is None else int(max_length)
        self._needles: dict[tuple[str, str], dict[str, str]] = {}  # (config, repo) -> {function name: code}

    def samples(self, tokenizer, max_context_tokens: int | None = None):
        # max_context_tokens is the model's window; the per-turn generation room is subtracted in make_sample
        limits = [x for x in (self.max_length, max_context_tokens) if x is not None]
        limit = min(limits) if limits else None
        for config in self.subsets:
            rows = read_rows(config, self.data_dir)
            if self.num_samples is not None:
                rows = rows[: self.num_samples]
            errors = []  # per row: None, or what is wrong with it (that sample fails alone, tasks/_data.py)
            for r in rows:
                if r.data is not None and isinstance(r.data.get("multi_turns"), (list, tuple)):
                    r.data = {**r.data, "multi_turns": list(r.data["multi_turns"])[: self.max_turns]}
                errors.append(r.error if r.data is None else row_problem(config, r.data))
            self._collect_needles(config, [r.data for r, e in zip(rows, errors) if e is None])
            for i, (row, err) in enumerate(zip(rows, errors)):
                yield sample_or_failure(row, err, lambda: self.make_sample(config, i, row.data, tokenizer, limit),
                                        f"{config}/{(row.data or {}).get('id', i)}", {"subtask": config})

    def _collect_needles(self, config: str, rows: list[dict]) -> None:
        """RepoQA compares a prediction with every asked function of the same repository (needle_by_repo)."""
        for row in rows:
            for t in row["multi_turns"]:
                if _turn_task(config, t) == "scbench_repoqa":
                    self._needles.setdefault((config, row["repo"]), {})[t["name"]] = str(t["answer"])

    def make_sample(self, config: str, index: int, row: dict, tokenizer, limit: int | None) -> Sample:
        turns = row["multi_turns"]
        ctx_value = str(row["context"] if "context" in row else row["input"])  # mf contexts are int lists
        f0 = _fields(config, turns[0])
        if self.mode == "multi_turn":
            before, after = FIRST_TURN[config].split("{context}")
            before = before.format(**f0)
            questions = [after.format(**f0)] + [FOLLOW_UP[config].format(**_fields(config, t)) for t in turns[1:]]
        else:
            before = REQUEST_CONTEXT[config].split("{context}")[0].format(prefix=turns[0]["input"])
            questions = [FOLLOW_UP[config].format(**_fields(config, t)) for t in turns]
        max_new = [MAX_NEW_TOKENS[config][t["task"]] if isinstance(MAX_NEW_TOKENS[config], dict)
                   else MAX_NEW_TOKENS[config] for t in turns]
        budget = None
        if limit is not None:  # run_scbench.py: room for every turn's generation (mixed tasks: half of the sum)
            gen = (sum(MAX_NEW_TOKENS[config].values()) * len(turns) // 2 if isinstance(MAX_NEW_TOKENS[config], dict)
                   else max_new[0] * len(turns))
            budget = max(2, limit - gen - (1000 if self.mode == "multi_request" else 0))
        context, n_tokens = truncate_middle(before + ctx_value, tokenizer, budget)
        base = {"subtask": config, "id": row.get("id", index)}
        queries = []
        for k, (t, q, mx) in enumerate(zip(turns, questions, max_new)):
            meta = {**base, "turn": k, "task": _turn_task(config, t), "golden_answer": str(t["answer"])}
            if "name" in t:
                meta["name"] = t["name"]
            # multi-turn summary follow-ups start the assistant reply with "This paper" (create_multiturn_prompt)
            prefix = "This paper" if (config == "scbench_summary" and self.mode == "multi_turn" and k > 0) else ""
            queries.append(Query(question=q, answers=_labels(config, t), max_new_tokens=mx,
                                 answer_prefix=prefix, meta=meta))
        meta = {**base, "context_tokens": n_tokens}
        if "repo" in row:
            meta.update(repo=row["repo"], lang=row.get("lang"))
        return Sample(id=f"{config}/{base['id']}", context=context, queries=queries, mode=self.mode,
                      chat_template=True, meta=meta)

    def score(self, prediction: str, query: Query, sample: Sample) -> float:
        task, labels = query.meta["task"], query.answers
        pred = prediction.strip()
        if task in ("scbench_kv", "scbench_prefix_suffix"):
            return M.kv_match(pred, labels[0])
        if task == "scbench_vt":
            return M.string_match_all(pred, labels)
        if task in ("scbench_qa_eng", "scbench_many_shot"):
            return M.label_in_prediction(pred, labels)
        if task == "scbench_qa_chn":
            return M.best_of(M.char_f1_zh, pred, labels)
        if task == "scbench_choice_eng":
            return M.choice_match(pred, labels)
        if task == "scbench_mf":
            return M.first_number_match(pred, labels[0])
        if task == "scbench_summary":
            return M.rouge_lsum(pred, labels[0])
        if task == "scbench_passkey":
            return M.passkey_match(pred, labels[0])
        if task == "scbench_repoqa":
            return M.repoqa_match(pred, query.meta["name"], self._repo_needles(sample))
        raise ValueError(f"scbench task {task!r} unknown; allowed: {', '.join(CONFIGS + ['scbench_passkey'])}")

    def _repo_needles(self, sample: Sample) -> list[tuple[str, str]]:
        """All asked functions of the sample's repository: those seen by samples(), plus the sample's own."""
        needles = dict(self._needles.get((sample.meta["subtask"], sample.meta.get("repo")), {}))
        for q in sample.queries:
            if q.meta.get("task") == "scbench_repoqa":
                needles.setdefault(q.meta["name"], q.answers[0])
        return sorted(needles.items())

    def aggregate(self, records: list[dict]) -> dict[str, float]:
        """Per config: mean over all queries, per turn, and per subtask for the mixed tasks; plus the mean of
        the config means."""
        groups: dict[str, list[float]] = {}
        per_config: dict[str, list[float]] = {}
        for r in records:
            if r.get("status", "ok") != "ok":
                continue
            meta = r.get("meta", {})
            sub = meta.get("subtask")
            if sub is None:
                continue
            per_config.setdefault(sub, []).append(r["score"])
            if meta.get("turn") is not None:
                groups.setdefault(f"score/{sub}/turn{meta['turn']}", []).append(r["score"])
            if meta.get("task") not in (None, sub):
                groups.setdefault(f"score/{sub}/{meta['task']}", []).append(r["score"])
        out = {f"score/{k}": sum(v) / len(v) for k, v in sorted(per_config.items())}
        out.update({k: sum(v) / len(v) for k, v in sorted(groups.items())})
        if per_config:
            out["score/avg"] = sum(out[f"score/{k}"] for k in per_config) / len(per_config)
        return out
