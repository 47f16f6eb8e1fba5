"""uae_fast: Utility-Aligned Embeddings (UAE, arXiv 2604.22722), fast.

Public API (imported lazily so ``import uae_fast`` stays cheap and a CLI call loads only what it uses):

- ops: :func:`token_logprobs`, :func:`token_logprob_deltas`, :func:`utility_infonce`
- losses: :class:`UtilityInfoNCE` (embedding-level module); :class:`UtilityInfoNCELoss`,
  :class:`CachedUtilityInfoNCELoss` (sentence-transformers losses: ``loss(model)``)
- teacher: :class:`UtilityScorer`
- student: :class:`BiEncoder`
- index: :class:`TopKIndex`
- hybrid retrieval: :class:`HybridIndex`, :class:`LexicalIndex`, :func:`calibrate_fusion`
"""
from importlib import import_module

__version__ = "0.2.0"  # the one place: pyproject reads it, `uae --version` prints it

_EXPORTS = {
    "token_logprobs": "uae_fast.ops.logprobs",
    "token_logprob_deltas": "uae_fast.ops.logprobs",
    "utility_infonce": "uae_fast.ops.infonce",
    "UtilityInfoNCE": "uae_fast.losses.utility_infonce",
    "UtilityInfoNCELoss": "uae_fast.losses.st_utility_infonce",
    "CachedUtilityInfoNCELoss": "uae_fast.losses.cached_utility_infonce",
    "gather_with_grad": "uae_fast.distributed",
    "UtilityScorer": "uae_fast.teacher",
    "BiEncoder": "uae_fast.student",
    "TopKIndex": "uae_fast.index",
    "HybridIndex": "uae_fast.hybrid",
    "LexicalIndex": "uae_fast.lexical",
    "calibrate_fusion": "uae_fast.calibration",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'uae_fast' has no attribute {name!r}")


def __dir__():
    return __all__
