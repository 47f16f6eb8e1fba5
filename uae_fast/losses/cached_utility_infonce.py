"""CachedUtilityInfoNCELoss: the UAE sentence-transformers loss with GradCache (batches of thousands)."""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from functools import partial
from typing import Any, Callable, Dict, Iterable, List, Optional

import torch
from torch import Tensor, nn

from .st_utility_infonce import _DEFAULTS, UtilityInfoNCELoss, check_columns

GRADCACHE_CITATION = """
@misc{gao2021scaling,
    title={Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup},
    author={Luyu Gao and Yunyi Zhang and Jiawei Han and Jamie Callan},
    year={2021},
    eprint={2101.06983},
    archivePrefix={arXiv},
    primaryClass={cs.LG}
}
"""


def _rand_context():
    # sentence-transformers >= 6 keeps it in base.losses.gradcache; 3.x-5.x in the cached MNRL module.
    try:
        from sentence_transformers.base.losses.gradcache import RandContext
    except ImportError:
        from sentence_transformers.losses.CachedMultipleNegativesRankingLoss import RandContext
    return RandContext


class CachedUtilityInfoNCELoss(UtilityInfoNCELoss):
    def __init__(
        self,
        model: nn.Module,
        mini_batch_size: int = 32,
        temperature: float = _DEFAULTS["temperature"],
        teacher_temperature: float = _DEFAULTS["teacher_temperature"],
        label_mix: float = _DEFAULTS["label_mix"],
        gather_across_devices: bool = False,
        similarity_fct: Optional[Callable[[Tensor, Tensor], Tensor]] = None,
        dedupe_passages: bool = True,
        show_progress_bar: bool = False,
    ) -> None:
        """:class:`UtilityInfoNCELoss` with GradCache (Gao et al. 2021): the same loss and gradients, with
        the encoder's activations bounded by ``mini_batch_size`` texts whatever the batch size.

        Three steps per batch, as sentence-transformers' ``CachedMultipleNegativesRankingLoss``:

        1. embed every column in mini-batches without gradient, saving each mini-batch's RNG state;
        2. compute the loss on the (tiny) embeddings and back-propagate it to them: the gradient cache.
           :func:`uae_fast.utility_infonce` never builds the [B, B*K] scores, so this step stays small too;
        3. in the backward pass, re-embed each mini-batch with gradient under its saved RNG state (the same
           dropout masks) and back-propagate its cached gradient (``dot(embedding, cached_grad)``). Under
           DDP only the last mini-batch synchronises the gradients (when it needs none, e.g. a frozen passage
           tower, a trainable one is replayed with a zero gradient to do it). Static-graph DDP
           (``ddp_static_graph=True``) records the parameters of the first trainable mini-batch as its graph:
           use it only when every trainable mini-batch uses the same parameters (one shared tower, or one
           trainable tower and frozen others); DDP refuses anything else with "training graph has changed".

        Args:
            model: the SentenceTransformer being trained.
            mini_batch_size: texts per encoder forward/backward; sets the memory, not the result.
            temperature, teacher_temperature, label_mix, gather_across_devices, similarity_fct,
                dedupe_passages: as :class:`UtilityInfoNCELoss` (defaults = ``uae train``'s).
            show_progress_bar: a tqdm bar over the mini-batches.

        Inputs:
            +------------------------------------------------+-------------------------------------------------+
            | Texts                                          | Labels                                          |
            +================================================+=================================================+
            | (query, passage_0, ..., passage_{K-1})         | [K] utilities per row; NaN = no utility         |
            +------------------------------------------------+-------------------------------------------------+

        References:
            - UAE: Utility-Aligned Embeddings, arXiv 2604.22722.
            - GradCache: Gao et al. 2021, Scaling Deep Contrastive Learning Batch Size under Memory Limited
              Setup, https://arxiv.org/abs/2101.06983

        Relations:
            - Equals :class:`UtilityInfoNCELoss` (loss and parameter gradients; tested), at about 1.3-1.5x its
              encoder compute (every text is embedded twice, once without a graph). With dropout on, exactly
              so when ``mini_batch_size`` covers a column; smaller mini-batches draw other dropout masks than
              one whole-column forward would (the same distribution; each replay reuses its own draw).

        Example:
            ::

                from datasets import load_dataset
                from sentence_transformers import (SentenceTransformer, SentenceTransformerTrainer,
                                                   SentenceTransformerTrainingArguments)
                from uae_fast.losses import CachedUtilityInfoNCELoss

                model = SentenceTransformer("sentence-transformers/all-MiniLM-L6-v2")
                train = load_dataset("qasper-uae", split="train")  # `uae export --utilities T --out qasper-uae`
                args = SentenceTransformerTrainingArguments("out", per_device_train_batch_size=4096)
                trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=train,
                                                     loss=CachedUtilityInfoNCELoss(model, mini_batch_size=32))
                trainer.train()
        """
        super().__init__(model, temperature, teacher_temperature, label_mix, gather_across_devices,
                         similarity_fct, dedupe_passages)
        if isinstance(mini_batch_size, bool) or not isinstance(mini_batch_size, int) or mini_batch_size < 1:
            raise ValueError(f"mini_batch_size must be a positive int, got {mini_batch_size!r}")
        inner = getattr(model, "_orig_mod", model)  # a torch.compile'd model wraps the SentenceTransformer
        modules = inner.modules() if isinstance(inner, nn.Module) else ()
        if any(type(m).__name__ == "StaticEmbedding" for m in modules):  # token ids + offsets: no rows to split
            raise ValueError("CachedUtilityInfoNCELoss does not work with a StaticEmbedding model (its inputs cannot be "
                             "split into mini-batches; it is cheap to embed anyway): use UtilityInfoNCELoss")
        self.mini_batch_size = mini_batch_size
        self.show_progress_bar = bool(show_progress_bar)

    def _ranges(self, features: Dict[str, Tensor]) -> List[tuple]:
        n = _rows(features)
        return [(s, min(n, s + self.mini_batch_size)) for s in range(0, n, self.mini_batch_size)]

    def forward(self, sentence_features: Iterable[Dict[str, Tensor]], labels: Optional[Tensor]) -> Tensor:
        features = list(sentence_features)
        check_columns(features)
        keys = self.passage_keys(features)
        grad = torch.is_grad_enabled()
        RandContext = _rand_context()
        # Step 1: embed without a graph; keep each mini-batch's RNG state so step 3 replays its dropout.
        reps, states, ranges = [], [], [self._ranges(f) for f in features]
        for f, col_ranges in zip(features, ranges):
            col_reps, col_states = [], []
            for s, e in self._progress(col_ranges):
                mb = _slice(f, s, e)
                col_states.append(RandContext(*[v for v in mb.values() if isinstance(v, Tensor)]) if grad else None)
                with torch.no_grad():
                    col_reps.append(self.model(mb)["sentence_embedding"].detach())
            reps.append(col_reps)
            states.append(col_states)
        if not grad:  # evaluation: no cache, no backward
            return self.calculate_loss(reps, labels, keys=keys)
        # Step 2: the loss on the embeddings and its gradient with respect to them (through calculate_loss,
        # which sentence-transformers' MatryoshkaLoss wraps for gradient-caching losses).
        reps = [[r.requires_grad_() for r in col] for col in reps]
        loss = self.calculate_loss(reps, labels, with_backward=True, keys=keys)
        cache = [torch.cat([r.grad if r.grad is not None else torch.zeros_like(r) for r in col]) for col in reps]
        loss = loss.detach().requires_grad_()
        # Step 3 runs when the trainer back-propagates the returned loss. This call's features, ranges, cache
        # and RNG states are bound to the hook, so a second forward before the backward cannot mix batches.
        loss.register_hook(partial(_replay, loss_obj=self, features=features, cache=cache, states=states, ranges=ranges))
        return loss

    # sentence-transformers (>= 6) wrappers such as MatryoshkaLoss recognise a gradient-caching loss by this
    # flag and decorate its calculate_loss (embeddings in, loss out) instead of the model's forward.
    uses_gradient_cache = True

    def calculate_loss(self, reps: List[List[Tensor]], labels: Optional[Tensor] = None, *, with_backward: bool = False,
                       keys=None) -> Tensor:
        """The loss from per-column lists of mini-batch embeddings; ``with_backward``: back-propagate it into
        them and return it detached (the sentence-transformers gradient-cache contract)."""
        loss = self.compute_loss_from_embeddings([torch.cat(col) for col in reps], labels, keys)
        if with_backward:
            loss.backward()
            return loss.detach()
        return loss

    def _progress(self, it):
        if not self.show_progress_bar:
            return it
        from tqdm.auto import tqdm

        return tqdm(it, desc="Embed mini-batches", leave=False)

    def get_config_dict(self) -> Dict[str, Any]:
        return {**super().get_config_dict(), "mini_batch_size": self.mini_batch_size}

    @property
    def citation(self) -> str:
        return super().citation + GRADCACHE_CITATION


