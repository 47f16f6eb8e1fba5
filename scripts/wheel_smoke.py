"""Smoke test of an installed uae_fast (run by scripts/check_wheel.sh in a fresh venv, outside the checkout).

Checks that the package, its C++ extension and its data come from the environment ($VENV), not a source
tree; that TopKIndex and utility_infonce compute the right numbers (float64 / brute-force references);
and that the extension shares torch's OpenMP runtime (one libgomp in the process).
"""
import os
import sys

import numpy as np
import torch

import uae_fast
from uae_fast import TopKIndex, utility_infonce
from uae_fast.data import QUICKSTART_SLICE, load_dataset, shipped_file
from uae_fast.training import _default_utilities

venv = os.path.realpath(os.environ["VENV"])


def inside_venv(path: str) -> bool:
    return os.path.realpath(path).startswith(venv + os.sep)


assert inside_venv(uae_fast.__file__), f"uae_fast imported from {uae_fast.__file__}, not from {venv}"
from uae_fast import _topk  # noqa: E402

assert inside_venv(_topk.__file__), _topk.__file__

# TopKIndex: exact inner-product top-k equals a brute-force ranking
rng = np.random.default_rng(0)
x = rng.standard_normal((1000, 48)).astype(np.float32)
q = rng.standard_normal((7, 48)).astype(np.float32)
index = TopKIndex(48)
index.add(x)
scores, ids = index.search(q, 5)
ref = np.argsort(-(q.astype(np.float64) @ x.T.astype(np.float64)), axis=1)[:, :5]
assert ids.shape == (7, 5) and np.array_equal(ids, ref), (ids, ref)
assert np.allclose(scores, np.take_along_axis(q @ x.T, ref, 1), atol=1e-4)

# utility_infonce forward/backward vs the formula in float64
torch.manual_seed(0)
B, N, K, tau, tt = 5, 13, 3, 0.05, 0.5
qe = torch.randn(B, 16, dtype=torch.float64, requires_grad=True)
pe = torch.randn(N, 16, dtype=torch.float64, requires_grad=True)
t_idx = torch.randint(0, N, (B, K))
t_idx[:, 1:] = (t_idx[:, :1] + torch.arange(1, K)) % N  # distinct targets per row
util = torch.randn(B, K, dtype=torch.float64)
loss = utility_infonce(qe, pe, t_idx, util, temperature=tau, teacher_temperature=tt)
loss.backward()
gq, gp = qe.grad.clone(), pe.grad.clone()
qe.grad = pe.grad = None
s = qe @ pe.T / tau
w = torch.softmax(util / tt, dim=1)
ref_loss = (w * (torch.logsumexp(s, 1, keepdim=True) - s.gather(1, t_idx))).sum(1).mean()
ref_loss.backward()
assert torch.allclose(loss, ref_loss, rtol=1e-10), (loss, ref_loss)
assert torch.allclose(gq, qe.grad, rtol=1e-8, atol=1e-12) and torch.allclose(gp, pe.grad, rtol=1e-8, atol=1e-12)

# one OpenMP runtime: the extension resolves libgomp.so.1 to the copy torch loaded
with open("/proc/self/maps") as f:
    gomp = {line.split()[-1] for line in f if "gomp" in line.rsplit("/", 1)[-1]}
assert len(gomp) <= 1, f"two OpenMP runtimes loaded: {sorted(gomp)}"

# shipped data from the wheel
for split in ("train", "dev"):
    p = shipped_file(QUICKSTART_SLICE.format(split=split))
    assert inside_venv(p) and len(load_dataset(p)) > 200, p
assert inside_venv(_default_utilities()) and inside_venv(_default_utilities(no_gold=True))
shipped = sorted(os.listdir(os.path.dirname(_default_utilities())))
expected = sorted(["README.md", os.path.basename(_default_utilities()), os.path.basename(_default_utilities(no_gold=True)),
                   "qasper-train-utilities-nogold-top12.jsonl.gz",  # the question-only policy's table (results, Gemma rows)
                   "qasper-train-utilities-nogold-top12-gemma3-270m.jsonl.gz",  # the second teacher's table
                   "qasper-train-utilities-gemma3-270m.jsonl.gz",  # and its gold-added top:3 table
                   "qasper-train-utilities-nogold-answer12-gemma3-270m.jsonl.gz"]  # and the default answer:12 rows
                  + [QUICKSTART_SLICE.format(split=s) for s in ("train", "dev")])
assert shipped == expected, f"uae_fast/_data holds {shipped}, expected {expected}"  # nothing stale rides along

print(f"wheel smoke OK: uae_fast {uae_fast.__version__} from {os.path.dirname(uae_fast.__file__)}; "
      f"torch {torch.__version__}; OpenMP {sorted(gomp) or 'none'}", file=sys.stderr)
