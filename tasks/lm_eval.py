"""lm-evaluation-harness generation tasks inside kvbench (EleutherAI lm-eval,
github.com/EleutherAI/lm-evaluation-harness).

Tasks are loaded through lm-eval's own TaskManager, so prompts, targets and scoring are lm-eval's:
- the prompt is lm-eval's `fewshot_context` (description, `num_fewshot` examples, `doc_to_text`, gen_prefix),
  without a chat template, as `lm_eval` builds it by default;
- answers: `doc_to_target`; max new tokens: the task's `generation_kwargs.max_gen_toks` (lm-eval's default
  256 when absent; the `max_new_tokens` knob overrides it);
- the prediction is cut at the task's stop strings (`generation_kwargs.until`), passed through the task's
  filter pipeline (`filter`: a name from the task's filter_list; default its first) and scored by the task's
  own `process_results`; the score is the `metric` entry (default: the task's first metric). lm-eval's own
  aggregation of every metric is reported in the summary's extra as `lm_eval/<task>/<metric>,<filter>`.
Split for query_aware=false: the prompt's last line (the answer cue, e.g. "\\nAnswer:") is the question fed
after compression; everything before it is the context. (query_aware=true compresses the whole prompt.)
Only `generate_until` tasks fit kvbench's generate-and-score loop; for log-likelihood tasks use
`python -m kvbench.lm_eval_bridge` (kvbench/lm_eval_bridge.py).
Offline use needs tasks whose data is local (e.g. a task YAML with `dataset_path: json` and `data_files`,
found through `include_path`).
"""
from __future__ import annotations

from kvbench.task import Query, Sample, Task, register_task

DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's HF model default when a task sets no max_gen_toks