def _rows(features: Dict[str, Tensor]) -> int:
    cu = features.get("cu_seq_lens_q")
    if isinstance(cu, Tensor):  # flattened inputs (FlashAttention-2 without padding): one row of all tokens
        return int(cu.numel()) - 1
    for key in ("input_ids", "attention_mask"):
        if isinstance(features.get(key), Tensor):
            return int(features[key].shape[0])
    return next(int(v.shape[0]) for v in features.values() if isinstance(v, Tensor) and v.dim() > 0)


def _slice(features: Dict[str, Any], s: int, e: int) -> Dict[str, Any]:
    """Rows ``s:e`` of every per-row tensor; the trailing padding all of them share is dropped. Flattened
    features (``cu_seq_lens_q``) give texts ``s:e``' tokens with their boundaries rebased."""
    if isinstance(features.get("cu_seq_lens_q"), Tensor):
        return _slice_flat(features, s, e)
    n = _rows(features)
    mask = features.get("attention_mask")
    width = None
    if isinstance(mask, Tensor) and mask.dim() == 2:
        used = mask[s:e].bool().any(dim=0).nonzero()
        width = int(used.max()) + 1 if used.numel() else None
    out = {}
    for key, v in features.items():
        if isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == n:
            v = v[s:e]
            if width is not None and v.dim() == 2 and v.shape[1] == mask.shape[1]:
                v = v[:, :width]
        out[key] = v
    return out


