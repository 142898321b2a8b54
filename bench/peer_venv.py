"""A separate virtual environment for a peer tool that heft must not depend on (pyreft, lm-eval).

Each environment lives in `$HEFT_CACHE/bench-venvs/<name>` (default `~/.cache/heft/bench-venvs`),
is built once by running a list of `pip install` steps inside it, and is marked ready only when
every step succeeded: an interrupted build is thrown away and rebuilt on the next run. The steps are
part of the marker, so changing them rebuilds the environment.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import venv
from pathlib import Path

READY = ".heft-bench-ready"


def venv_root() -> Path:
    from heft.data.assets import cache_root

    return cache_root() / "bench-venvs"


def ensure_venv(name: str, steps: list[list[str]], system_site_packages: bool = False) -> Path:
    """The python executable of venv `name`, built with `pip install <step>` for each step if needed."""
    folder = venv_root() / name
    python = folder / "bin" / "python"
    want = {"steps": steps, "system_site_packages": system_site_packages, "base_python": sys.version.split()[0]}
    marker = folder / READY
    if marker.is_file() and json.loads(marker.read_text()) == want and python.exists():
        return python
    if folder.exists():
        shutil.rmtree(folder)
    print(f"building the {name} environment in {folder} (once) ...", flush=True)
    start = time.perf_counter()
    venv.EnvBuilder(with_pip=True, system_site_packages=system_site_packages).create(folder)
    for step in steps:
        cmd = [str(python), "-m", "pip", "install", "--disable-pip-version-check", *step]
        print("  " + " ".join(cmd[1:]), flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"building the {name} environment failed at `pip install {' '.join(step)}`:\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    marker.write_text(json.dumps(want))
    print(f"  ready in {time.perf_counter() - start:.0f} s", flush=True)
    return python


def run_json(cmd: list[str], what: str, env: dict | None = None) -> dict:
    """Run a subprocess that prints one `RESULT {json}` line; its parsed JSON."""
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{what} failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if not lines:
        raise SystemExit(f"{what} printed no RESULT line:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return json.loads(lines[-1][len("RESULT "):])
