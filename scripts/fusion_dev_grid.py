"""Success@1 / MRR of every fusion config on an evaluation set with gold evidence (how the default fusion
config was chosen; ``uae calibrate-fusion`` does the same without gold, judged by the teacher).

    python scripts/fusion_dev_grid.py --model M --embedding-cache DIR --json OUT.json [--data D]

Each question's pool is ranked exactly as ``uae eval --baselines hybrid`` ranks it (``HybridIndex`` over
the pool; ``uae_fast.calibration.fused_ranking`` reproduces it from the two score vectors).
"""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from uae_fast.bm25 import BM25  # noqa: E402
from uae_fast.calibration import fused_ranking, fusion_grid  # noqa: E402
from uae_fast.data import default_qasper_path, load_dataset  # noqa: E402
from uae_fast.embcache import encode_cached  # noqa: E402
from uae_fast.metrics import retrieval_metrics  # noqa: E402
from uae_fast.student import BiEncoder  # noqa: E402

ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
ap.add_argument("--data", default=None, help="evaluation data (default: QASPER dev)")
ap.add_argument("--model", default=None, help="dense encoder folder (default: the untrained student)")
ap.add_argument("--embedding-cache", default=None, help="embedding cache folder (default: none)")
ap.add_argument("--json", default=None, help="write the grid here (default: print only)")
a = ap.parse_args()
try:
    ds = load_dataset(a.data or default_qasper_path("dev"))
    enc = BiEncoder(a.model, device="cpu")
except (ValueError, OSError, EOFError) as e:
    sys.exit(f"fusion_dev_grid: error: {e}")
queries = [q for q in ds.queries if q.gold]
pools = [ds.pool(q) for q in queries]
pids = sorted({p for pool in pools for p in pool})
row = {p: i for i, p in enumerate(pids)}
emb = encode_cached(enc, [ds.passages[p].text for p in pids], cache_dir=a.embedding_cache, model_path=a.model,
                    progress=True)
qemb = enc.encode([q.question for q in queries], show_progress=True, desc="encode questions", role="query")
bm25, sides = {}, []
for q, pool, qe in zip(queries, pools, qemb):
    key = tuple(pool)
    if key not in bm25:
        bm25[key] = BM25([ds.passages[p].text for p in pool])
    sides.append(((emb[torch.tensor([row[p] for p in pool])] @ qe).double().numpy(), bm25[key].scores(q.question)))
golds = [set(q.gold) for q in queries]
grid = []
for cfg in fusion_grid():
    rankings = [[pool[i] for i in fused_ranking(d, l, cfg).tolist()] for (d, l), pool in zip(sides, pools)]
    m = retrieval_metrics(rankings, golds)
    grid.append(dict(cfg, **{k: m[k] for k in ("Success@1", "Success@5", "MRR")}))
    print(f"{cfg['method']:<7} w={cfg['weight']:<5g} S@1 {m['Success@1']:.4f}  S@5 {m['Success@5']:.4f}  MRR {m['MRR']:.4f}")
if a.json:
    os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
    with open(a.json, "w") as f:
        json.dump({"data": ds.name, "n_queries": len(queries), "model": a.model or "default student", "grid": grid}, f, indent=2)
