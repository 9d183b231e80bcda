"""LongBench v1 and LongBench-E (Bai et al., 2023, "LongBench: A Bilingual, Multitask Benchmark for Long
Context Understanding"; github.com/THUDM/LongBench, data: huggingface.co/datasets/THUDM/LongBench).

Prompts (dataset2prompt), generation lengths (dataset2maxlen), middle truncation of the tokenized prompt,
the six tasks run without a chat template, the first-line cut for few-shot tasks and the per-task metrics follow
the official `pred.py` / `eval.py` / `config/*.json`. Metrics are our own implementations (tasks/_metrics.py).
"""
from __future__ import annotations

import zipfile
from pathlib import Path

from kvbench.task import Query, Sample, Task, register_task

from . import _metrics as M
from ._data import Row, check_fields, raise_bad, read_jsonl, read_zip_jsonl, sample_or_failure
from ._text import edge_ids

# Official prompt templates (LongBench config/dataset2prompt.json), reproduced exactly, typos included.
DATASET2PROMPT = {
    "narrativeqa": "You are given a story, which can be either a novel or a movie script, and a question. Answer the question asconcisely as you can, using a single phrase if possible. Do not provide any explanation.\n\nStory: {context}\n\nNow, answer the question based on the story asconcisely as you can, using a single phrase if possible. Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:",
    "qasper": "You are given a scientific article and a question. Answer the question as concisely as you can, using a single phrase or sentence if possible. If the question cannot be answered based on the information in the article, write \"unanswerable\". If the question is a yes/no question, answer \"yes\", \"no\", or \"unanswerable\". Do not provide any explanation.\n\nArticle: {context}\n\n Answer the question based on the above article as concisely as you can, using a single phrase or sentence if possible. If the question cannot be answered based on the information in the article, write \"unanswerable\". If the question is a yes/no question, answer \"yes\", \"no\", or \"unanswerable\". Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:",
    "multifieldqa_en": "Read the following text and answer briefly.\n\n{context}\n\nNow, answer the following question based on the above text, only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",
    "multifieldqa_zh": "阅读以下文字并用中文简短回答：\n\n{context}\n\n现在请基于上面的文章回答下面的问题，只告诉我答案，不要输出任何其他字词。\n\n问题：{input}\n回答：",
    "hotpotqa": "Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",
    "2wikimqa": "Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",
    "musique": "Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",
    "dureader": "请基于给定的文章回答下述问题。\n\n文章：{context}\n\n请基于上述文章回答下面的问题。\n\n问题：{input}\n回答：",
    "gov_report": "You are given a report by a government agency. Write a one-page summary of the report.\n\nReport:\n{context}\n\nNow, write a one-page summary of the report.\n\nSummary:",
    "qmsum": "You are given a meeting transcript and a query containing a question or instruction. Answer the query in one or more sentences.\n\nTranscript:\n{context}\n\nNow, answer the query based on the above meeting transcript in one or more sentences.\n\nQuery: {input}\nAnswer:",
    "multi_news": "You are given several news passages. Write a one-page summary of all news. \n\nNews:\n{context}\n\nNow, write a one-page summary of all the news.\n\nSummary:",
    "vcsum": "下面有一段会议记录，请你阅读后，写一段总结，总结会议的内容。\n会议记录：\n{context}\n\n会议总结：",
    "trec": "Please determine the type of the question below. Here are some examples of questions.\n\n{context}\n{input}",
    "triviaqa": "Answer the question based on the given passage. Only give me the answer and do not output any other words. The following are some examples.\n\n{context}\n\n{input}",
    "samsum": "Summarize the dialogue into a few short sentences. The following are some examples.\n\n{context}\n\n{input}",
    "lsht": "请判断给定新闻的类别，下面是一些例子。\n\n{context}\n{input}",
    "passage_count": "There are some paragraphs below sourced from Wikipedia. Some of them may be duplicates. Please carefully read these paragraphs and determine how many unique paragraphs there are after removing duplicates. In other words, how many non-repeating paragraphs are there in total?\n\n{context}\n\nPlease enter the final count of unique paragraphs after removing duplicates. The output format should only contain the number, such as 1, 2, 3, and so on.\n\nThe final answer is: ",
    "passage_retrieval_en": "Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine which paragraph the abstract is from.\n\n{context}\n\nThe following is an abstract.\n\n{input}\n\nPlease enter the number of the paragraph that the abstract is from. The answer format must be like \"Paragraph 1\", \"Paragraph 2\", etc.\n\nThe answer is: ",
    "passage_retrieval_zh": "以下是若干段落文字，以及其中一个段落的摘要。请确定给定的摘要出自哪一段。\n\n{context}\n\n下面是一个摘要\n\n{input}\n\n请输入摘要所属段落的编号。答案格式必须是\"段落1\"，\"段落2\"等格式\n\n答案是：",
    "lcc": "Please complete the code given below. \n{context}Next line of code:\n",
    "repobench-p": "Please complete the code given below. \n{context}{input}Next line of code:\n",
}

