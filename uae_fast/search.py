"""``uae index build`` and ``uae search``: a passage index on disk, queried from the command line.

``uae index build --model M --data D --out IDX [--lexical] [--fusion F]`` embeds every passage of ``D``
with the encoder ``M`` and writes the folder ``IDX``: the dense :class:`uae_fast.TopKIndex`
(``dense.uae``), with ``--lexical`` also the BM25 side (``lexical.uae``, a :class:`uae_fast.hybrid.HybridIndex`
with fusion config ``F`` or the default), the passages' ids and texts (``passages.uae``, same checksummed
container) and the manifest ``hybrid.json``, which records the encoder's path so ``uae search IDX
"question"`` can embed the question with the same model.
"""
from __future__ import annotations

import json
import os
import sys
import textwrap
import unicodedata
from typing import List, Optional, Tuple


PASSAGES = "passages.uae"
_PASSAGES_KIND = "passages"


def write_passages(path: str, pids: List[str], texts: List[str]) -> None:
    """The passage store: string ids and texts of rows 0..N-1 (crc32-checked sections)."""
    from .index import _write_file
    from .lexical import pack_strings

    pb, pe = pack_strings(pids)
    tb, te = pack_strings(texts)
    _write_file(path, {"kind": _PASSAGES_KIND, "ntotal": len(pids)}, {"pid": pb, "pid_ends": pe, "text": tb, "text_ends": te})


def read_passages(path: str) -> Tuple[List[str], List[str]]:
    from .index import _read_file
    from .lexical import unpack_strings

    header, a = _read_file(path, mmap=False, verify=True)
    if header.get("kind") != _PASSAGES_KIND or any(k not in a for k in ("pid", "pid_ends", "text", "text_ends")):
        raise ValueError(f"{path} is not a passage store written by uae index build")
    try:
        pids, texts = unpack_strings(a["pid"], a["pid_ends"]), unpack_strings(a["text"], a["text_ends"])
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not a valid passage store ({e})") from None
    if len(pids) != len(texts) or len(pids) != int(header.get("ntotal", -1)):
        raise ValueError(f"{path} is not a valid passage store (ids and texts differ in number)")
    return pids, texts


def build_index(data: str, out: str, *, model: Optional[str] = None, lexical: bool = False, fusion=None,
                dtype: str = "float32", batch_size: int = 64, embedding_cache: Optional[str] = None,
                device=None, progress: bool = True):
    """Embed every passage of ``data`` and write the index folder ``out``; returns the index."""
    from .cli import check_output_path
    from .data import load_corpus
    from .embcache import encode_cached, encoder_fingerprint
    from .hybrid import MANIFEST, FORMAT, HybridIndex, write_manifest
    from .index import TopKIndex
    from .student import BiEncoder

    out = os.fspath(out)
    check_output_path(out, "--out", folder=True)
    ours = {MANIFEST, "dense.uae", "lexical.uae", PASSAGES}
    if os.path.isdir(out) and os.listdir(out) and not ours & set(os.listdir(out)):
        raise ValueError(f"--out {out} is a folder with other files and no index ({MANIFEST}); choose another --out")
    if embedding_cache is not None:  # a bad cache folder fails now, not after the first encoded chunk
        check_output_path(embedding_cache, "--embedding-cache", folder=True)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:  # before the encoder loads
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    passages = load_corpus(data)
    if fusion is not None and not lexical:
        raise ValueError("--fusion needs --lexical (a dense-only index fuses nothing)")
    # a bad --dtype or --fusion fails now, not after every passage was encoded
    if lexical:
        fusion = HybridIndex(1, fusion, dtype=dtype).fusion  # read (and checked) once
    else:
        TopKIndex(1, dtype=dtype)
    pids = list(passages)
    texts = [passages[p].text for p in pids]
    enc = BiEncoder(model, device=device)
    emb = encode_cached(enc, texts, cache_dir=embedding_cache, model_path=model, batch_size=batch_size, progress=progress)
    # what the encoder's files hold and its settings (not its path: a copied folder keeps it): search refuses a
    # model changed since the build
    meta = {"model": os.path.abspath(model) if model else None, "data": os.path.abspath(data), "passages": PASSAGES,
            "encoder": encoder_fingerprint(enc)}
    os.makedirs(out, exist_ok=True)
    # Rebuilt in place, manifest last: the old manifest goes first, so until the new one lands the folder is no
    # index (a crash mid-rebuild is "no index" on open, never the old manifest over new files); every file is
    # written to a temporary name and renamed. Other files in the folder are left alone.
    manifest_path = os.path.join(out, MANIFEST)
    if os.path.exists(manifest_path):
        os.remove(manifest_path)
    write_passages(os.path.join(out, PASSAGES), pids, texts)
    if lexical:
        index = HybridIndex(enc.dim, fusion, dtype=dtype)
        index.add(emb, texts)
        index.meta = meta
        index.save(out)
    else:
        index = TopKIndex(enc.dim, dtype=dtype)
        index.add(emb)
        index.save(os.path.join(out, "dense.uae"))
        if os.path.exists(os.path.join(out, "lexical.uae")):  # a hybrid index's BM25 side, not part of this one
            os.remove(os.path.join(out, "lexical.uae"))
        write_manifest(out, {"format": FORMAT, "dim": enc.dim, "ntotal": len(index), "fusion": None, "meta": meta,
                             "files": {"dense": "dense.uae"}})
    return index


