"""Only what pyproject.toml cannot say statically: the package list.

Every data directory below conf/ (method, task, model, hydra/launcher, experiment, ...) and
kvbench/report/templates/ is listed as a package of its own, so that setuptools installs its files without a
BuildBackendWarning block per directory ("Package ... is absent from the `packages` configuration"), and a
new directory of configs is picked up without editing a list.
"""
import os

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
ROOTS = {"kvbench": "kvbench", "kvbench.methods": "methods", "kvbench.tasks": "tasks", "kvbench.conf": "conf"}


def packages(pkg: str, rel: str) -> list[str]:
    out = [pkg]
    for name in sorted(os.listdir(os.path.join(HERE, rel))):
        sub = os.path.join(rel, name)
        if (os.path.isdir(os.path.join(HERE, sub)) and name.isidentifier() and name != "__pycache__"
                and os.path.join(HERE, sub) not in {os.path.join(HERE, r) for r in ROOTS.values()}):
            out += packages(f"{pkg}.{name}", sub)
    return out


setup(packages=sorted({p for pkg, rel in ROOTS.items() for p in packages(pkg, rel)}))
