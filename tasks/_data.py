"""Reading benchmark rows together with their place in the data, and failing a bad row alone.

Every row read knows where it comes from (`Row.where`: "<file>:<line>", 1-based line of a jsonl file,
"<zip>!<member>:<line>" inside a zip, "<file>:row <n>" in a parquet file). A row that is not valid JSON,
or lacks a field the task needs, does not stop the task: in its place the task yields a placeholder sample
(`bad_sample`) whose `error` says where and what ("data/trec.jsonl:2: invalid JSON at column 27: Expecting
value", "data/trec.jsonl:3: missing field 'answers'"); the runner records it as one failed sample
(error_type "DataError") and runs the others.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Iterable

from kvbench.task import DataError, Query, Sample


@dataclass
class Row:
    """One row of a data file: `data` (a JSON object), or `error` when it could not be read."""
    where: str
    data: dict | None = None
    error: str | None = None

    def problem(self, what: str) -> str:
        """'<where>: <what>', the one-line message of a bad row."""
        return f"{self.where}: {what}"


def jsonl_rows(stream: IO[bytes], source: str) -> list[Row]:
    """The rows of a jsonl byte stream, numbered by line (lines split at "\\n" only: a JSON string may hold
    U+2028 or a lone "\\r", which str.splitlines would take for line ends). Blank lines are skipped."""
    rows = []
    for n, raw in enumerate(stream, 1):
        where = f"{source}:{n}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            rows.append(Row(where, error=f"not UTF-8 at byte {e.start + 1} of the line"))
            continue
        if not line.strip():
            continue
        try:  # without its "\n": a JSON error at the end of the line is in this line, not the next
            data = json.loads(line[:-1] if line.endswith("\n") else line)
        except json.JSONDecodeError as e:
            rows.append(Row(where, error=f"invalid JSON at column {e.colno}: {e.msg}"))
            continue
        if isinstance(data, dict):
            rows.append(Row(where, data))
        else:
            rows.append(Row(where, error=f"expected a JSON object, got {kind_of(data)}"))
    return rows


def read_jsonl(path: Path) -> list[Row]:
    with open(path, "rb") as f:
        return jsonl_rows(f, str(path))


def read_zip_jsonl(zf, member: str, zip_path: Path) -> list[Row]:
    with zf.open(member) as f:
        return jsonl_rows(f, f"{zip_path}!{member}")


def table_rows(records: Iterable[dict], source: str) -> list[Row]:
    """Rows of a table (parquet), numbered from 1."""
    return [Row(f"{source}:row {n}", dict(r)) for n, r in enumerate(records, 1)]


def kind_of(value: Any) -> str:
    """'a string', 'a list', 'null'...: a JSON value's kind, for messages."""
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null",
            int: "a number", float: "a number"}.get(type(value), type(value).__name__)


def check_fields(row: dict, fields: dict[str, type | tuple[type, ...]], prefix: str = "") -> str | None:
    """What is wrong with `row` against {field: expected type(s)}: "missing field 'answers'" (every missing
    field named), "field 'answers' is a string, expected a list"; None when it fits."""
    missing = [f"'{prefix}{k}'" for k in fields if k not in row]
    if missing:
        return f"missing field{'s' if len(missing) > 1 else ''} {', '.join(missing)}"
    for k, types in fields.items():
        if not isinstance(row[k], types):
            types = types if isinstance(types, tuple) else (types,)
            want = " or ".join(kind_of(t()) for t in types)
            return f"field '{prefix}{k}' is {kind_of(row[k])}, expected {want}"
    return None


def bad_sample(sample_id: str, error: str, meta: dict | None = None) -> Sample:
    """A placeholder for a row that could not become a sample: the runner records it as failed (DataError)
    with `error` as the message, without running the model."""
    return Sample(id=sample_id, context="", queries=[Query(question="", answers=[], max_new_tokens=0)],
                  meta=dict(meta or {}), error=error)


def sample_or_failure(row: Row, err: str | None, make, sample_id: str, meta: dict) -> Sample:
    """The sample `make()` builds from a row that passed its checks, or the failed placeholder naming what is
    wrong with it (a row that passed the checks may still break the sample's construction)."""
    if err is None:
        try:
            return make()
        except (KeyError, IndexError, TypeError, ValueError, AttributeError) as e:
            err = f"cannot make a sample of this row: {type(e).__name__}: {e}"
    return bad_sample(sample_id, row.problem(err), meta)


def raise_bad(rows: list[Row]) -> list[dict]:
    """The rows' data, for callers that want all of it: raises DataError at the first unreadable row."""
    for r in rows:
        if r.error is not None:
            raise DataError(r.problem(r.error))
    return [r.data for r in rows]
