"""Cut a utilities table down to another candidate policy without running the teacher again.

A table scored with ``--candidates all`` holds every (question, paragraph) utility, so the rows of any
narrower policy (``top:M``, ``student:M``) are a subset of it: the same numbers ``uae score`` would write
with that policy and the same teacher settings. The output is a normal utilities file (header + rows,
``cand``/``n_cand`` renumbered) whose header records the source table.

    python scripts/subset_utilities.py --table data/qasper-train-utilities-all.jsonl.gz \\
        --candidates student:3 --out runs/qasper-train-utilities-student3.jsonl.gz
"""
import argparse
import json
import os
import sys

from uae_fast.data import default_qasper_path, load_dataset
from uae_fast.scoring import CandidatePolicy, _finalize, _student_name, read_utilities


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--table", required=True, help="a utilities file scored with --candidates all")
    ap.add_argument("--candidates", required=True, help="top:M or student:M")
    ap.add_argument("--candidate-student", default=None, help="encoder for student:M (default all-MiniLM-L6-v2)")
    ap.add_argument("--data", default=None, help="the data the table was scored on (default: the full QASPER train split in $UAE_DATA_DIR)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)

    header, rows = read_utilities(args.table)
    if header.get("candidates") != "all":
        raise SystemExit(f"{args.table} was scored with --candidates {header.get('candidates')}, not 'all'")
    ds = load_dataset(args.data or default_qasper_path("train"))
    by_q = {}
    for r in rows:
        by_q.setdefault(r["qid"], []).append(r)
    qmap = {q.id: q for q in ds.queries}
    missing = [qid for qid in by_q if qid not in qmap]
    if missing:
        raise SystemExit(f"{len(missing)} question ids of the table are not in the data (e.g. {missing[0]})")
    policy = CandidatePolicy(ds, args.candidates, student=args.candidate_student)
    policy.prepare([qmap[qid] for qid in by_q])
    out_rows = []
    for qid, rs in by_q.items():
        keep = set(policy(qmap[qid]))
        sel = [r for r in rs if r["pid"] in keep]
        if len(sel) != len(keep):
            raise SystemExit(f"question {qid}: the table lacks {len(keep) - len(sel)} of its candidates")
        for i, r in enumerate(sel):
            out_rows.append(dict(r, cand=i, n_cand=len(sel)))
    header = dict(header, candidates=args.candidates, n_rows=len(out_rows), subset_of=os.path.basename(args.table))
    if policy.kind == "student":
        header["candidate_student"] = _student_name(args.candidate_student)
    partial = args.out + ".partial"
    with open(partial, "w", encoding="utf-8") as f:
        for rec in [header] + out_rows:
            f.write(json.dumps(rec) + "\n")
    _finalize(partial, args.out)  # atomic, gzipped for .gz, as uae score publishes
    print(f"{args.out}: {len(out_rows)} rows for {len(by_q)} questions ({args.candidates})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
