"""UtilityInfoNCELoss: the UAE objective as a sentence-transformers (v3+ trainer API) loss."""
from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .utility_infonce import UtilityInfoNCE

# The defaults of `uae train` (uae_fast.training.TrainConfig), so the two entry points train alike.
_DEFAULTS = dict(temperature=0.05, teacher_temperature=0.5, label_mix=0.5)

UAE_CITATION = """
@misc{uae2026,
    title={Utility-Aligned Embeddings},
    year={2026},
    eprint={2604.22722},
    archivePrefix={arXiv},
    url={https://arxiv.org/abs/2604.22722},
}
"""


def _similarity_name(fct: Callable) -> str:
    """'cos_sim' or 'dot_score': the fused loss scores dot products, so cosine = normalise first."""
    name = getattr(fct, "__name__", repr(fct))
    if name not in ("cos_sim", "dot_score"):
        raise ValueError(f"similarity_fct must be sentence_transformers.util.cos_sim or dot_score (the fused loss "
                         f"scores dot products; cos_sim normalises the embeddings first), got {name}")
    return name


class UtilityInfoNCELoss(nn.Module):
    def __init__(
        self,
        model: nn.Module,
        temperature: float = _DEFAULTS["temperature"],
        teacher_temperature: float = _DEFAULTS["teacher_temperature"],
        label_mix: float = _DEFAULTS["label_mix"],
        gather_across_devices: bool = False,
        similarity_fct: Optional[Callable[[Tensor, Tensor], Tensor]] = None,
        dedupe_passages: bool = True,
    ) -> None:
        """Utility-modulated InfoNCE (UAE, arXiv 2604.22722) for ``SentenceTransformerTrainer``: the
        student's softmax over every passage in the batch is trained to match the teacher's utility
        distribution over each query's own candidates.

        For query ``i`` with candidate utilities ``u_i`` (the ``labels`` row)::

            w_i    = softmax_k(u_ik / teacher_temperature)       over the candidates with a utility (not NaN)
            w_i    = (1 - label_mix) * w_i + label_mix * onehot(passage_0 of row i)
            loss_i = sum_k w_ik * (logsumexp_j s_ij - s_{i, (i, k)}),   s_ij = sim(q_i, p_j) / temperature

        where ``j`` runs over all ``B * K`` passages of the batch (every column of every row): each query's
        unscored candidates and all other rows' passages are in-batch negatives. Computed by
        :func:`uae_fast.utility_infonce`, which never builds the [B, B*K] score matrix.

        Args:
            model: the SentenceTransformer being trained.
            temperature: student softmax temperature (``scale = 1 / temperature``; 0.05 = MNRL's ``scale=20``).
            teacher_temperature: sharpness of ``softmax(utility / T)``.
            label_mix: weight of the gold passage in the target. **Column ``passage_0`` is the gold passage**
                (the positive, as in MultipleNegativesRankingLoss); ``uae export`` writes it there. 0 = pure
                teacher.
            gather_across_devices: under ``torch.distributed``, score each rank's queries against the passages
                of all ranks (gathered with gradient, indices shifted by :func:`uae_fast.gather_with_grad`).
            similarity_fct: ``sentence_transformers.util.cos_sim`` (default: the embeddings are
                L2-normalised) or ``dot_score`` (used as they are).
            dedupe_passages: a passage text that occurs in several rows of the batch (queries of one paper
                share paragraphs) is one passage of the softmax, as in ``uae train``'s batches, instead of
                a copy that is a negative of the row that has it as a target. Compares token ids; with
                ``gather_across_devices`` across every rank's batch.

        Defaults are ``uae train``'s (temperature 0.05, teacher_temperature 0.5, label_mix 0.5).

        Inputs:
            +------------------------------------------------+-------------------------------------------------+
            | Texts                                          | Labels                                          |
            +================================================+=================================================+
            | (query, passage_0, ..., passage_{K-1})         | [K] utilities per row; NaN = no utility         |
            +------------------------------------------------+-------------------------------------------------+

            A NaN candidate gets no target weight but is still a negative. A row whose utilities are all NaN
            (or a dataset without a labels column) falls back to a one-hot target on ``passage_0``: it is
            then MultipleNegativesRankingLoss with ``passage_1...`` as hard negatives.

        References:
            - UAE: Utility-Aligned Embeddings, arXiv 2604.22722 (utility = the answer's log-prob gain).
            - InfoNCE: van den Oord et al. 2018, https://arxiv.org/abs/1807.03748

        Relations:
            - With one utility per row, on ``passage_0`` (the others NaN), or all-NaN rows, or ``label_mix=1``,
              and distinct passages, this equals ``MultipleNegativesRankingLoss(model, scale=1/temperature)``
              (tested). Utilities are logits, not probabilities: [1, 0, 0] is a soft target over three passages.
            - :class:`CachedUtilityInfoNCELoss` is the same loss with GradCache, for batches of thousands.
            - :class:`uae_fast.UtilityInfoNCE` is the embedding-level module underneath (``q``, ``p``,
              ``target_idx``, ``target_utility``), for custom training loops.

        Example:
            ::

                from datasets import load_dataset
                from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer
                from uae_fast.losses import UtilityInfoNCELoss

                model = SentenceTransformer("sentence-transformers/all-MiniLM-L6-v2")
                train = load_dataset("qasper-uae", split="train")  # `uae export --utilities T --out qasper-uae`
                trainer = SentenceTransformerTrainer(model=model, train_dataset=train,
                                                     loss=UtilityInfoNCELoss(model))
                trainer.train()
        """
        super().__init__()
        self.model = model
        # The embedding-level module validates temperature, teacher_temperature and label_mix.
        self.objective = UtilityInfoNCE(temperature, teacher_temperature, label_mix,
                                        gather_across_devices=gather_across_devices)
        if similarity_fct is None:
            from sentence_transformers.util import cos_sim as similarity_fct
        self.normalize = _similarity_name(similarity_fct) == "cos_sim"
        self.similarity_fct = similarity_fct
        if not isinstance(dedupe_passages, bool):
            raise TypeError(f"dedupe_passages must be a bool, got {dedupe_passages!r}")
        self.dedupe_passages = dedupe_passages

    # sentence-transformers' names for the hyperparameters
    temperature = property(lambda self: self.objective.temperature)
    teacher_temperature = property(lambda self: self.objective.teacher_temperature)
    label_mix = property(lambda self: self.objective.label_mix)
    gather_across_devices = property(lambda self: self.objective.gather_across_devices)

    @property
    def scale(self) -> float:
        return 1.0 / self.temperature

    def forward(self, sentence_features: Iterable[Dict[str, Tensor]], labels: Optional[Tensor]) -> Tensor:
        sentence_features = list(sentence_features)
        check_columns(sentence_features)
        embeddings = [self.model(f)["sentence_embedding"] for f in sentence_features]
        return self.compute_loss_from_embeddings(embeddings, labels, self.passage_keys(sentence_features))

    def passage_keys(self, sentence_features: List[Dict[str, Tensor]]) -> Optional[List[bytes]]:
        """One key per passage (column-major: column k's rows, then column k+1's) that is equal for equal
        texts; None when deduplication is off or the features carry no token ids."""
        if not self.dedupe_passages:
            return None
        return _token_keys(sentence_features[1:])

    def compute_loss_from_embeddings(self, embeddings: List[Tensor], labels: Optional[Tensor],
                                     keys: Optional[List[bytes]] = None) -> Tensor:
        q, cols = embeddings[0], embeddings[1:]
        if q.dim() != 2:
            raise ValueError(f"the query column's embeddings must be [B, d], got shape {tuple(q.shape)}")
        b, k = q.shape[0], len(cols)
        if not cols:
            raise ValueError("UtilityInfoNCELoss needs a query column and at least one passage column")
        for c, col in enumerate(cols):  # rows of unequal columns would pair passages with the wrong queries
            if col.dim() != 2 or col.shape[0] != b:
                raise ValueError(f"passage column {c} has embeddings of shape {tuple(col.shape)}; every column needs "
                                 f"the query column's {b} rows")
        p = torch.cat(cols, dim=0)  # passage (row i, column c) sits at c * B + i
        if self.normalize:
            q, p = F.normalize(q, p=2, dim=-1), F.normalize(p, p=2, dim=-1)
        target_idx, target_utility = targets_from_labels(labels, b, k, q.device)
        gold = torch.arange(b, device=q.device)  # column passage_0
        if keys is not None:
            if len(keys) != p.shape[0]:  # a key per passage row, column-major, as passage_keys makes them
                raise ValueError(f"keys has {len(keys)} entries for {p.shape[0]} passages ({k} columns of {b} rows)")
            p, target_idx, gold, keys = _dedupe(p, target_idx, gold, keys)
            world = _world_size()
            if self.gather_across_devices and world > 1:
                # Across ranks too: a text in two ranks' batches is one passage of the softmax (gathered with
                # gradient, then deduplicated by the gathered keys), as one process with the whole batch has it.
                import torch.distributed as dist

                from ..distributed import gather_with_grad

                p, target_idx, gold = gather_with_grad(p, target_idx, gold)
                every: List[Optional[List[bytes]]] = [None] * world
                dist.all_gather_object(every, keys)
                p, target_idx, gold, _ = _dedupe(p, target_idx, gold, [k for ks in every for k in ks])
                return self.objective.local_loss(q, p, target_idx, target_utility, gold if self.label_mix > 0 else None)
        return self.objective(q, p, target_idx, target_utility, gold if self.label_mix > 0 else None)

    def get_config_dict(self) -> Dict[str, Any]:
        return {
            "temperature": self.temperature,
            "teacher_temperature": self.teacher_temperature,
            "label_mix": self.label_mix,
            "similarity_fct": _similarity_name(self.similarity_fct),
            "gather_across_devices": self.gather_across_devices,
            "dedupe_passages": self.dedupe_passages,
        }

    @property
    def citation(self) -> str:
        return UAE_CITATION


