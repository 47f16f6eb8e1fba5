"""UtilityInfoNCE: the UAE training objective on embeddings, as an ``nn.Module``.

The embedding-level module: it takes query/passage embeddings and target indices. For the
sentence-transformers trainer (a loss that takes the model and ``(sentence_features, labels)``) use
:class:`uae_fast.losses.UtilityInfoNCELoss` / :class:`uae_fast.losses.CachedUtilityInfoNCELoss`.
"""
from __future__ import annotations

import numbers
from typing import Optional

import torch
from torch import nn

from .._checks import check_scalar
from ..ops.infonce import utility_infonce


class UtilityInfoNCE(nn.Module):
    def __init__(
        self,
        temperature: float = 0.05,
        teacher_temperature: float = 1.0,
        label_mix: float = 0.0,
        *,
        reduction: str = "mean",
        gather_across_devices: bool = False,
        impl: str = "auto",
    ) -> None:
        """Utility-modulated InfoNCE (UAE, arXiv 2604.22722): a soft-target contrastive loss that trains a
        bi-encoder to rank passages the way a teacher LM's *utility* ranks them.

        For each query ``i`` the teacher distribution over its candidate passages is
        ``w_i = softmax(u_i / teacher_temperature)`` (optionally mixed with the gold passage:
        ``(1 - label_mix) * w_i + label_mix * onehot(gold_i)``), and the loss is the cross-entropy of the
        student's softmax over *all* passages in the batch, ``softmax_j(q_i . p_j / temperature)``, against it::

            loss_i = sum_k w_ik * (logsumexp_j s_ij - s_{i, t_ik})

        Every passage not among a query's targets (other queries' candidates, extra negatives, other ranks'
        passages) acts as an in-batch negative. The [B, N] score matrix is never materialised
        (see :func:`uae_fast.utility_infonce`), so B and N can be tens of thousands.

        Args:
            temperature: student softmax temperature; sentence-transformers' ``scale = 1 / temperature``
                (``0.05`` = ``scale=20``).
            teacher_temperature: sharpness of the teacher distribution over utilities.
            label_mix: weight ``alpha`` of the one-hot gold label mixed into the teacher distribution
                (needs ``gold_idx`` in ``forward``); 0 = pure teacher, 1 = plain InfoNCE on the gold passage.
            reduction: ``"mean"`` (default), ``"sum"`` or ``"none"``.
            gather_across_devices: all-gather passages from every ``torch.distributed`` rank (with gradient)
                so each query also sees the other ranks' passages as negatives; ``target_idx``/``gold_idx``
                stay local indices and are shifted for you (:func:`uae_fast.gather_with_grad`).
            impl: ``"auto"`` (the chunked torch path on every device; see ``utility_infonce``), ``"triton"`` or ``"torch"``.

        Inputs (``forward(q, p, target_idx, target_utility, gold_idx=None, exclude_idx=None)``):
            +-----------------+--------------+----------------------------------------------------------+
            | argument        | shape        | meaning                                                  |
            +=================+==============+==========================================================+
            | q               | [B, d] float | query embeddings (already normalised if you want cosine) |
            +-----------------+--------------+----------------------------------------------------------+
            | p               | [N, d] float | passage embeddings: all candidates + extra negatives     |
            +-----------------+--------------+----------------------------------------------------------+
            | target_idx      | [B, K] int   | indices into ``p`` of each query's candidates, -1 = pad  |
            +-----------------+--------------+----------------------------------------------------------+
            | target_utility  | [B, K] float | teacher utility of each candidate (mean log-prob delta)  |
            +-----------------+--------------+----------------------------------------------------------+
            | gold_idx        | [B] int      | optional gold passage index into ``p`` (-1 = none)       |
            +-----------------+--------------+----------------------------------------------------------+
            | exclude_idx     | [B, E] int   | optional passages out of row i's softmax, -1 = pad       |
            +-----------------+--------------+----------------------------------------------------------+

        References:
            - UAE: Utility-Aligned Embeddings, arXiv 2604.22722 (teacher utility = answer log-prob gain).
            - InfoNCE: van den Oord et al. 2018, https://arxiv.org/abs/1807.03748

        Relations:
            - With one-hot targets (a single valid target per query, or ``label_mix=1``) this *is*
              sentence-transformers' ``MultipleNegativesRankingLoss`` with ``scale = 1 / temperature`` and
              ``similarity_fct = dot_score`` (``cos_sim`` if the embeddings are normalised); the test suite checks
              this equality. Its hard negatives correspond to extra rows of ``p`` that no query targets.
            - ``DistillKLDivLoss`` distils teacher scores over a query's own candidates only; here the teacher
              distribution is contrasted against *all* passages in the batch.

        Example:
            ::

                import torch
                from uae_fast import UtilityInfoNCE

                loss_fn = UtilityInfoNCE(temperature=0.05, teacher_temperature=0.5, label_mix=0.1)
                q = torch.nn.functional.normalize(query_encoder(queries), dim=-1)       # [B, d]
                p = torch.nn.functional.normalize(passage_encoder(passages), dim=-1)    # [N, d]
                # batch.target_idx [B, K], batch.utility [B, K], batch.gold_idx [B] from the teacher-scoring step
                loss = loss_fn(q, p, batch.target_idx, batch.utility, gold_idx=batch.gold_idx)
                loss.backward()
        """
        super().__init__()
        self.temperature = temperature
        self.teacher_temperature = teacher_temperature
        self.label_mix = label_mix
        self.reduction = reduction
        if not isinstance(gather_across_devices, bool):  # "no" would read as True
            raise TypeError(f"gather_across_devices must be a bool, got {gather_across_devices!r}")
        self.gather_across_devices = gather_across_devices
        self.impl = impl
        # Fail at construction, not at the first training step.
        for name in ("temperature", "teacher_temperature"):  # the op checks again against its compute dtype
            check_scalar(name, getattr(self, name), dtype=torch.float64)
        if isinstance(label_mix, bool) or not isinstance(label_mix, numbers.Real) or not 0.0 <= label_mix <= 1.0:
            raise ValueError(f"label_mix must be a number in [0, 1], got {label_mix!r}")
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
        if impl not in ("auto", "torch", "triton"):
            raise ValueError(f"impl must be 'auto', 'torch' or 'triton', got {impl!r}")

    @property
    def scale(self) -> float:
        """sentence-transformers' name for ``1 / temperature``."""
        return 1.0 / self.temperature

    def forward(
        self,
        q: torch.Tensor,
        p: torch.Tensor,
        target_idx: torch.Tensor,
        target_utility: torch.Tensor,
        gold_idx: Optional[torch.Tensor] = None,
        exclude_idx: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        if self.gather_across_devices:
            from ..distributed import gather_with_grad

            p, target_idx, gold_idx, exclude_idx = gather_with_grad(p, target_idx, gold_idx, exclude_idx)
        return self.local_loss(q, p, target_idx, target_utility, gold_idx, exclude_idx)

    def local_loss(self, q, p, target_idx, target_utility, gold_idx=None, exclude_idx=None) -> torch.Tensor:
        """The loss on passages as given (already gathered, or local): :meth:`forward` without the gather."""
        return utility_infonce(
            q,
            p,
            target_idx,
            target_utility,
            temperature=self.temperature,
            teacher_temperature=self.teacher_temperature,
            label_mix=self.label_mix,
            gold_idx=gold_idx,
            reduction=self.reduction,
            impl=self.impl,
            exclude_idx=exclude_idx,
        )

    def get_config_dict(self) -> dict:
        return {
            "temperature": self.temperature,
            "teacher_temperature": self.teacher_temperature,
            "label_mix": self.label_mix,
            "reduction": self.reduction,
            "gather_across_devices": self.gather_across_devices,
        }

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.get_config_dict().items())
