"""How much the teacher's prompt tokenisation moves the utilities: the passage encoded apart from its
``Context: `` prefix (what ``UtilityScorer`` does, and every shipped table: a lone space token before the
passage) against the passage joined to it (``Context: We`` -> ``['Context', ':', 'ĠWe']``).

    python scripts/check_prompt_join.py --questions 60 --json benchmarks/results/prompt-join-check.json

Scores a random sample of QASPER train questions on their ``top:3`` candidates (+ gold) both ways with the
default teacher (fp32) and reports top-1 agreement, the mean per-question Spearman correlation, how often each
top-1 is a gold paragraph, and the utilities' mean (absolute) difference. ~2 min for 60 questions on 2 cores.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from uae_fast.data import default_qasper_path, load_dataset  # noqa: E402
from uae_fast.scoring import CandidatePolicy  # noqa: E402
from uae_fast.teacher import UtilityScorer  # noqa: E402


class JoinedPrompt(UtilityScorer):
    """The with-passage prompt with the prefix's trailing space joined to the passage's first word."""

    def _prompt(self, question, passage=None):
        if passage is None:
            return super()._prompt(question, None)
        before, after = self.prompt_with.split("{passage}")
        lead = before[len(before.rstrip(" ")):]
        p = self._encode(lead + passage.strip())
        cut = len(p) > self.max_passage_tokens
        head = self._bos() + self._encode(before[:len(before) - len(lead)].format(question=question)) + p[: self.max_passage_tokens]
        ids = head + self._encode(after.format(question=question))
        return ids, cut, (len(head) if "{question}" not in before else len(ids))


def _spearman(x, y) -> float:
    rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
    return float(np.corrcoef(rx, ry)[0, 1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=None, help="QASPER train (default: the full split)")
    ap.add_argument("--questions", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    ds = load_dataset(args.data or default_qasper_path("train"))
    qs = [q for q in ds.queries if q.gold and q.answers]
    rng = np.random.default_rng(args.seed)
    qs = [qs[i] for i in sorted(rng.choice(len(qs), min(args.questions, len(qs)), replace=False))]
    pol = CandidatePolicy(ds, "top:3")
    pol.prepare(qs)
    cands = [pol(q) for q in qs]
    items = [(q.question, list(q.answers), [ds.passages[p].text for p in c]) for q, c in zip(qs, cands)]
    split = UtilityScorer.from_pretrained(dtype=torch.float32)
    res, secs = {}, {}
    for name, sc in (("split", split), ("joined", JoinedPrompt(split.model, split.tokenizer))):
        t = time.perf_counter()
        res[name] = [np.asarray(r.utility, dtype=np.float64) for r in sc.score_many(items)]
        secs[name] = round(time.perf_counter() - t, 1)
    a, b = res["split"], res["joined"]
    diff = np.concatenate([x - y for x, y in zip(a, b)])
    out = dict(
        n_questions=len(qs), n_rows=int(diff.size), seconds=secs,
        top1_agreement=float(np.mean([np.argmax(x) == np.argmax(y) for x, y in zip(a, b)])),
        mean_spearman=float(np.mean([_spearman(x, y) for x, y in zip(a, b) if len(x) > 2])),
        gold_top1={n: float(np.mean([c[int(np.argmax(u))] in q.gold for q, c, u in zip(qs, cands, res[n])])) for n in res},
        mean_abs_diff=float(np.abs(diff).mean()), mean_diff=float(diff.mean()),
        mean_abs_utility=float(np.abs(np.concatenate(a)).mean()))
    print(json.dumps(out, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