# ------------------------------------------------------------------------------------------ shared helpers
def check_columns(sentence_features: list) -> None:
    if len(sentence_features) < 2:
        raise ValueError(f"UtilityInfoNCELoss needs the columns (query, passage_0, ..., passage_K-1), "
                         f"got {len(sentence_features)} text column(s)")


def targets_from_labels(labels: Optional[Tensor], b: int, k: int, device) -> Tuple[Tensor, Tensor]:
    """``(target_idx [B, K], target_utility [B, K])`` for :func:`uae_fast.utility_infonce` from ``labels``
    [B, K] (NaN = no utility), with passage (i, c) at index ``c * B + i``. All-NaN rows target passage_0."""
    if labels is None:
        labels = torch.full((b, k), float("nan"), device=device)
    if isinstance(labels, Tensor) and labels.dim() == 1 and k == 1 and labels.shape[0] == b:
        labels = labels[:, None]  # (query, passage_0) with a scalar label column: one utility per row
    if not isinstance(labels, Tensor) or labels.dim() != 2 or tuple(labels.shape) != (b, k):
        shape = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
        raise ValueError(f"labels must be [batch, K] = [{b}, {k}] utilities, one per passage column "
                         f"(NaN = no utility), got {shape}")
    if not labels.is_floating_point():
        labels = labels.float()
    labels = labels.detach().to(device)
    if bool(torch.isinf(labels).any()):
        r, c = (int(x) for x in torch.isinf(labels).nonzero()[0])
        raise ValueError(f"labels[{r}, {c}] is {float(labels[r, c])}: utilities must be finite, or NaN for none")
    valid = ~torch.isnan(labels)
    valid[~valid.any(dim=1), 0] = True  # no utility at all: the gold passage_0 stands in (as `uae train` does)
    idx = torch.arange(k, device=device)[None, :] * b + torch.arange(b, device=device)[:, None]
    target_idx = torch.where(valid, idx, -1)
    target_utility = torch.where(valid, labels.nan_to_num(0.0), 0.0)
    return target_idx, target_utility


