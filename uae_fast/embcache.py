"""An on-disk cache of passage embeddings, keyed by (encoder, text): re-running an evaluation or a
calibration with the same encoder embeds only texts it has not seen, and a long encoding can be done
in bounded slices (``max_seconds``) that resume where the last one stopped.

Layout: ``DIR/<encoder key>/chunk-*.pt``, each ``{"keys": [sha1(text)[:20], ...], "emb": float32 [n, dim]}``,
written atomically. The encoder key hashes the folder's real path and the sizes and modification times
of its weight, config and tokenizer files, module folders included (and a BiEncoder's pooling, normalisation, max length and lower-casing), so a retrained
model in the same folder, or the same weights with other settings, never reads stale vectors.
"""
from __future__ import annotations

import glob
import hashlib
import os
import sys
import time
from typing import Dict, Optional, Sequence

import torch


def encoder_key(path: Optional[str]) -> str:
    """A stable key for an encoder folder (``None``: the default student)."""
    if path is None:
        from .student import default_student_path

        path = default_student_path()
    path = os.path.realpath(os.fspath(path))
    parts = [path]
    for f in _model_files(path):
        st = os.stat(f)
        parts.append(f"{os.path.relpath(f, path)}:{st.st_size}:{st.st_mtime_ns}")
    name = os.path.basename(path.rstrip("/")) or "model"
    return f"{name}-{hashlib.sha1('|'.join(parts).encode()).hexdigest()[:12]}"


# What decides an encoder's vectors: weights, configs, tokenizer files, at the folder's top level and in the module
# folders its modules.json names (a sentence-transformers folder's 0_Transformer/); not a training run's
# checkpoints/ nor anything else kept beside the model (an index built into its folder).
_MODEL_SUFFIXES = (".safetensors", ".bin", ".json", ".txt", ".model")
# The JSON files a loader reads (configs, tokenizer files); others kept in a model folder (uae train's
# training_summary.json, a fusion.json from calibrate-fusion) do not change its vectors.
_MODEL_JSON = ("modules.json", "config_sentence_transformers.json", "tokenizer.json", "special_tokens_map.json",
               "added_tokens.json", "vocab.json")


def _is_model_file(name: str, legacy: bool = False) -> bool:
    if not name.endswith(_MODEL_SUFFIXES):
        return False
    return legacy or not name.endswith(".json") or name.endswith("config.json") or name in _MODEL_JSON


def _model_files(path: str, legacy: bool = False):
    """``legacy``: every *.json counted, as before 0.2.0's fix (index manifests written then still verify)."""
    import json

    def files_in(folder, recursive):
        out = []
        for root, dirs, files in os.walk(folder):
            dirs[:] = sorted(d for d in dirs if d != "checkpoints" and not d.startswith(".")) if recursive else []
            out += [os.path.join(root, f) for f in sorted(files) if _is_model_file(f, legacy)]
        return out

    out = files_in(path, False)
    try:
        with open(os.path.join(path, "modules.json"), encoding="utf-8") as f:
            subs = sorted({m["path"] for m in json.load(f) if isinstance(m, dict) and m.get("path")})
    except (OSError, ValueError, TypeError, KeyError):
        subs = []
    for sub in subs:
        folder = os.path.realpath(os.path.join(path, sub))
        if folder.startswith(path + os.sep) and os.path.isdir(folder):
            out += files_in(folder, True)
    return out


def model_fingerprint(path: Optional[str], *, legacy: bool = False) -> str:
    """What a model folder holds, by content, not by path or modification time (a copied or deployed folder
    keeps it): each model file's relative path, its configs and tokenizer files hashed whole, weights by size
    and their first and last MiB (a retrained model differs there). ``None``: the default student."""
    if path is None:
        from .student import default_student_path

        path = default_student_path()
    path = os.path.realpath(os.fspath(path))
    h = hashlib.sha1()
    for f in _model_files(path, legacy):
        size = os.path.getsize(f)
        h.update(f"{os.path.relpath(f, path)}:{size}:".encode())
        with open(f, "rb") as fh:
            if size <= 8 << 20:
                h.update(fh.read())
            else:
                h.update(fh.read(1 << 20))
                fh.seek(size - (1 << 20))
                h.update(fh.read())
    return h.hexdigest()[:16]


def encoder_fingerprint(encoder, *, legacy: bool = False) -> str:
    """:func:`model_fingerprint` of a :class:`uae_fast.BiEncoder`'s folder and the settings that change its vectors."""
    return f"{model_fingerprint(encoder.path, legacy=legacy)}-{hashlib.sha1(_settings(encoder).encode()).hexdigest()[:8]}"


def _settings(encoder) -> str:
    s = f"{encoder.pooling_modes}|{encoder.normalize}|{encoder.max_seq_length}|{encoder.do_lower_case}"
    # prompts only when a model has them, so the keys of every cache and index made before stay as they were
    prompts = getattr(encoder, "prompts", None)
    return s + (f"|{sorted(prompts.items())}|{encoder.default_prompt_name}" if prompts and any(prompts.values()) else "")


