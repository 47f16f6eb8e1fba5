"""Training losses, one per module.

- :class:`UtilityInfoNCE` (``utility_infonce.py``): the embedding-level module,
  ``(q, p, target_idx, target_utility, gold_idx)``, for custom training loops.
- :class:`UtilityInfoNCELoss` (``st_utility_infonce.py``) and :class:`CachedUtilityInfoNCELoss`
  (``cached_utility_infonce.py``): sentence-transformers losses, ``loss(model)(sentence_features, labels)``,
  for ``SentenceTransformerTrainer`` (imported lazily: only they need sentence-transformers).
"""
from importlib import import_module

from .utility_infonce import UtilityInfoNCE

_LAZY = {
    "UtilityInfoNCELoss": ".st_utility_infonce",
    "CachedUtilityInfoNCELoss": ".cached_utility_infonce",
}

__all__ = ["CachedUtilityInfoNCELoss", "UtilityInfoNCE", "UtilityInfoNCELoss"]


def __getattr__(name):
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'uae_fast.losses' has no attribute {name!r}")


def __dir__():
    return __all__