def open_index(folder: str, fusion=None):
    """(index, manifest meta, passage ids, texts) of a folder written by :func:`build_index`."""
    from .fusion import read_json
    from .hybrid import FORMAT, MANIFEST, HybridIndex
    from .index import TopKIndex

    mpath = os.path.join(folder, MANIFEST)
    if not os.path.exists(mpath):
        raise FileNotFoundError(f"no index at {folder} (missing {MANIFEST}); build one with uae index build")
    manifest = read_json(mpath, "index manifest")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not isinstance(manifest.get("files"), dict):
        raise ValueError(f"{mpath} is not an index manifest written by uae index build (format {FORMAT!r}); "
                         f"rebuild the index")
    missing = [n for n in ("dense.uae", *(("lexical.uae",) if "lexical" in manifest["files"] else ()), PASSAGES)
               if not os.path.isfile(os.path.join(folder, n))]
    if missing:
        raise ValueError(f"{folder} is incomplete ({', '.join(missing)} missing); rebuild it with uae index build")
    if "lexical" in manifest["files"]:
        index = HybridIndex.load(folder, fusion)
    else:
        if fusion is not None:
            raise ValueError(f"{folder} was built without --lexical: --fusion does not apply")
        index = TopKIndex.load(os.path.join(folder, "dense.uae"), verify=True)  # as HybridIndex.load does
        if (manifest.get("dim"), manifest.get("ntotal")) != (index.dim, len(index)):
            raise ValueError(f"{folder}: dense.uae holds {len(index)} vectors of dim {index.dim}, the manifest says "
                             f"{manifest.get('ntotal')} of dim {manifest.get('dim')}; rebuild the index")
    pids, texts = read_passages(os.path.join(folder, PASSAGES))
    if len(pids) != len(index):
        raise ValueError(f"{folder}: the passage store holds {len(pids)} passages, the index {len(index)}")
    meta = manifest.get("meta")
    return index, dict(meta) if isinstance(meta, dict) else {}, pids, texts


def search(folder: str, questions: List[str], k: int = 10, *, fusion=None, model: Optional[str] = None, device=None):
    """``[(score, passage id, text), ...]`` per question, best first."""
    from .hybrid import HybridIndex
    from .student import BiEncoder

    from .embcache import encoder_fingerprint

    questions = list(questions)
    blank = [i for i, q in enumerate(questions) if not isinstance(q, str) or not q.strip()]
    if blank:
        raise ValueError(f"question {blank[0] + 1} is empty: nothing to search for")
    index, meta, pids, texts = open_index(folder, fusion)
    recorded = meta.get("model")
    if model is None and recorded is not None:
        if not isinstance(recorded, str):
            raise ValueError(f"{folder}: its manifest's model {recorded!r} is not a folder path; pass --model")
        if not os.path.isdir(recorded):
            raise ValueError(f"{folder} was built with the encoder {recorded}, which is no longer there: pass --model "
                             f"(the same model, moved), or rebuild the index")
    enc = BiEncoder(model or recorded, device=device)
    if (model is None and meta.get("encoder") and encoder_fingerprint(enc) != meta["encoder"]
            and encoder_fingerprint(enc, legacy=True) != meta["encoder"]):  # legacy: indexes built before 0.2.0
        raise ValueError(f"the model {meta.get('model') or '(default student)'} changed since {folder} was built "
                         f"(its files or settings differ): rebuild the index, or pass --model to search with it anyway")
    if enc.dim != index.dim:
        raise ValueError(f"the encoder gives {enc.dim}-dimensional vectors, the index holds {index.dim}")
    q = enc.encode(list(questions), role="query")
    k = min(k, len(index))
    scores, ids = index.search(q, list(questions), k) if isinstance(index, HybridIndex) else index.search(q, k)
    return [[(float(s), pids[i], texts[i]) for s, i in zip(srow.tolist(), irow.tolist()) if i >= 0]
            for srow, irow in zip(scores, ids)]