def split_prompt(prompt: str) -> tuple[str, str]:
    """(context, question): the question is the prompt's last line (with its leading newline); a one-line
    prompt is split before its last word."""
    for sep in ("\n", " "):
        cut = prompt.rstrip(sep).rfind(sep)
        if cut > 0:
            return prompt[:cut], prompt[cut:]
    half = max(1, len(prompt) // 2)
    return prompt[:half], prompt[half:]


@register_task("lm_eval")
class LMEvalTask(Task):
    """lm-eval generation tasks. Knobs: names (lm-eval task or group names), include_path (folder(s) of
    extra task YAMLs), include_defaults (index lm-eval's built-in tasks; false is faster), num_fewshot
    (null = the task's own), fewshot_seed (lm-eval's default 1234), metric, filter, max_new_tokens."""
    description = "lm-evaluation-harness generate_until tasks, prompts and scoring by lm-eval"

    def __init__(self, num_samples: int | None = None, names: list[str] | None = None,
                 include_path: str | list[str] | None = None, include_defaults: bool = True,
                 num_fewshot: int | None = None, fewshot_seed: int = 1234, metric: str | None = None,
                 filter: str | None = None, max_new_tokens: int | None = None, **knobs):
        super().__init__(num_samples=num_samples, **knobs)
        if not names:
            raise ValueError(f"task.names={names!r}; allowed: a non-empty list of lm-eval task names")
        if max_new_tokens is not None and int(max_new_tokens) < 1:
            raise ValueError(f"task.max_new_tokens={max_new_tokens!r}; allowed: a positive integer or null")
        if num_fewshot is not None and int(num_fewshot) < 0:
            raise ValueError(f"task.num_fewshot={num_fewshot!r}; allowed: an integer >= 0 or null")
        self.names = [names] if isinstance(names, str) else list(names)
        self.include_path = include_path
        self.include_defaults = bool(include_defaults)
        self.num_fewshot = None if num_fewshot is None else int(num_fewshot)
        self.fewshot_seed = int(fewshot_seed)
        self.metric, self.filter = metric, filter
        self.max_new_tokens = None if max_new_tokens is None else int(max_new_tokens)
        self._tasks: dict | None = None
        self._docs: dict[str, tuple[str, dict]] = {}  # sample id -> (lm-eval task name, doc)

    # -- loading ------------------------------------------------------------------------------------
    def lm_eval_tasks(self) -> dict:
        if self._tasks is None:
            try:
                from lm_eval.tasks import TaskManager
            except ImportError:
                raise ValueError("task=lm_eval needs lm-eval: pip install 'kvbench[lmeval]'") from None
            tm = TaskManager(include_path=self.include_path, include_defaults=self.include_defaults)
            unknown = [n for n in self.names if n not in tm.all_tasks]
            if unknown:
                raise ValueError(f"lm-eval task {unknown[0]!r} not found; allowed: names known to lm-eval's "
                                 f"TaskManager (built-in tasks, or YAMLs under task.include_path)")
            tasks = dict(tm.load(list(self.names))["tasks"])  # groups and tags expand to their leaf tasks
            for name, t in tasks.items():
                if t.OUTPUT_TYPE != "generate_until":
                    raise ValueError(f"lm-eval task {name!r} has output_type={t.OUTPUT_TYPE!r}; allowed: "
                                     f"generate_until (score other types with python -m kvbench.lm_eval_bridge)")
                if self.num_fewshot is not None:
                    t.set_config(key="num_fewshot", value=self.num_fewshot)
                t.set_fewshot_seed(seed=self.fewshot_seed)
                self._check_choice(name, t)
            self._tasks = tasks
        return self._tasks

    def _check_choice(self, name: str, t) -> None:
        metrics = list(t.aggregation())
        if self.metric is not None and self.metric not in metrics:
            raise ValueError(f"task.metric={self.metric!r} for lm-eval task {name!r}; allowed: {', '.join(metrics)}")
        filters = [f.name for f in getattr(t, "_filters", [])]
        if self.filter is not None and self.filter not in filters:
            raise ValueError(f"task.filter={self.filter!r} for lm-eval task {name!r}; allowed: {', '.join(filters)}")

    def samples(self, tokenizer, max_context_tokens: int | None = None):
        for name, t in self.lm_eval_tasks().items():
            docs = list(t.eval_docs)
            if self.num_samples is not None:
                docs = docs[: self.num_samples]
            gen = dict(t.config.generation_kwargs or {})
            max_new = self.max_new_tokens or int(gen.get("max_gen_toks", DEFAULT_MAX_GEN_TOKS))
            n_shot = t.config.num_fewshot or 0
            for i, doc in enumerate(docs):
                prompt = t.fewshot_context(doc, n_shot, gen_prefix=t.doc_to_prefix(doc))
                context, question = split_prompt(prompt)
                target = t.doc_to_target(doc)
                answers = [str(a) for a in target] if isinstance(target, list) else [str(target)]
                sid = f"{name}/{i}"
                self._docs[sid] = (name, doc)
                meta = {"subtask": name, "doc_id": i}
                yield Sample(id=sid, context=context, queries=[Query(question=question, answers=answers,
                                                                     max_new_tokens=max_new, meta=dict(meta))],
                             chat_template=False, meta=meta)

    # -- scoring ------------------------------------------------------------------------------------
    def _filtered(self, t, doc: dict, prediction: str):
        """The task's filter pipeline on one response, as lm-eval's evaluator applies it."""
        from lm_eval.api.instance import Instance
        ensembles = list(getattr(t, "_filters", []))
        if not ensembles:
            return prediction, "none"
        ens = ensembles[0] if self.filter is None else next(f for f in ensembles if f.name == self.filter)
        inst = Instance(request_type="generate_until", doc=doc, arguments=("", {}), idx=0)
        inst.resps = [prediction]
        ens.apply([inst])
        return inst.filtered_resps[ens.name], ens.name

    def _until(self, t) -> list[str]:
        until = (t.config.generation_kwargs or {}).get("until") or []
        return [until] if isinstance(until, str) else list(until)

    def postprocess(self, prediction: str, query: Query, sample: Sample) -> str:
        """Cut at the first stop string (lm-eval's HF model does so); no stripping (filters decide)."""
        name, _ = self._docs[sample.id]
        for s in self._until(self.lm_eval_tasks()[name]):
            if s:
                prediction = prediction.split(s)[0]
        return prediction

    def metrics(self, prediction: str, sample_id: str) -> tuple[dict, str]:
        """lm-eval's process_results for a postprocessed prediction: ({metric: value}, filter name)."""
        name, doc = self._docs[sample_id]
        t = self.lm_eval_tasks()[name]
        resp, fname = self._filtered(t, doc, prediction)
        return t.process_results(doc, [resp]), fname

    def score(self, prediction: str, query: Query, sample: Sample) -> float:
        name, _ = self._docs[sample.id]
        values, _ = self.metrics(prediction, sample.id)
        metric = self.metric or next(iter(self.lm_eval_tasks()[name].aggregation()))
        return float(values[metric])

    def aggregate(self, records: list[dict]) -> dict[str, float]:
        """Mean score per task, and every metric of each task aggregated by lm-eval's own aggregation."""
        out = super().aggregate(records)
        per_task: dict[str, dict[str, list]] = {}
        fnames: dict[str, str] = {}
        for r in records:
            if r.get("status", "ok") != "ok" or r["sample_id"] not in self._docs:
                continue
            name, _ = self._docs[r["sample_id"]]
            sample = Sample(id=r["sample_id"], context="", queries=[])
            values, fnames[name] = self.metrics(self.postprocess(r["prediction"], None, sample), r["sample_id"])
            for k, v in values.items():
                per_task.setdefault(name, {}).setdefault(k, []).append(v)
        for name, by_metric in per_task.items():
            agg = self.lm_eval_tasks()[name].aggregation()
            for k, items in by_metric.items():
                if k in agg:
                    out[f"lm_eval/{name}/{k},{fnames[name]}"] = float(agg[k](items))
        return out
