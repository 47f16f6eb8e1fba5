"""Split a QASPER or SQuAD JSON file by document into a train file and a held-out file (deterministic).

    python scripts/split_documents.py CORPUS.json --train TRAIN.json --heldout TEST.json [--heldout-fraction 0.5]

Every document (a QASPER paper, a SQuAD article) goes whole to one side, so held-out questions are asked about
documents the trainer never saw. The side is fixed by a hash of the document's key (QASPER: paper id; SQuAD:
``title``, else the first paragraph's ``document_id``, else its position) and ``--seed``, so reruns give
the same split and adding documents does not move the old ones. Both outputs keep the input schema, so
``uae score/train/eval --data`` read them as they read the input.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from uae_fast.data import read_text, write_json  # noqa: E402


def _side(key: str, seed: int, fraction: float) -> bool:
    """True for held-out: the key's hash, as a number in [0, 1), below the fraction."""
    h = hashlib.sha1(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2.0 ** 64 < fraction


def _article_key(art: dict, n: int) -> str:
    if str(art.get("title") or "").strip():
        return str(art["title"]).strip()
    paras = art.get("paragraphs") or []
    if paras and isinstance(paras[0], dict) and paras[0].get("document_id") is not None:
        return str(paras[0]["document_id"])
    return f"article{n}"


def split(raw, *, fraction: float, seed: int):
    """(train, heldout) in the input's schema."""
    if isinstance(raw, dict) and isinstance(raw.get("data"), list):  # SQuAD
        train, held = [], []
        for n, art in enumerate(raw["data"]):
            (held if _side(_article_key(art, n), seed, fraction) else train).append(art)
        rest = {k: v for k, v in raw.items() if k != "data"}
        return {**rest, "data": train}, {**rest, "data": held}
    if isinstance(raw, dict):  # QASPER: paper id -> paper
        train, held = {}, {}
        for pid, paper in raw.items():
            (held if _side(str(pid), seed, fraction) else train)[pid] = paper
        return train, held
    raise ValueError("input must be QASPER (paper ids -> papers) or SQuAD ({\"data\": [articles]}) JSON")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("corpus", help="QASPER or SQuAD .json(.gz)")
    ap.add_argument("--train", required=True, help="output: the training documents (.json or .json.gz)")
    ap.add_argument("--heldout", required=True, help="output: the held-out documents")
    ap.add_argument("--heldout-fraction", type=float, default=0.5, help="share of documents held out (default 0.5)")
    ap.add_argument("--seed", type=int, default=0, help="hash seed: another seed, another split (default 0)")
    args = ap.parse_args(argv)
    if not 0.0 < args.heldout_fraction < 1.0:
        ap.error(f"--heldout-fraction must be in (0, 1), got {args.heldout_fraction}")
    try:
        raw = json.loads(read_text(args.corpus, "corpus"))
        train, held = split(raw, fraction=args.heldout_fraction, seed=args.seed)
    except (ValueError, OSError) as e:
        print(f"split_documents: {args.corpus}: {e}", file=sys.stderr)
        return 2
    n = lambda d: len(d["data"]) if "data" in d and isinstance(d["data"], list) else len(d)  # noqa: E731
    if not n(train) or not n(held):
        print(f"split_documents: one side is empty ({n(train)} train, {n(held)} held-out documents); "
              "change --heldout-fraction or --seed", file=sys.stderr)
        return 2
    write_json(train, args.train)
    write_json(held, args.heldout)
    print(f"{n(train)} train documents -> {args.train}; {n(held)} held-out documents -> {args.heldout}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