# ------------------------------------------------------------------------------------------ CLI
def add_parser(subparsers) -> None:
    p = subparsers.add_parser("index", help="build a passage index (dense, or hybrid with --lexical)")
    sub = p.add_subparsers(dest="index_command", metavar="ACTION")
    b = sub.add_parser("build", help="embed a dataset's passages and write an index folder",
                       description="Embeds every passage of --data with --model and writes the index folder --out.")
    b.add_argument("--data", required=True, help="passages: QASPER or SQuAD JSON(.gz), the JSONL schema or a BEIR folder (required)")
    b.add_argument("--model", default=None, help="encoder folder, recorded for uae search (default: the untrained student)")
    b.add_argument("--out", required=True, help="index folder to write (required)")
    b.add_argument("--lexical", action="store_true", help="also build the BM25 side: a hybrid index (default: dense only)")
    b.add_argument("--fusion", default=None, help="fusion JSON from uae calibrate-fusion, with --lexical (default: the built-in default)")
    b.add_argument("--dtype", default="float32", help="dense storage: float32, bfloat16 or int8 (default: float32)")
    b.add_argument("--batch-size", type=int, default=64, help="encoder batch size (default: 64)")
    b.add_argument("--embedding-cache", default=None, metavar="DIR", help="reuse passage embeddings kept in DIR (default: none)")
    b.add_argument("--device", default=None, help="torch device for the encoder (default: cuda if available, else cpu)")
    b.add_argument("--no-progress", action="store_true", help="no progress bar (default: shown)")
    b.set_defaults(func=_build)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])

    s = subparsers.add_parser("search", help="query an index folder: ranked passages for a question",
                              description="Embeds the question with the index's encoder and prints the top passages.")
    s.add_argument("index", help="index folder written by uae index build")
    s.add_argument("question", nargs="+", help="question text (several arguments: several questions)")
    s.add_argument("-k", type=int, default=10, help="passages to print per question (default: 10)")
    s.add_argument("--fusion", default=None, help="fusion JSON overriding the index's config (default: the one saved)")
    s.add_argument("--model", default=None, help="encoder folder overriding the one recorded in the index (default: recorded)")
    s.add_argument("--width", type=int, default=200, help="characters of each passage to print (default: 200)")
    s.add_argument("--json", action="store_true", help="print JSON lines instead of text (default: text)")
    s.set_defaults(func=_search)


def _build(args) -> int:
    index = build_index(args.data, args.out, model=args.model, lexical=args.lexical, fusion=args.fusion, dtype=args.dtype,
                        batch_size=args.batch_size, embedding_cache=args.embedding_cache, device=args.device,
                        progress=not args.no_progress)
    print(f"{type(index).__name__} of {len(index)} passages -> {args.out}", file=sys.stderr)
    return 0


def _search(args) -> int:
    if args.k < 1:
        raise ValueError(f"-k must be >= 1, got {args.k}")
    if args.width < 10:  # textwrap.shorten needs room for the placeholder
        raise ValueError(f"--width must be >= 10 characters, got {args.width}")
    for question, hits in zip(args.question, search(args.index, args.question, args.k, fusion=args.fusion, model=args.model)):
        if args.json:
            print(json.dumps({"question": question, "hits": [{"score": s, "id": p, "text": t} for s, p, t in hits]}))
            continue
        print(f"Q: {question}")
        for r, (score, pid, text) in enumerate(hits, 1):
            print(f"{r:>3}. {score:8.4f}  {_printable(pid)}  "
                  f"{textwrap.shorten(_printable(text), args.width, placeholder=' ...')}")
    return 0


def _printable(s: str) -> str:
    """Control characters (an escape sequence in a stored passage could drive the terminal) shown as spaces;
    --json output escapes them instead."""
    return "".join(" " if unicodedata.category(c) == "Cc" else c for c in s)