def cache_key(encoder, model_path: Optional[str] = None) -> str:
    """The cache folder name of ``encoder``: a :class:`uae_fast.BiEncoder` is keyed by the folder it was
    loaded from (:func:`encoder_key`) and the settings that change its vectors (pooling, normalisation,
    max length, lower-casing); another encoder object by ``model_path``, which it then needs. Weights changed
    in memory after loading are not seen: save them to a folder and load that."""
    from .student import BiEncoder

    if isinstance(encoder, BiEncoder):
        return f"{encoder_key(encoder.path)}-{hashlib.sha1(_settings(encoder).encode()).hexdigest()[:8]}"
    if model_path is None:
        raise ValueError(f"an embedding cache needs to know which model made the vectors: pass model_path (the "
                         f"folder of this {type(encoder).__name__}) or use a BiEncoder")
    return encoder_key(model_path)


def _text_key(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:20]


class Incomplete(RuntimeError):
    """Raised by :func:`encode_cached` when ``max_seconds`` ran out (what was encoded is saved)."""


def _load(folder: str) -> Dict[str, torch.Tensor]:
    out: Dict[str, torch.Tensor] = {}
    for f in sorted(glob.glob(os.path.join(glob.escape(folder), "chunk-*.pt"))):  # escaped: a '[' in a path
        try:
            blob = torch.load(f, map_location="cpu", weights_only=True)
            pairs = list(zip(blob["keys"], blob["emb"]))
        except Exception as e:  # damaged on disk (chunks are written atomically): a cache re-encodes, not fails
            os.replace(f, f + ".damaged")
            print(f"uae: embedding cache chunk {f} is unreadable ({type(e).__name__}); moved aside to "
                  f"{os.path.basename(f)}.damaged, its texts are encoded again", file=sys.stderr)
            continue
        for k, e in pairs:
            out[k] = e
    return out


def _save(folder: str, keys, emb: torch.Tensor) -> None:
    os.makedirs(folder, exist_ok=True)
    n = len(glob.glob(os.path.join(glob.escape(folder), "chunk-*.pt")))
    path = os.path.join(folder, f"chunk-{n:05d}-{os.getpid()}-{time.time_ns()}.pt")
    from .data import _remove_orphans, atomic_write

    for left in glob.glob(os.path.join(glob.escape(folder), "chunk-*.pt.tmp*")):  # killed encodes' chunks
        _remove_orphans(left[: left.rindex(".tmp")])

    with atomic_write(path, "wb") as f:
        torch.save({"keys": list(keys), "emb": emb.contiguous()}, f)


def encode_cached(encoder, texts: Sequence[str], *, cache_dir: Optional[str], model_path: Optional[str] = None,
                  batch_size: int = 64, progress: bool = False, max_seconds: Optional[float] = None,
                  chunk: int = 1024) -> torch.Tensor:
    """``encoder.encode(texts)`` [N, dim] float32 of passages (a BiEncoder's document prompt), reading and filling
    ``cache_dir`` (None: no cache).

    The cache folder is :func:`cache_key` of ``encoder`` (``model_path`` only names a non-BiEncoder's folder).

    ``max_seconds``: stop after about this long, keep what was encoded, raise :class:`Incomplete`.
    """
    from .student import BiEncoder

    kw = {"role": "document"} if isinstance(encoder, BiEncoder) else {}  # the texts are passages
    if cache_dir is None:
        return encoder.encode(list(texts), batch_size=batch_size, show_progress=progress, **kw)
    folder = os.path.join(os.fspath(cache_dir), cache_key(encoder, model_path))
    have = _load(folder)
    keys = [_text_key(t) for t in texts]
    todo: Dict[str, str] = {}
    for k, t in zip(keys, texts):
        if k not in have and k not in todo:
            todo[k] = t
    t0 = time.perf_counter()
    items = list(todo.items())
    bar = None
    if progress and len(items) > chunk:  # one bar over every new text, not one per saved chunk
        from tqdm.auto import tqdm

        bar = tqdm(total=len(items), desc="encode (cached)", unit="text")
    try:
        for s in range(0, len(items), chunk):
            part = items[s:s + chunk]
            emb = encoder.encode([t for _, t in part], batch_size=batch_size, show_progress=progress and bar is None, **kw)
            _save(folder, [k for k, _ in part], emb)
            have.update(zip([k for k, _ in part], emb))
            if bar is not None:
                bar.update(len(part))
            if max_seconds is not None and time.perf_counter() - t0 > max_seconds and s + chunk < len(items):
                raise Incomplete(f"encoded {s + len(part)} of {len(items)} new texts in {time.perf_counter() - t0:.0f} s; "
                                 f"run again to continue")
    finally:
        if bar is not None:
            bar.close()
    if not keys:
        return torch.empty(0, encoder.dim)
    return torch.stack([have[k] for k in keys])