def _slice_flat(features: Dict[str, Any], s: int, e: int) -> Dict[str, Any]:
    """Texts ``s:e`` of flattened features (as transformers' ``DataCollatorWithFlattening`` writes them:
    token tensors [1, tokens], ``cu_seq_lens_q/k`` boundaries, ``max_length_q/k``, ``seq_idx``)."""
    cu = features["cu_seq_lens_q"]
    t0, t1, total = int(cu[s]), int(cu[e]), int(cu[-1])
    new_cu = cu[s:e + 1] - cu[s]
    out: Dict[str, Any] = {}
    for key, v in features.items():
        if key in ("cu_seq_lens_q", "cu_seq_lens_k"):
            out[key] = new_cu
        elif key in ("max_length_q", "max_length_k"):
            out[key] = int((new_cu[1:] - new_cu[:-1]).max())
        elif key == "seq_idx":
            out[key] = v[..., t0:t1] - s
        elif isinstance(v, Tensor) and v.dim() >= 1 and v.shape[-1] == total:
            out[key] = v[..., t0:t1]  # token-level (input_ids, position_ids, ...)
        else:
            out[key] = v
    return out


def _torch_before(major: int, minor: int, version: Optional[str] = None) -> bool:
    # release numbers only: a 2.4 pre-release or NVIDIA build (2.4.0a0+git..., 2.4.0rc1) already has the fix
    from torch.torch_version import Version

    return Version(str(version or torch.__version__)).release[:2] < (major, minor)


