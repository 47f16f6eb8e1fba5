"""Fused kernels. Each ``ops/<op>.py`` holds the public function, its pure-torch path and its Triton path."""
from .infonce import utility_infonce
from .logprobs import token_logprob_deltas, token_logprobs

__all__ = ["token_logprobs", "token_logprob_deltas", "utility_infonce"]
