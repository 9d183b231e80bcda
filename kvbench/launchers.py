"""hydra-submitit-launcher's launchers, with one change: a job killed from outside Python does not stop the sweep.

Hydra takes launchers only from its `hydra_plugins` namespace, so kvbench does not ship launcher classes of its
own: `install()` (called by `kvbench run` before Hydra starts) wraps the plugin's `launch` in place. It changes
the one line that reads the jobs' results; the rest of the plugin is used unchanged.

A job that is killed outside Python (SLURM's time limit, the OOM killer, `kill -9`, a node failure) leaves
submitit nothing to return. The plugin then raises out of `launch`, and Hydra stops waiting for the other
jobs, which the parent then reports as `missing`. Here each job's result is read on its own. A job that
ended without one:
- gets a `job_error.json` in its run directory: the reason, submitit's job id and the state the scheduler
  gives. `kvbench run` reports the run as failed with that reason, and the same command resumes it: its
  finished samples are kept, and the next run removes the file;
- is handed back to Hydra as completed, with the reason as its return value. The sweeper reads every
  job's return value and would re-raise a failure, which would end the sweep.
Everything else (executor, parameters, job arrays, the job function) is the plugin's own.
"""
from __future__ import annotations

from unittest import mock

from hydra.core.utils import JobReturn, JobStatus
from hydra_plugins.hydra_submitit_launcher import submitit_launcher as plugin


def _reason(job, exc: BaseException) -> str:
    """One line: the job, the scheduler's state (SLURM: TIMEOUT, OUT_OF_MEMORY, CANCELLED, NODE_FAIL, ...;
    the local executor has none worth more than FINISHED), submitit's error and the job's last log line."""
    try:
        state = job.state
    except Exception:
        state = "unknown"
    try:
        last = [l for l in (job.stderr() or "").strip().splitlines() if l.strip()][-1:]
    except Exception:
        last = []
    why = f"job {job.job_id} died without a result (scheduler state {state}; submitit: {type(exc).__name__})"
    return (why + (f"; its last log line: {last[0].strip()}" if last else ""))[:1000]


class _OneByOne:
    """A submitit job whose `results()` never raises: a job that died yields a JobReturn saying why."""

    def __init__(self, job, overrides: list[str], launcher):
        self.job, self.overrides, self.launcher = job, overrides, launcher

    def results(self):
        try:
            return self.job.results()
        except Exception as e:  # UncompletedJobError, FailedJobError: the job's process is gone
            reason = _reason(self.job, e)
            record_job_error(self.launcher, self.overrides, reason, self.job.job_id)
            ret = JobReturn(overrides=self.overrides, status=JobStatus.COMPLETED)
            ret.return_value = {"status": "failed", "error": reason}
            return [ret]


def _launch_each_on_its_own(self, job_overrides, initial_job_idx):
    import submitit
    map_array = submitit.AutoExecutor.map_array

    def each_on_its_own(executor, fn, *iterables):
        jobs = map_array(executor, fn, *iterables)
        return [_OneByOne(j, list(ov), self) for j, ov in zip(jobs, iterables[0])]

    with mock.patch.object(submitit.AutoExecutor, "map_array", each_on_its_own):
        return _PLUGIN_LAUNCH(self, job_overrides, initial_job_idx)


def record_job_error(launcher, overrides: list[str], reason: str, job_id: str) -> None:
    """Write the reason into the job's run directory (the job's config composed as the job composes it)."""
    from omegaconf import OmegaConf, open_dict
    from kvbench.runner import normalize_config, run_dir
    try:
        cfg = launcher.hydra_context.config_loader.load_sweep_config(launcher.config, list(overrides))
        with open_dict(cfg):
            del cfg["hydra"]  # as Hydra hands the job its config (its hydra.* needs the job's runtime)
        c = OmegaConf.to_container(cfg, resolve=True)
        run_dir(normalize_config(c)).write_job_error(reason, job_id, list(overrides))
    except Exception as e:  # never lose the sweep over the note itself
        print(f"[kvbench] could not record the failure of job {job_id} ({' '.join(overrides)}): {e}", flush=True)
    print(f"[kvbench] {reason} ({' '.join(overrides)}); rerun the same command to resume it", flush=True)


_PLUGIN_LAUNCH = plugin.BaseSubmititLauncher.launch


def install() -> None:
    """Make the submitit launchers (local and SLURM) read each job's result on its own. Idempotent."""
    plugin.BaseSubmititLauncher.launch = _launch_each_on_its_own
