"""Run every CPU benchmark and refresh its table in BENCHMARKS.md.

Each ``bench_*.py`` prints a markdown table (lines starting with ``|``) and writes JSON under
``benchmarks/results/``. This script runs them one after another (never in parallel: they time the
same cores), then replaces the block between ``<!-- bench:NAME -->`` and ``<!-- /bench:NAME -->`` in
BENCHMARKS.md with the table, the command, the machine, the date and the commit.

    python benchmarks/run_all.py            # the quick configurations (a few minutes)
    python benchmarks/run_all.py --full     # the issues' full shape grids (long)
    python benchmarks/run_all.py --only topk infonce
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
BENCHES = ["logprob", "infonce", "topk", "scoring"]


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        return "unknown"


def refresh(markdown: str, name: str, block: str) -> str:
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    new = f"{start}\n{block.rstrip()}\n{end}"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    if pattern.search(markdown):
        return pattern.sub(lambda _: new, markdown)
    return markdown.rstrip() + f"\n\n## {name}\n\n{new}\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="full shape grids instead of --quick")
    ap.add_argument("--only", nargs="*", choices=BENCHES, default=BENCHES)
    ap.add_argument("--md", default=os.path.join(ROOT, "BENCHMARKS.md"))
    args = ap.parse_args(argv)
    md = open(args.md).read() if os.path.exists(args.md) else "# Benchmarks\n"
    failed = []
    for name in args.only:
        script = os.path.join(HERE, f"bench_{name}.py")
        if not os.path.exists(script):
            print(f"[run_all] {script} missing, skipped")
            continue
        out_json = os.path.join(HERE, "results", f"{name}-cpu.json")
        cmd = [sys.executable, script, "--json", out_json] + ([] if args.full else ["--quick"])
        print(f"[run_all] {' '.join(cmd)}", flush=True)
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        sys.stdout.write(r.stdout)
        if r.returncode != 0:
            sys.stderr.write(r.stderr[-4000:])
            failed.append(name)
            continue
        table = "\n".join(line for line in r.stdout.splitlines() if line.startswith("|"))
        shown = "python " + " ".join(os.path.relpath(c, ROOT) if c.startswith(ROOT) else c for c in cmd[1:])
        stamp = f"`{shown}` on {machine()}, {datetime.date.today().isoformat()}, commit {commit()}"
        md = refresh(md, name, f"{stamp}\n\n{table}\n")
    with open(args.md, "w") as f:
        f.write(md)
    if failed:
        print(f"[run_all] failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