def _token_keys(passage_features: List[Dict[str, Tensor]]) -> Optional[List[bytes]]:
    """Per passage (column-major), a 16-byte digest of its non-padding token ids; None without ``input_ids``.
    Padded features ([rows, width] ids and mask) and flattened ones (sentence-transformers >= 6 with
    FlashAttention-2: ids [1, tokens] split by ``cu_seq_lens_q``) give the same keys for the same texts.
    Digests, not the ids, so that gathering keys across ranks costs 16 bytes a passage, not 8 a token."""
    from hashlib import blake2b

    keys: List[bytes] = []
    for f in passage_features:
        ids, mask, cu = f.get("input_ids"), f.get("attention_mask"), f.get("cu_seq_lens_q")
        if not isinstance(ids, Tensor) or ids.dim() != 2:
            return None
        ids = ids.detach().cpu()
        if isinstance(cu, Tensor):  # flattened: one row of every text's tokens, boundaries in cu_seq_lens_q
            flat, bounds = ids.reshape(-1).numpy(), cu.detach().cpu().tolist()
            rows = [flat[s:e] for s, e in zip(bounds[:-1], bounds[1:])]
        else:
            if isinstance(mask, Tensor) and mask.shape == ids.shape:
                ids = ids.masked_fill(mask.detach().cpu() == 0, -1)  # padding never tells two texts apart
            rows = [row[row >= 0] for row in ids.numpy()]
        keys.extend(blake2b(row.astype("int64").tobytes(), digest_size=16).digest() for row in rows)
    return keys


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _dedupe(p: Tensor, target_idx: Tensor, gold: Tensor, keys: List[bytes]):
    """``p`` with each distinct key once (its first copy), the indices remapped; and the kept keys in order."""
    first, inverse = _unique(keys, p.device)
    if first.numel() == p.shape[0]:
        return p, target_idx, gold, keys
    target_idx = torch.where(target_idx >= 0, inverse[target_idx.clamp_min(0)], -1)
    return p[first], target_idx, inverse[gold], [keys[i] for i in first.tolist()]


def _unique(keys: List[bytes], device) -> Tuple[Tensor, Tensor]:
    """``(first [U], inverse [N])``: the first position of each distinct key and each position's slot."""
    slot: Dict[bytes, int] = {}
    first: List[int] = []
    inverse = [slot.setdefault(key, len(slot)) for key in keys]
    for i, s in enumerate(inverse):
        if s == len(first):
            first.append(i)
    return torch.tensor(first, dtype=torch.long, device=device), torch.tensor(inverse, dtype=torch.long, device=device)
