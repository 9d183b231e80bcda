"""The small interface between tasks and the engine.

A task yields `Sample`s: one context and one or more queries. The engine turns each (context, query)
into token ids (chat template, context/question split), runs prefill → compress → decode and asks the
task to score the prediction. Tasks never import methods; they only see this module.
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

MODES = ("single", "multi_request", "multi_turn")


@dataclass
class Query:
    """One question about a sample's context.

    `question` is the text that follows the context inside the same user message (for the first query);
    `answer_prefix` is put at the start of the assistant's reply (RULER's "The special magic number ... is").
    """
    question: str
    answers: list[str]
    max_new_tokens: int
    answer_prefix: str = ""
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Sample:
    """One context and its queries.

    mode: "single" (one query), "multi_request" (every query starts from the same compressed context),
    "multi_turn" (the cache carries the context, then each turn's question and golden previous answer).
    chat_template: whether the engine wraps the prompt in the model's chat template (if it has one).
    error: set on a placeholder for a row of the data that could not be read (names the file, the line and
    what is wrong); the runner records such a sample as failed (DataError) without running it.
    """
    id: str
    context: str
    queries: list[Query]
    mode: str = "single"
    chat_template: bool = True
    meta: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"Sample.mode={self.mode!r}; allowed: {', '.join(MODES)}")


class DataError(ValueError):
    """A row of a task's data is unreadable or lacks a field: that sample fails, the others run."""


class Task:
    """Base class. Subclasses set `name`, `description`, and implement `samples` and `score`.

    `__init__` receives the task's config knobs (conf/task/<name>.yaml, minus `name`) as keyword arguments.
    """
    name: str = ""
    description: str = ""

    def __init__(self, num_samples: int | None = None, **knobs: Any):
        self.num_samples = num_samples
        self.knobs = knobs

    def samples(self, tokenizer, max_context_tokens: int | None = None) -> Iterator[Sample]:
        raise NotImplementedError

    def score(self, prediction: str, query: Query, sample: Sample) -> float:
        """Score in [0, 1] for one (sample, query) (× 100 only in tables)."""
        raise NotImplementedError

    def postprocess(self, prediction: str, query: Query, sample: Sample) -> str:
        """Clean a raw generation before scoring (default: strip)."""
        return prediction.strip()

    def aggregate(self, records: list[dict]) -> dict[str, float]:
        """Extra summary numbers (per-subtask means, official averages). Default: mean per subtask."""
        out: dict[str, list[float]] = {}
        for r in records:
            if r.get("status", "ok") != "ok":
                continue
            sub = r.get("meta", {}).get("subtask")
            if sub is not None:
                out.setdefault(sub, []).append(r["score"])
        return {f"score/{k}": sum(v) / len(v) for k, v in sorted(out.items())}


TASKS: dict[str, type[Task]] = {}


def register_task(name: str) -> Callable[[type[Task]], type[Task]]:
    def deco(cls: type[Task]) -> type[Task]:
        cls.name = name
        TASKS[name] = cls
        return cls
    return deco


def load_all_tasks() -> dict[str, type[Task]]:
    import kvbench.tasks as pkg
    for m in pkgutil.iter_modules(pkg.__path__):
        if not m.name.startswith("_"):
            importlib.import_module(f"kvbench.tasks.{m.name}")
    return TASKS