@contextmanager
def _ddp_replay(ddp_model, sync: bool):
    """DDP context of one replayed mini-batch: no_sync unless ``sync``. Static-graph DDP must synchronise its
    first trainable backward (it builds the reducer's schedule there), so until its delayed all-reduce is
    enqueued every mini-batch syncs (a gradient already averaged stays itself under the later averaging)."""
    if ddp_model is None:
        yield
    elif ddp_model.static_graph and not getattr(ddp_model, "_static_graph_delay_allreduce_enqueued", True):
        before = ddp_model.require_backward_grad_sync
        ddp_model.require_backward_grad_sync = True
        try:
            yield
        finally:
            ddp_model.require_backward_grad_sync = before
    else:
        with nullcontext() if sync else ddp_model.no_sync():
            yield


def _replay(grad_output: Tensor, *, loss_obj: CachedUtilityInfoNCELoss, features, cache, states, ranges) -> None:
    """Backward hook: re-embed each mini-batch with gradient and back-propagate its cached gradient."""
    model = loss_obj.model
    inner = getattr(model, "_orig_mod", model)  # torch.compile wraps the DDP module
    ddp = isinstance(inner, torch.nn.parallel.DistributedDataParallel)
    if ddp and inner.find_unused_parameters and _torch_before(2, 4):
        # pytorch#124193: parameters used only under no_sync count as unused at the synced backward and keep
        # per-rank gradients (silently). The Hugging Face trainer turns find_unused_parameters on for ST models.
        raise ValueError("CachedUtilityInfoNCELoss under DDP with find_unused_parameters=True needs torch >= 2.4 "
                         "(pytorch#124193); upgrade torch or set ddp_find_unused_parameters=False")
    jobs = [(f, g, st, r) for f, g, sts, rs in zip(features, cache, states, ranges) for st, r in zip(sts, rs)]
    last_trainable, synced = None, False
    with torch.enable_grad():
        for n, (f, g, state, (s, e)) in enumerate(jobs):
            # DDP: accumulate locally and all-reduce once, with the last mini-batch's backward (an outer
            # no_sync, i.e. gradient accumulation, still defers it: nullcontext leaves DDP's flag alone).
            final = n == len(jobs) - 1
            with _ddp_replay(inner if ddp else None, final), state:
                rep = model(_slice(f, s, e))["sentence_embedding"]
                if rep.shape != g[s:e].shape:  # e.g. an old sentence-transformers' MatryoshkaLoss truncating
                    raise RuntimeError(f"CachedUtilityInfoNCELoss: the replayed mini-batch embeds to "
                                       f"{tuple(rep.shape)} but its cached gradient is {tuple(g[s:e].shape)}; a "
                                       f"wrapper that changes the embeddings needs sentence-transformers >= 6")
                if rep.requires_grad:
                    # surrogate in fp32 at least, whatever the autocast dtype: its gradient is the cached one
                    acc = torch.promote_types(rep.dtype, torch.float32)
                    (torch.dot(rep.flatten().to(acc), g[s:e].flatten().to(acc)) * grad_output).backward()
                    last_trainable, synced = n, final
        if ddp and inner.require_backward_grad_sync and not synced and last_trainable is not None:
            # The last mini-batch needed no gradient (a frozen route, e.g. a fixed passage tower), so no
            # backward left no_sync and the accumulated gradients would stay per-rank. Flush them: replay a
            # trainable mini-batch with a zero gradient outside no_sync (every rank takes this branch: the
            # routes are the model's). Buffers were already broadcast by this step's first forward.
            f, _, state, (s, e) = jobs[last_trainable]
            inner.require_forward_param_sync = False
            with state:
                rep = model(_slice(f, s, e))["sentence_embedding"]
            rep.backward(torch.zeros_like(rep))
