"""What every benchmark JSON records about its run: date, commit (and whether the tree was dirty), CPU model,
cores, torch version and threads, the OpenMP wait policy and the load average when it started."""
from __future__ import annotations

import datetime
import os
import platform
import subprocess

HERE = os.path.dirname(os.path.abspath(__file__))


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def commit() -> str:
    """The short commit, or "unknown" where there is no git checkout (a copied tree on a device machine)."""
    try:
        r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE)
    except OSError:
        return "unknown"
    return r.stdout.strip() if r.returncode == 0 and r.stdout.strip() else "unknown"


def _dirty():
    """Whether tracked files differ from the commit; None when that cannot be told (no git checkout)."""
    try:
        r = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, cwd=HERE)
    except OSError:
        return None
    return bool(r.stdout.strip()) if r.returncode == 0 else None


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# The tree as the benchmark started (this module is imported first): a long run's code is that commit's,
# whatever is committed while it runs.
_START = {"started": _now(), "commit": commit(), "dirty": _dirty()}


def run_meta() -> dict:
    import torch

    return {"date": _now(), **_START,
            "cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "load_avg_1min": round(os.getloadavg()[0], 2)}
