import subprocess
import sys

import uae_fast


def test_lazy_exports_resolve():
    # Every advertised name resolves: a renamed or deleted module fails here, not in a user's import.
    import importlib

    assert uae_fast._EXPORTS
    for name, mod in uae_fast._EXPORTS.items():
        assert getattr(importlib.import_module(mod), name) is getattr(uae_fast, name), name


def test_extension_is_built():
    from uae_fast import _topk

    assert _topk.max_threads() >= 1


def test_cli_help_runs():
    r = subprocess.run([sys.executable, "-m", "uae_fast", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "uae" in r.stdout


def test_check_finite_overflowing_sum_is_not_an_error_but_nan_and_inf_are():
    import pytest
    import torch

    from uae_fast._checks import check_finite

    check_finite("x", torch.full((10,), 3e38))  # sum overflows to inf; every element is finite
    for bad in (float("nan"), float("inf"), -float("inf")):
        for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            t = torch.randn(33, dtype=dtype)
            t[7] = bad
            with pytest.raises(ValueError, match="x contains 1 NaN or inf"):
                check_finite("x", t)
