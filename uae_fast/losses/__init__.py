"""Training losses (thin nn.Module wrappers over the fused ops in :mod:`uae_fast.ops`)."""
from .utility_infonce import UtilityInfoNCELoss

__all__ = ["UtilityInfoNCELoss"]