# Official max new tokens (config/dataset2maxlen.json).
DATASET2MAXLEN = {
    "narrativeqa": 128, "qasper": 128, "multifieldqa_en": 64, "multifieldqa_zh": 64, "hotpotqa": 32,
    "2wikimqa": 32, "musique": 32, "dureader": 128, "gov_report": 512, "qmsum": 512, "multi_news": 512,
    "vcsum": 512, "trec": 64, "triviaqa": 32, "samsum": 128, "lsht": 64, "passage_count": 32,
    "passage_retrieval_en": 32, "passage_retrieval_zh": 32, "lcc": 64, "repobench-p": 64,
}

DATASET2METRIC = {
    "narrativeqa": M.qa_f1, "qasper": M.qa_f1, "multifieldqa_en": M.qa_f1, "multifieldqa_zh": M.qa_f1_zh,
    "hotpotqa": M.qa_f1, "2wikimqa": M.qa_f1, "musique": M.qa_f1, "dureader": M.rouge_l_zh,
    "gov_report": M.rouge_l, "qmsum": M.rouge_l, "multi_news": M.rouge_l, "vcsum": M.rouge_l_zh,
    "trec": M.classification, "triviaqa": M.qa_f1, "samsum": M.rouge_l, "lsht": M.classification,
    "passage_count": M.count_score, "passage_retrieval_en": M.retrieval, "passage_retrieval_zh": M.retrieval_zh,
    "lcc": M.code_sim, "repobench-p": M.code_sim,
}

# The official paper's six categories (README "main task categories").
CATEGORIES = {
    "single_doc_qa": ["narrativeqa", "qasper", "multifieldqa_en", "multifieldqa_zh"],
    "multi_doc_qa": ["hotpotqa", "2wikimqa", "musique", "dureader"],
    "summarization": ["gov_report", "qmsum", "multi_news", "vcsum"],
    "few_shot": ["trec", "triviaqa", "samsum", "lsht"],
    "synthetic": ["passage_count", "passage_retrieval_en", "passage_retrieval_zh"],
    "code": ["lcc", "repobench-p"],
}
CHINESE = ["multifieldqa_zh", "dureader", "vcsum", "lsht", "passage_retrieval_zh"]
ENGLISH16 = [d for d in DATASET2PROMPT if d not in CHINESE]
LONGBENCH_E = ["qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "gov_report", "multi_news", "trec",
               "triviaqa", "samsum", "passage_count", "passage_retrieval_en", "lcc", "repobench-p"]
CONFIGS = list(DATASET2PROMPT) + [f"{d}_e" for d in LONGBENCH_E]

# pred.py: "chat models are better off without build prompts on these tasks".
NO_CHAT_TEMPLATE = {"trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p"}
# eval.py: for these the prediction is cut at its first line before scoring.
FIRST_LINE_ONLY = {"trec", "triviaqa", "samsum", "lsht"}
E_BUCKETS = ("0-4k", "4-8k", "8k+")
CHAT_RESERVE = 64  # tokens kept free for the chat template: a prompt never fills the window past this
# pred.py generates samsum with eos_token_id=[EOS, the id of "\n"] and min_length=context+1: it stops at the first
# newline after at least one new token ("prevent illegal output on samsum (model endlessly repeat '\nDialogue')").
STOP_AT_NEWLINE = {"samsum"}

HUB_REPO = "THUDM/LongBench"
HUB_HINT = ("pass task.data_dir=<LongBench data.zip or its unzipped folder> "
            "(get it from https://huggingface.co/datasets/THUDM/LongBench/resolve/main/data.zip)")


def base_name(config: str) -> str:
    """'hotpotqa_e' -> 'hotpotqa' (LongBench-E configs use the v1 prompt, length and metric)."""
    return config[:-2] if config.endswith("_e") else config


