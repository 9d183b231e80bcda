"""CI regression gate: rerun the committed baseline sweep on the embedded model and compare.

results/baselines/niah_smollm2_ci was produced by (see its config.yaml files):
  kvbench run -m method=full,snapkv,streaming_llm,h2o,pyramidkv budget=128 task.lengths=[1000] \
      task.depths=[10,90] task.max_new_tokens=24 query_aware=true results_dir=results/baselines sweep=niah_smollm2_ci
A change that silently breaks a method (score drop beyond 5 points, more KV bytes or decode FLOPs) fails here.
"""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BASE = ROOT / "results" / "baselines" / "niah_smollm2_ci"


def test_embedded_model_matches_committed_baseline(tmp_path):
    runs = sorted(BASE.glob("*/summary.json"))
    assert len(runs) == 5, "the committed baseline sweep is missing"
    cmd = [sys.executable, "-m", "kvbench.cli", "run", "-m", "method=full,snapkv,streaming_llm,h2o,pyramidkv",
           "budget=128", "task.lengths=[1000]", "task.depths=[10,90]", "task.max_new_tokens=24",
           "query_aware=true", f"results_dir={tmp_path}", "sweep=niah_smollm2_ci"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-2000:]
    cmp = subprocess.run([sys.executable, "-m", "kvbench.cli", "compare", str(BASE), str(tmp_path / "niah_smollm2_ci"),
                          "--tolerance", "5"], capture_output=True, text=True, timeout=300)
    assert cmp.returncode == 0, cmp.stdout[-3000:] + cmp.stderr[-2000:]
    # the same config hashes: the run identity is stable across machines and code changes that don't matter
    assert sorted(p.parent.name for p in (tmp_path / "niah_smollm2_ci").glob("*/summary.json")) == \
        sorted(p.parent.name for p in runs)
