"""Fill an embedding cache (uae_fast.embcache) in bounded slices, so a long encoding can run as several short jobs.

    python scripts/fill_embedding_cache.py --data D --cache DIR [--model M] [--questions N] [--max-seconds 150]

``--questions N``: only the pools of the first N questions in ``uae score``'s paper order (what
``uae calibrate-fusion --limit N`` embeds); default: every passage of D. Exit status 3: not finished yet.
"""
import argparse
import sys

from uae_fast.data import load_dataset
from uae_fast.embcache import Incomplete, encode_cached
from uae_fast.scoring import select_queries
from uae_fast.student import BiEncoder

ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
ap.add_argument("--data", required=True)
ap.add_argument("--cache", required=True)
ap.add_argument("--model", default=None)
ap.add_argument("--questions", type=int, default=None)
ap.add_argument("--max-seconds", type=float, default=150.0)
ap.add_argument("--chunk", type=int, default=512)
a = ap.parse_args()
try:
    ds = load_dataset(a.data)
    if a.questions:
        qs = [q for q in select_queries(ds, with_gold_only=False, order="paper") if ds.pool(q)][: a.questions]
        pids = sorted({p for q in qs for p in ds.pool(q)})
    else:
        pids = sorted(ds.passages)
    emb = encode_cached(BiEncoder(a.model, device="cpu"), [ds.passages[p].text for p in pids], cache_dir=a.cache,
                        model_path=a.model, max_seconds=a.max_seconds, chunk=a.chunk, progress=True)
except Incomplete as e:
    print(f"not finished: {e}", file=sys.stderr)
    sys.exit(3)
except (ValueError, OSError, EOFError) as e:
    sys.exit(f"fill_embedding_cache: error: {e}")
print(f"cache complete: {emb.shape[0]} passages", file=sys.stderr)