def length_bucket(length: int) -> str:
    """LongBench-E length interval of a record (eval.py scorer_e)."""
    return "0-4k" if length < 4000 else ("4-8k" if length < 8000 else "8k+")


def special_affixes(tokenizer) -> tuple[list[int], list[int]]:
    """The ids a tokenizer puts before and after a text when it adds its special tokens (BOS for Llama-style
    tokenizers: ([1], []); none for GPT-2-style ones: ([], []))."""
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    for i in range(len(full) - len(bare) + 1):
        if full[i:i + len(bare)] == bare:
            return list(full[:i]), list(full[i + len(bare):])
    return [], []


def truncate_middle(text: str, tokenizer, max_tokens: int | None,
                    special_tokens: bool = False) -> tuple[str, int]:
    """LongBench middle truncation: if the text has more than max_tokens tokens keep the first and the last
    max_tokens // 2 tokens and decode each half back to text. Returns (text, token count kept).

    special_tokens=True counts the tokenizer's own special tokens as the official pred.py does: it tokenizes
    the prompt with them (`tokenizer(prompt)`, BOS included for Llama-style tokenizers), compares that count
    with max_length, cuts that id list (so BOS is one of the head's max_length // 2 tokens) and decodes each
    half with skip_special_tokens=True. The engine then adds BOS (or the chat template) itself.
    special_tokens=False (SCBench) counts the text's own tokens only.
    The decode does not "clean up" spaces, so an untruncated text decodes back unchanged.
    Memory is bounded by the budget, not by the text: a long text is never tokenized whole, only its two
    ends (`edge_ids`), which give the same ids as the official tokenize-then-cut.
    """
    def dec(x):
        return tokenizer.decode(x, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    pre, suf = special_affixes(tokenizer) if special_tokens else ([], [])
    extra = len(pre) + len(suf)
    if max_tokens is not None:
        half = max_tokens // 2
        ends = edge_ids(tokenizer, text, half + 1)  # None: short enough to tokenize whole
        if ends is not None:  # at least 2 * half + 2 > max_tokens tokens: cut
            return dec((pre + ends[0])[:half]) + dec((ends[1] + suf)[len(ends[1]) + len(suf) - half:]), 2 * half
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if max_tokens is None or len(ids) + extra <= max_tokens:
        return text, len(ids) + extra
    full = pre + ids + suf
    return dec(full[:half]) + dec(full[len(full) - half:]), 2 * half


def official_max_length(window: int) -> int:
    """The official per-model prompt length (LongBench config/model2maxlen.json) for a model whose context
    window is `window` tokens: 3,500 for the 4K models (llama2-7b-chat-4k), 7,500 for 8K (xgen-7b-8k,
    internlm-7b-8k), 15,500 for 16K (vicuna-v1.5-7b-16k), 31,500 for 32K (longchat-v1.5-7b-32k,
    chatglm2/3-6b-32k): the window counted in thousands ("4k" = 4,096 tokens -> 4,000) minus 500.
    The same rule for any window of at least 4K: window * 1000 // 1024 - 500 (128K -> 127,500).
    Below 4K (no official model) the 4K model's margin shrinks in proportion, 500 * window / 4096, so that the
    rule stays continuous (2,048 -> 1,750); `LongBench.prompt_budget` then also keeps room for the generation."""
    if window >= 4096:
        return window * 1000 // 1024 - 500
    return window * 1000 // 1024 - 500 * window // 4096


def _hub_download(repo_id: str, filename: str) -> str:
    from huggingface_hub import hf_hub_download
    return hf_hub_download(repo_id=repo_id, filename=filename, repo_type="dataset")


def read_rows(config: str, data_dir: str | None = None) -> list[Row]:
    """Rows of one LongBench config, each with its file and line, from data.zip (member data/<config>.jsonl),
    an unzipped folder, or the hub. A bad line is a Row with `error`, not an exception."""
    if data_dir is None:
        try:
            path = Path(_hub_download(HUB_REPO, "data.zip"))
        except Exception as e:  # offline, no cache, hub error
            raise ValueError(f"LongBench data not found ({type(e).__name__}): {HUB_HINT}") from None
    else:
        path = Path(data_dir).expanduser()
        if not path.exists():
            raise ValueError(f"task.data_dir={data_dir!r} does not exist: {HUB_HINT}")
    if path.is_dir():
        for cand in (path / f"{config}.jsonl", path / "data" / f"{config}.jsonl"):
            if cand.is_file():
                return read_jsonl(cand)
        if (path / "data.zip").is_file():
            path = path / "data.zip"
        else:
            raise ValueError(f"no {config}.jsonl or data.zip in task.data_dir={str(path)!r}: {HUB_HINT}")
    with zipfile.ZipFile(path) as z:
        names = [n for n in z.namelist() if n == f"{config}.jsonl" or n.endswith(f"/{config}.jsonl")]
        if not names:
            raise ValueError(f"{path} has no member data/{config}.jsonl: {HUB_HINT}")
        return read_zip_jsonl(z, sorted(names, key=len)[0], path)


def load_rows(config: str, data_dir: str | None = None) -> list[dict]:
    """The rows of `read_rows` as dicts; raises DataError (file, line, what) at the first unreadable one."""
    return raise_bad(read_rows(config, data_dir))


# Fields a row needs (the official schema also has length, dataset, language, all_classes, _id: optional here).
ROW_FIELDS = {"input": str, "context": str, "answers": list}


def row_problem(row: dict) -> str | None:
    """What keeps `row` from being a sample ("missing field 'answers'"), or None."""
    err = check_fields(row, ROW_FIELDS)
    if err is None and not all(isinstance(a, str) for a in row["answers"]):
        err = "field 'answers' holds a non-string, expected a list of strings"
    return err


def _clean(prediction: str, dataset: str) -> str:
    """Official pre-scoring cleanup. Code tasks keep leading spaces (the metric compares whole lines)."""
    if dataset in FIRST_LINE_ONLY:
        return prediction.lstrip("\n").split("\n")[0].strip()
    if dataset in ("lcc", "repobench-p"):
        return prediction
    return prediction.strip()


def _mean(xs):
    return sum(xs) / len(xs)


@register_task("longbench")
class LongBench(Task):
    """LongBench v1 (21 configs) and LongBench-E (`<name>_e`, 13 configs), one query per sample.

    Knobs: subsets (config names; default the 16 English tasks), data_dir (data.zip or folder; default: hub
    download), max_length (prompt budget in tokens for middle truncation, BOS included as pred.py counts it;
    default: the official per-model length for the model's window, `official_max_length`). Either way the
    prompt is capped at the window minus the task's generation length and a chat-template reserve.
    """
    description = "LongBench v1 / LongBench-E with official prompts, truncation and metrics"
    # bump when prompts, truncation or generation settings change (part of the run hash)
    data_version = "longbench-2: model2maxlen default, BOS counted in max_length, samsum stops at a newline"

    def __init__(self, num_samples: int | None = None, subsets: list[str] | None = None,
                 data_dir: str | None = None, max_length: int | None = None, **knobs):
        super().__init__(num_samples=num_samples, **knobs)
        self.subsets = list(subsets) if subsets is not None else list(ENGLISH16)
        for s in self.subsets:
            if s not in CONFIGS:
                raise ValueError(f"longbench subset {s!r} unknown; allowed: {', '.join(CONFIGS)}")
        if max_length is not None and int(max_length) < 2:
            raise ValueError(f"longbench max_length={max_length!r}; allowed: an integer >= 2 or null")
        self.data_dir = data_dir
        self.max_length = None if max_length is None else int(max_length)

    def samples(self, tokenizer, max_context_tokens: int | None = None):
        for config in self.subsets:
            limit = self.prompt_budget(config, max_context_tokens)
            rows = read_rows(config, self.data_dir)
            if self.num_samples is not None:
                rows = rows[: self.num_samples]
            for i, row in enumerate(rows):  # a bad row fails its own sample only (tasks/_data.py)
                err = row.error if row.data is None else row_problem(row.data)
                yield sample_or_failure(row, err, lambda: self.make_sample(config, i, row.data, tokenizer, limit),
                                        f"{config}/{(row.data or {}).get('_id', i)}",
                                        {"subtask": config, "dataset": base_name(config)})

    def prompt_budget(self, config: str, max_context_tokens: int | None) -> int | None:
        """Tokens allowed for the prompt (BOS included, chat template not: pred.py builds the chat prompt after
        truncating): max_length, or by default the official length for the window (`official_max_length`:
        3,500 at 4K, 7,500 at 8K, 31,500 at 32K); never more than the window minus this task's generation
        length and CHAT_RESERVE. For the default that cap binds only below 4K windows, for the tasks that
        generate 512 tokens (at 4K and above the official margin leaves room for them and a template)."""
        limits = [] if self.max_length is None else [self.max_length]
        if max_context_tokens is not None:
            if self.max_length is None:
                limits.append(official_max_length(max_context_tokens))
            limits.append(max_context_tokens - DATASET2MAXLEN[base_name(config)] - CHAT_RESERVE)
        return max(2, min(limits)) if limits else None

    def make_sample(self, config: str, index: int, row: dict, tokenizer, limit: int | None) -> Sample:
        """One official prompt, truncated in the middle, split into context (up to the long context) and question."""
        name = base_name(config)
        before, after = DATASET2PROMPT[name].split("{context}")
        question = after.format(input=row["input"])
        prompt, n_tokens = truncate_middle(before + row["context"] + question, tokenizer, limit, special_tokens=True)
        if prompt.endswith(question):
            context = prompt[: len(prompt) - len(question)]
        else:  # the question itself was longer than half the budget and got cut: keep the text whole
            context, question = prompt, ""
        meta = {"subtask": config, "dataset": name, "length": row.get("length"),
                "language": row.get("language"), "_id": row.get("_id")}
        qmeta = dict(meta)
        if name in STOP_AT_NEWLINE:  # for the engine: stop at "\n" once one token is out (pred.py's samsum)
            qmeta.update(stop=["\n"], min_new_tokens=1)
        query = Query(question=question, answers=list(row["answers"]), max_new_tokens=DATASET2MAXLEN[name],
                      meta=qmeta)
        return Sample(id=f"{config}/{row.get('_id', index)}", context=context, queries=[query],
                      chat_template=name not in NO_CHAT_TEMPLATE,
                      meta={**meta, "prompt_tokens": n_tokens, "all_classes": row.get("all_classes") or []})

    def postprocess(self, prediction: str, query: Query, sample: Sample) -> str:
        return _clean(prediction, sample.meta["dataset"])

    def score(self, prediction: str, query: Query, sample: Sample) -> float:
        name = sample.meta["dataset"]
        pred = _clean(prediction, name)  # idempotent: safe whether or not postprocess ran first
        return M.best_of(DATASET2METRIC[name], pred, query.answers, all_classes=sample.meta.get("all_classes") or [])

    def aggregate(self, records: list[dict]) -> dict[str, float]:
        """Per-config means; LongBench-E length buckets; English / Chinese task means; the six category means
        and their average (over the v1 configs present)."""
        per: dict[str, list[float]] = {}
        buckets: dict[str, dict[str, list[float]]] = {}
        for r in records:
            if r.get("status", "ok") != "ok":
                continue
            meta = r.get("meta", {})
            sub = meta.get("subtask")
            if sub is None:
                continue
            per.setdefault(sub, []).append(r["score"])
            if sub.endswith("_e") and meta.get("length") is not None:
                buckets.setdefault(sub, {}).setdefault(length_bucket(meta["length"]), []).append(r["score"])
        out = {f"score/{k}": _mean(v) for k, v in sorted(per.items())}
        task_mean = {k: _mean(v) for k, v in per.items()}
        for sub, b in sorted(buckets.items()):
            for name in E_BUCKETS:
                if name in b:
                    out[f"score/{sub}/{name}"] = _mean(b[name])
        for name in E_BUCKETS:  # LongBench-E overall per interval: mean of the task means in that interval
            vals = [_mean(b[name]) for b in buckets.values() if name in b]
            if vals:
                out[f"score/longbench_e/{name}"] = _mean(vals)
        v1 = {k: v for k, v in task_mean.items() if not k.endswith("_e")}
        en = [v1[d] for d in ENGLISH16 if d in v1]
        zh = [v1[d] for d in CHINESE if d in v1]
        if en:
            out["score/avg_en"] = _mean(en)  # the usual "16 English tasks" average when all 16 ran
        if zh:
            out["score/avg_zh"] = _mean(zh)
        cats = {}
        for cat, names in CATEGORIES.items():
            vals = [v1[d] for d in names if d in v1]
            if vals:
                cats[cat] = out[f"score/cat/{cat}"] = _mean(vals)
        if cats:
            out["score/category_avg"] = _mean(list(cats.values()))
        return out
