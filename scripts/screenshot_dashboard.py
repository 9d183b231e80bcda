#!/usr/bin/env python3
"""Screenshot a kvbench report's index.html with headless Chromium (Debian's `chromium` package).

    python scripts/screenshot_dashboard.py REPORT_DIR OUT.png [--window-size 1400,2000]

The dashboard is self-contained, so Chromium runs with networking features off and a throwaway profile.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

BINARIES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    for b in BINARIES:
        path = shutil.which(b)
        if path:
            return path
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("report_dir", type=Path)
    p.add_argument("out_png", type=Path)
    p.add_argument("--window-size", default="1400,2000")
    p.add_argument("--timeout", type=float, default=60.0)
    a = p.parse_args(argv)
    index = a.report_dir / "index.html"
    if not index.is_file():
        print(f"screenshot_dashboard: {index} does not exist (run `kvbench report` first)", file=sys.stderr)
        return 2
    exe = find_chromium()
    if exe is None:
        print("screenshot_dashboard: chromium not found (apt-get install -y chromium)", file=sys.stderr)
        return 2
    out = a.out_png.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="kvbench-chromium-") as profile:
        cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
               f"--user-data-dir={profile}", f"--screenshot={out}", f"--window-size={a.window_size}",
               index.resolve().as_uri()]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout)
        except subprocess.TimeoutExpired:
            print(f"screenshot_dashboard: chromium did not finish within {a.timeout:g} s", file=sys.stderr)
            return 1
    if proc.returncode != 0 or not out.exists():
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        print(f"screenshot_dashboard: chromium failed (exit {proc.returncode}): {last}", file=sys.stderr)
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
