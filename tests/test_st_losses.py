"""sentence-transformers losses (UtilityInfoNCELoss, CachedUtilityInfoNCELoss) and `uae export`.

Oracles: MultipleNegativesRankingLoss for one-hot targets, a float64 dense formula for soft/NaN targets,
the uncached loss for the cached one, the single-process loss for gloo DDP with gathered passages.
"""
import gc
import gzip
import json
import math
import os
from datetime import timedelta

import pytest
import torch

pytest.importorskip("sentence_transformers")

from test_student import make_tiny_encoder  # noqa: E402
from uae_fast.losses import CachedUtilityInfoNCELoss, UtilityInfoNCE, UtilityInfoNCELoss  # noqa: E402

HERE = os.path.dirname(__file__)
TRAIN = os.path.join(HERE, "fixtures", "qasper-train-mini.json.gz")
B, K = 5, 3


def _model(folder):
    from sentence_transformers import SentenceTransformer

    m = SentenceTransformer(str(folder), device="cpu")
    m.eval()  # no dropout: losses computed in different forward orders compare exactly
    return m


@pytest.fixture(scope="module")
def enc_dir(tmp_path_factory):
    return make_tiny_encoder(tmp_path_factory.mktemp("st") / "enc")


@pytest.fixture
def model(enc_dir):
    return _model(enc_dir)


def _texts(b=B, k=K, tag=""):
    """Distinct query and passage texts, columns (query, passage_0..k-1)."""
    words = "paper model data train test score answer question method result table figure".split()
    cols = [[f"what is the {words[i % 12]} {tag}{i}?" for i in range(b)]]
    for c in range(k):
        cols.append([f"the {words[(i + c) % 12]} of section {c} uses {words[(3 * i + c) % 12]} {tag}{i} {c}" for i in range(b)])
    return cols


def _features(model, cols):
    return [model.tokenize(texts) for texts in cols]


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _run(loss_fn, model, cols, labels):
    """Loss and parameter gradients; ``cols``: texts per column, or already tokenized features."""
    model.zero_grad(set_to_none=True)
    loss = loss_fn(cols if isinstance(cols[0], dict) else _features(model, cols), labels)
    loss.backward()
    return loss.detach(), _grads(model)


def _assert_grads_close(g, ref, tol=2e-5):
    """Every parameter's gradient, to ``tol`` of that parameter's largest reference gradient entry (the
    forwards differ in padding width and batching, i.e. in float summation order only)."""
    assert g.keys() == ref.keys() and len(g) > 5
    for n in ref:
        torch.testing.assert_close(g[n], ref[n], rtol=0, atol=tol * float(ref[n].abs().max()) + 1e-9,
                                   msg=lambda m: f"{n}: {m}")


def _mnrl():
    try:  # sentence-transformers >= 6 moved it; the old path still works there, with a deprecation warning
        from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    except ImportError:
        from sentence_transformers.losses import MultipleNegativesRankingLoss
    return MultipleNegativesRankingLoss


# ------------------------------------------------------------------------------------ oracles
@pytest.mark.parametrize("kind", ["nan", "none", "label_mix1", "dot"])
def test_one_hot_equals_mnrl(model, kind):
    from sentence_transformers.util import dot_score

    cols = _texts()
    tau = 1.0 if kind == "dot" else 0.1  # unnormalised dot products: scale 1, as sentence-transformers advises
    sim = {"similarity_fct": dot_score} if kind == "dot" else {}
    ref_loss, ref_g = _run(_mnrl()(model, scale=1 / tau, **sim), model, cols, None)
    if kind == "none":  # no labels column: passage_0 is the positive
        labels, mix = None, 0.0
    elif kind == "label_mix1":  # any utilities, all mass on the gold passage_0
        labels, mix = torch.randn(B, K), 1.0
    else:  # one utility per row, on passage_0; the rest NaN
        labels = torch.full((B, K), math.nan)
        labels[:, 0] = torch.randn(B)
        mix = 0.0
    loss, g = _run(UtilityInfoNCELoss(model, temperature=tau, label_mix=mix, **sim), model, cols, labels)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    _assert_grads_close(g, ref_g)


def _dense_reference(q, p, labels, tau, t_teacher, mix):
    """float64, [B, N] materialised; p column-major (passage (i, c) at c * B + i)."""
    q, p = torch.nn.functional.normalize(q.double(), dim=-1), torch.nn.functional.normalize(p.double(), dim=-1)
    b, k = labels.shape
    logp = torch.log_softmax(q @ p.T / tau, dim=1)
    total = 0.0
    for i in range(b):
        ok = [c for c in range(k) if not math.isnan(float(labels[i, c]))] or [0]
        u = torch.tensor([0.0 if math.isnan(float(labels[i, c])) else float(labels[i, c]) for c in ok], dtype=torch.float64)
        w = torch.softmax(u / t_teacher, 0) * (1 - mix)
        row = -sum(w[j] * logp[i, c * b + i] for j, c in enumerate(ok)) - mix * logp[i, i]
        total = total + row
    return total / b


def test_soft_and_nan_labels_match_dense_float64(model):
    cols = _texts()
    labels = torch.randn(B, K)
    labels[0, 1:] = math.nan  # one utility
    labels[1, :] = math.nan  # none: passage_0 stands in
    labels[2, 0] = math.nan  # gold unscored: only label_mix puts mass on it
    loss_fn = UtilityInfoNCELoss(model, temperature=0.07, teacher_temperature=0.3, label_mix=0.25)
    with torch.no_grad():
        emb = [model(f)["sentence_embedding"] for f in _features(model, cols)]
        got = loss_fn.compute_loss_from_embeddings(emb, labels)
        ref = _dense_reference(emb[0], torch.cat(emb[1:]), labels, 0.07, 0.3, 0.25)
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6)
        # a NaN candidate is still a negative: dropping an all-NaN column changes the loss
        unscored = labels.clone()
        unscored[:, -1] = math.nan
        with_col = loss_fn.compute_loss_from_embeddings(emb, unscored)
        assert with_col > loss_fn.compute_loss_from_embeddings(emb[:-1], unscored[:, :-1]) + 1e-3
        # and NaN differs from a zero utility (which would be a target)
        zero = loss_fn.compute_loss_from_embeddings(emb, labels.nan_to_num(0.0))
        assert not torch.allclose(zero, got)


def test_duplicate_passages_count_once(model):
    cols = _texts()
    cols[3][1] = cols[1][0]  # row 1's passage_2 is row 0's passage_0 (queries of one paper share paragraphs)
    labels = torch.randn(B, K)
    loss_fn = UtilityInfoNCELoss(model, temperature=0.1, teacher_temperature=0.5, label_mix=0.5)
    with torch.no_grad():
        emb = [model(f)["sentence_embedding"] for f in _features(model, cols)]
        got = loss_fn(_features(model, cols), labels)
        # reference: the duplicate is one passage; row 1's target at (1, col 2) points at the kept copy (0, col 0)
        q, p = emb[0], torch.cat(emb[1:])
        dup = 2 * B + 1
        keep = [j for j in range(p.shape[0]) if j != dup]
        remap = torch.full((p.shape[0],), -1, dtype=torch.long)
        remap[keep] = torch.arange(len(keep))
        remap[dup] = 0
        idx = (torch.arange(K)[None, :] * B + torch.arange(B)[:, None])
        ref = UtilityInfoNCE(0.1, 0.5, 0.5)(torch.nn.functional.normalize(q, dim=-1),
                                            torch.nn.functional.normalize(p[keep], dim=-1),
                                            remap[idx], labels, remap[torch.arange(B)])
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
        plain = UtilityInfoNCELoss(model, temperature=0.1, dedupe_passages=False)(_features(model, cols), labels)
        assert not torch.allclose(plain, got)


def test_bad_inputs_one_clear_error(model):
    cols = _texts()
    loss_fn = UtilityInfoNCELoss(model)
    feats = _features(model, cols)
    with pytest.raises(ValueError, match=r"labels must be \[batch, K\] = \[5, 3\]"):
        loss_fn(feats, torch.zeros(B, K + 1))
    with pytest.raises(ValueError, match=r"labels\[2, 1\] is inf"):
        bad = torch.zeros(B, K)
        bad[2, 1] = math.inf
        loss_fn(feats, bad)
    with pytest.raises(ValueError, match="needs the columns"):
        loss_fn(feats[:1], None)
    # columns of unequal rows would pair passages with the wrong queries (or index past the end)
    emb = [torch.randn(2, 8), torch.randn(3, 8), torch.randn(2, 8)]
    with pytest.raises(ValueError, match=r"passage column 0 has embeddings of shape \(3, 8\); every column needs "
                                         r"the query column's 2 rows"):
        loss_fn.compute_loss_from_embeddings(emb, torch.zeros(2, 2))
    with pytest.raises(ValueError, match="similarity_fct must be"):
        UtilityInfoNCELoss(model, similarity_fct=torch.nn.functional.cosine_similarity)
    with pytest.raises(ValueError, match="label_mix"):
        UtilityInfoNCELoss(model, label_mix=2.0)
    with pytest.raises(ValueError, match="mini_batch_size"):
        CachedUtilityInfoNCELoss(model, mini_batch_size=0)


def test_defaults_are_the_cli_defaults_and_config(model):
    from uae_fast.training import TrainConfig

    cfg = TrainConfig()
    for cls in (UtilityInfoNCELoss, CachedUtilityInfoNCELoss):
        loss = cls(model)
        d = loss.get_config_dict()
        assert (d["temperature"], d["teacher_temperature"], d["label_mix"]) == (
            cfg.temperature, cfg.teacher_temperature, cfg.label_mix)
        assert d["similarity_fct"] == "cos_sim" and "2604.22722" in loss.citation
    assert "2101.06983" in CachedUtilityInfoNCELoss(model).citation
    assert CachedUtilityInfoNCELoss(model, mini_batch_size=7).get_config_dict()["mini_batch_size"] == 7
    import uae_fast  # the top-level names: the trainer losses, and the embedding-level module

    assert uae_fast.UtilityInfoNCELoss is UtilityInfoNCELoss and uae_fast.UtilityInfoNCE is UtilityInfoNCE
    assert uae_fast.CachedUtilityInfoNCELoss is CachedUtilityInfoNCELoss


# ------------------------------------------------------------------------------------ GradCache
@pytest.mark.parametrize("mini_batch_size", [1, 2, 4])
def test_cached_equals_uncached(model, mini_batch_size):
    cols = _texts()
    labels = torch.randn(B, K)
    labels[1, 1:] = math.nan
    kw = dict(temperature=0.05, teacher_temperature=0.5, label_mix=0.3)
    ref_loss, ref_g = _run(UtilityInfoNCELoss(model, **kw), model, cols, labels)
    loss, g = _run(CachedUtilityInfoNCELoss(model, mini_batch_size=mini_batch_size, **kw), model, cols, labels)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    _assert_grads_close(g, ref_g)
    with torch.no_grad():  # evaluation: the loss without a cache
        torch.testing.assert_close(CachedUtilityInfoNCELoss(model, mini_batch_size=2, **kw)(_features(model, cols), labels),
                                   ref_loss, rtol=1e-5, atol=1e-6)


def test_matryoshka_wraps_the_cached_loss(model):
    # MatryoshkaLoss decorates a gradient-caching loss's calculate_loss (it used to crash in backward):
    # the same loss and gradients as wrapping the uncached loss.
    st_losses = pytest.importorskip("sentence_transformers.losses")
    try:
        from sentence_transformers.base.losses.gradcache import uses_gradient_cache  # noqa: F401 (>= 6)
    except ImportError:
        pytest.skip("this sentence-transformers has no gradient-cache contract")
    cols = _texts()
    labels = torch.randn(B, K)
    dims = [16, 8]
    ref_loss, ref_g = _run(st_losses.MatryoshkaLoss(model, UtilityInfoNCELoss(model), dims), model, cols, labels)
    loss, g = _run(st_losses.MatryoshkaLoss(model, CachedUtilityInfoNCELoss(model, mini_batch_size=2), dims), model, cols, labels)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    _assert_grads_close(g, ref_g)


def test_cached_refuses_a_static_embedding_model(enc_dir):
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.models import StaticEmbedding
    from tokenizers import Tokenizer

    static = SentenceTransformer(modules=[StaticEmbedding(Tokenizer.from_file(os.path.join(enc_dir, "tokenizer.json")), embedding_dim=8)],
                                 device="cpu")
    with pytest.raises(ValueError, match="does not work with a StaticEmbedding model"):
        CachedUtilityInfoNCELoss(static)
    UtilityInfoNCELoss(static)  # the uncached loss is fine


def test_cached_replays_dropout(model):
    # Train mode: one mini-batch per column draws the same dropout masks as the uncached forward (same seed,
    # same order), so the losses agree; the gradients agree only if step 3 replays step 1's RNG state.
    model.train()
    cols = _texts()
    labels = torch.randn(B, K)
    torch.manual_seed(7)
    ref_loss, ref_g = _run(UtilityInfoNCELoss(model), model, cols, labels)
    torch.manual_seed(7)
    loss, g = _run(CachedUtilityInfoNCELoss(model, mini_batch_size=B), model, cols, labels)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    _assert_grads_close(g, ref_g)
    torch.manual_seed(8)  # a different draw is a different loss: dropout is really on
    other, _ = _run(UtilityInfoNCELoss(model), model, cols, labels)
    assert not torch.allclose(other, ref_loss)


def test_cached_replays_each_mini_batch_dropout(model):
    # Mini-batches smaller than a column: the reference embeds the same slices in the same order under the
    # same seed with a graph, so it draws the masks step 1 drew; the gradients agree only if every replayed
    # mini-batch reuses its own RNG state (not, say, its column's first).
    from uae_fast.losses.cached_utility_infonce import _slice

    model.train()
    cols, labels = _texts(), torch.randn(B, K)
    feats = _features(model, cols)
    ranges = [(0, 2), (2, 4), (4, 5)]
    ref = UtilityInfoNCELoss(model)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(11)
    emb = [torch.cat([model(_slice(f, s, e))["sentence_embedding"] for s, e in ranges]) for f in feats]
    ref_loss = ref.compute_loss_from_embeddings(emb, labels, ref.passage_keys(feats))
    ref_loss.backward()
    ref_g = _grads(model)
    torch.manual_seed(11)
    loss, g = _run(CachedUtilityInfoNCELoss(model, mini_batch_size=2), model, cols, labels)  # same tokens
    torch.testing.assert_close(loss, ref_loss.detach(), rtol=1e-5, atol=1e-6)
    _assert_grads_close(g, ref_g)


def test_cached_float64_model_keeps_float64_gradients(enc_dir):
    # the replay's surrogate runs in the model's float64, so cached and uncached agree to float64 rounding
    m = _model(enc_dir).double()
    cols, labels = _texts(), torch.randn(B, K, dtype=torch.float64)
    ref_loss, ref_g = _run(UtilityInfoNCELoss(m), m, cols, labels)
    loss, g = _run(CachedUtilityInfoNCELoss(m, mini_batch_size=2), m, cols, labels)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
    _assert_grads_close(g, ref_g, tol=1e-10)


class _BagEncoder(torch.nn.Module):
    """A stand-in for a FlashAttention-2 model: mean of token vectors per text, from padded features
    (``attention_mask``) or flattened ones (ids [1, tokens] split by ``cu_seq_lens_q``), as
    sentence-transformers >= 6 feeds them when it can skip padding."""

    def __init__(self, vocab=200, dim=12):
        super().__init__()
        self.emb, self.proj, self.drop = torch.nn.Embedding(vocab, dim), torch.nn.Linear(dim, dim), torch.nn.Dropout(0.2)

    def forward(self, f):
        h = self.proj(self.drop(self.emb(f["input_ids"])))
        if "cu_seq_lens_q" in f:
            cu = f["cu_seq_lens_q"].tolist()
            out = torch.stack([h[0, s:e].mean(0) for s, e in zip(cu[:-1], cu[1:])])
        else:
            m = f["attention_mask"][..., None].to(h.dtype)
            out = (h * m).sum(1) / m.sum(1)
        return {"sentence_embedding": out}


def _padded_and_flat(rows):
    """The same texts (lists of token ids) as padded features and as DataCollatorWithFlattening's."""
    width = max(map(len, rows))
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    cu = torch.tensor([0] + [sum(map(len, rows[:i + 1])) for i in range(len(rows))], dtype=torch.int32)
    flat = {"input_ids": torch.tensor([[t for r in rows for t in r]]),
            "position_ids": torch.tensor([[i for r in rows for i in range(len(r))]]),
            "cu_seq_lens_q": cu, "cu_seq_lens_k": cu.clone(), "max_length_q": width, "max_length_k": width,
            "seq_idx": torch.tensor([[j for j, r in enumerate(rows) for _ in r]])}
    return {"input_ids": ids, "attention_mask": mask}, flat


@pytest.mark.parametrize("cached", [False, True])
def test_flattened_inputs_equal_padded(cached):
    # sentence-transformers >= 6 flattens text inputs for FlashAttention-2 models: the duplicate-passage keys
    # and the cached loss's mini-batches must read them as the padded features they stand for.
    from uae_fast.losses.st_utility_infonce import _token_keys

    g = torch.Generator().manual_seed(3)
    cols = [[torch.randint(1, 200, (int(n),), generator=g).tolist() for n in torch.randint(2, 9, (B,), generator=g)]
            for _ in range(K + 1)]
    cols[2][3] = list(cols[1][0])  # a duplicate passage
    pairs = [_padded_and_flat(rows) for rows in cols]
    assert _token_keys([p for p, _ in pairs[1:]]) == _token_keys([f for _, f in pairs[1:]])
    keys = _token_keys([p for p, _ in pairs[1:]])
    assert len(keys) == B * K and len(set(keys)) == B * K - 1 and all(len(k) == 16 for k in keys)
    enc = _BagEncoder().eval()
    labels = torch.randn(B, K)
    make = (lambda: CachedUtilityInfoNCELoss(enc, mini_batch_size=2)) if cached else (lambda: UtilityInfoNCELoss(enc))
    ref_loss, ref_g = _run(make(), enc, [p for p, _ in pairs], labels)
    loss, got = _run(make(), enc, [f for _, f in pairs], labels)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    assert got.keys() == ref_g.keys()
    for n in ref_g:
        torch.testing.assert_close(got[n], ref_g[n], rtol=0, atol=1e-5 * float(ref_g[n].abs().max()))
    if cached:  # train mode: each flattened mini-batch's replay reuses its own dropout draw
        from uae_fast.losses.cached_utility_infonce import _slice

        enc.train()
        flat = [f for _, f in pairs]
        ref = UtilityInfoNCELoss(enc)
        enc.zero_grad(set_to_none=True)
        torch.manual_seed(5)
        emb = [torch.cat([enc(_slice(f, s, e))["sentence_embedding"] for s, e in ((0, 2), (2, 4), (4, 5))]) for f in flat]
        ref_loss = ref.compute_loss_from_embeddings(emb, labels, ref.passage_keys(flat))
        ref_loss.backward()
        ref_g = _grads(enc)
        torch.manual_seed(5)
        loss, got = _run(make(), enc, flat, labels)
        torch.testing.assert_close(loss, ref_loss.detach(), rtol=1e-6, atol=1e-6)
        for n in ref_g:
            torch.testing.assert_close(got[n], ref_g[n], rtol=0, atol=1e-5 * float(ref_g[n].abs().max()))


def test_cached_replay_shape_mismatch_is_one_clear_error(model):
    # a wrapper that changes the embeddings between the cached forward and the replay (old MatryoshkaLoss)
    loss_fn = CachedUtilityInfoNCELoss(model, mini_batch_size=2)
    feats, labels = _features(model, _texts()), torch.randn(B, K)
    loss = loss_fn(feats, labels)
    class Truncating(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, f):
            return {"sentence_embedding": self.m(f)["sentence_embedding"][:, :4]}

    loss_fn.model = Truncating(model)
    with pytest.raises(RuntimeError, match="cached gradient is"):
        loss.backward()


def test_cached_accepts_a_compiled_model_and_refuses_a_wrapped_static_embedding(enc_dir, model):
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.models import StaticEmbedding
    from tokenizers import Tokenizer

    class Compiled(torch.nn.Module):  # torch.compile's OptimizedModule: not iterable, the model in _orig_mod
        def __init__(self, m):
            super().__init__()
            self._orig_mod = m

        def __iter__(self):
            raise TypeError("not iterable")

    CachedUtilityInfoNCELoss(Compiled(model))
    static = StaticEmbedding(Tokenizer.from_file(os.path.join(enc_dir, "tokenizer.json")), embedding_dim=8)
    wrapped = SentenceTransformer(modules=[torch.nn.Sequential(static)], device="cpu")
    with pytest.raises(ValueError, match="does not work with a StaticEmbedding model"):
        CachedUtilityInfoNCELoss(Compiled(wrapped))


# ------------------------------------------------------------------------------------ export + trainer
@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from test_training import write_utilities
    from uae_fast.cli import main
    from uae_fast.data import load_dataset

    pytest.importorskip("datasets")
    tmp = tmp_path_factory.mktemp("export")
    ds = load_dataset(TRAIN)
    full = write_utilities(tmp / "full.jsonl.gz", ds)
    # a partial table, so every label kind occurs: 3 questions unscored, odd non-gold paragraphs unscored
    gold = {q.id: set(q.gold) for q in ds.queries}
    drop_q = sorted(q.id for q in ds.queries if q.gold)[:3]
    with gzip.open(full, "rt") as f:
        recs = [json.loads(line) for line in f]
    keep = [r for r in recs if "qid" not in r or (r["qid"] not in drop_q and (r["pid"] in gold[r["qid"]]
                                                                            or int(r["pid"].rsplit(":", 1)[1]) % 2 == 0))]
    utils = str(tmp / "u.jsonl.gz")
    with gzip.open(utils, "wt") as f:
        f.write("".join(json.dumps(r) + "\n" for r in keep))
    assert main(["export", "--utilities", utils, "--data", TRAIN, "--out", str(tmp / "ds"), "--passages-per-query", "4"]) == 0
    return tmp / "ds", utils


def test_export_output_folder(exported, tmp_path, capsys):
    from uae_fast.cli import main

    out, utils = exported
    before = sorted(os.listdir(out))
    (out / "README.md.tmp123.456").write_text("left by a killed export")
    # a second export into its own folder replaces it (and a killed one's temporary file goes); a folder with
    # other files (a model) is refused untouched
    capsys.readouterr()
    assert main(["export", "--utilities", utils, "--data", TRAIN, "--out", str(out), "--passages-per-query", "4"]) == 0
    assert sorted(os.listdir(out)) == before == ["README.md", "train.parquet"]
    assert "uae export: 3 of" in capsys.readouterr().err  # the fixture's table leaves 3 questions unscored
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "README.md").write_text("my model card")
    capsys.readouterr()
    assert main(["export", "--utilities", utils, "--data", TRAIN, "--out", str(model)]) == 1
    assert "not an export (config.json)" in capsys.readouterr().err and (model / "README.md").read_text() == "my model card"
    assert main(["export", "--utilities", utils, "--data", TRAIN, "--out", utils]) == 1
    assert "is a file" in capsys.readouterr().err


def test_export_columns_and_labels(exported, tmp_path):
    import datasets

    from uae_fast.data import load_dataset
    from uae_fast.training import load_utilities

    out, utils = exported
    d = datasets.load_dataset(str(out), split="train", cache_dir=str(tmp_path / "hf"))  # no stale cache
    assert d.column_names == ["query", "passage_0", "passage_1", "passage_2", "passage_3", "label"]
    ds = load_dataset(TRAIN)
    u, _ = load_utilities(utils)
    by_q = {q.question: q for q in ds.queries}
    by_text = {p.text: pid for pid, p in ds.passages.items()}
    with_gold = [q for q in ds.queries if q.gold]  # unscored ones too: their gold passages at utility 0
    assert len(d) == len(with_gold)
    unscored, kinds = 0, set()
    for row in d:
        q = by_q[row["query"]]
        pids = [by_text[row[f"passage_{c}"]] for c in range(4)]
        assert pids[0] in q.gold and len(set(pids)) == 4
        scored = u.get(q.id) or {}
        unscored += not scored
        for pid, lab in zip(pids, row["label"]):
            if pid in scored:
                assert lab == pytest.approx(scored[pid], rel=1e-6)
            elif not scored and pid in q.gold:  # as uae train targets an unscored query's gold passages
                assert lab == 0.0
            else:
                assert math.isnan(lab)
        kinds.update("scored" if pid in scored else "unscored gold" if not scored and pid in q.gold else "no label"
                     for pid in pids)
    assert unscored == 3 and kinds == {"scored", "unscored gold", "no label"}, (unscored, kinds)
    # the card counts the teacher's utilities only (an unscored query's gold zeros are not the teacher's)
    n_util = sum(by_text[row[f"passage_{c}"]] in (u.get(by_q[row["query"]].id) or {}) for row in d for c in range(4))
    card = (out / "README.md").read_text()
    assert f"{n_util / (4 * len(d)):.0%} of\nthe passages carry a teacher utility; 3 queries have none" in card, card


def test_export_unscored_query_targets_all_its_gold_passages():
    # uae train gives an unscored query every gold passage of its batch at utility 0 (a uniform target over
    # them); an exported row must do the same, or a second gold drawn into passage_1.. would be a negative
    from uae_fast.data import load_dataset
    from uae_fast.export import export_rows

    ds = load_dataset(TRAIN)
    q = next(q for q in ds.queries if len(q.gold) >= 2)
    other = next(o for o in ds.queries if o.gold and o.id != q.id)
    utilities = {other.id: {other.gold[0]: 1.0}}  # another query scored, q not
    cols, _ = export_rows(ds, utilities, passages_per_query=len(ds.pool(q)))  # the whole paper: every gold drawn
    row = cols["query"].index(q.question)
    texts = [cols[f"passage_{c}"][row] for c in range(len(ds.pool(q)))]
    gold_texts = {ds.passages[g].text for g in q.gold}
    labels = cols["label"][row]
    assert sum(t in gold_texts for t in texts) >= 2
    assert all((lab == 0.0) if t in gold_texts else math.isnan(lab) for t, lab in zip(texts, labels))


def test_export_tops_up_short_papers_with_other_papers(exported):
    from uae_fast.data import load_dataset
    from uae_fast.export import export_rows
    from uae_fast.training import load_utilities

    ds = load_dataset(TRAIN)
    u, _ = load_utilities(exported[1])
    k = 1 + max(len(ds.pool(q)) for q in ds.queries)  # wider than any paper
    cols, skipped = export_rows(ds, u, passages_per_query=k, seed=1)
    by_text = {p.text: pid for pid, p in ds.passages.items()}
    by_q = {q.question: q for q in ds.queries}
    assert skipped == sum(1 for q in ds.queries if not q.gold) and len(cols["query"]) > 0
    for i, question in enumerate(cols["query"]):
        q = by_q[question]
        pids = [by_text[cols[f"passage_{c}"][i]] for c in range(k)]
        pool = set(ds.pool(q))
        assert len(set(pids)) == k and set(pids[:len(pool)]) == pool  # the whole paper, then other papers'
        assert all(math.isnan(x) for x in cols["label"][i][len(pool):])
    with pytest.raises(ValueError, match="passages_per_query must be a positive int"):
        export_rows(ds, u, passages_per_query=0)
    # explicit candidates that leave out a gold: the top-up never puts that gold (or a candidate) in a column
    from uae_fast.data import Passage, Query, RetrievalDataset

    psg = {f"d{j}:{i}": Passage(f"d{j}:{i}", f"d{j}", f"text {j} {i}") for j in range(3) for i in range(3)}
    qs = [Query("q", "?", ["a"], ["d0:0", "d0:1"], candidates=["d0:0", "d0:2"])]
    small = RetrievalDataset(psg, qs, "small")
    for seed in range(20):
        cols, _ = export_rows(small, {"q": {"d0:2": 1.0}}, passages_per_query=5, seed=seed)
        pids = [cols[f"passage_{c}"][0].replace("text ", "d").replace(" ", ":") for c in range(5)]
        assert pids[0] in qs[0].gold and len(set(pids)) == 5, pids
        assert not set(pids[1:]) & {"d0:0", "d0:1"} and set(pids[2:]) <= {f"d{j}:{i}" for j in (1, 2) for i in range(3)}, pids


def test_export_cli_errors(tmp_path, exported, capsys):
    from uae_fast.cli import main

    _, utils = exported
    dev = os.path.join(HERE, "fixtures", "qasper-dev-mini.json.gz")
    assert main(["export", "--utilities", utils, "--data", dev, "--out", str(tmp_path / "x")]) == 1
    assert "uae export: error: utilities file" in capsys.readouterr().err
    assert main(["export", "--utilities", str(tmp_path / "nope.jsonl"), "--data", TRAIN, "--out", str(tmp_path / "x")]) == 1


def test_export_reads_a_beir_folders_train_split(tmp_path, capsys):
    # as uae train does: the folder's default split (test) is what uae eval judges
    import datasets

    from uae_fast.cli import main

    beir = tmp_path / "beir"
    (beir / "qrels").mkdir(parents=True)
    (beir / "corpus.jsonl").write_text("".join(json.dumps({"_id": f"d{i}", "text": f"passage {i}"}) + "\n" for i in range(6)))
    (beir / "queries.jsonl").write_text("".join(json.dumps({"_id": q, "text": t}) + "\n"
                                                for q, t in (("q0", "the train question"), ("q1", "the test question"))))
    (beir / "qrels" / "test.tsv").write_text("q1\td2\t1\n")
    utils = tmp_path / "u.jsonl"
    utils.write_text(json.dumps({"qid": "q0", "pid": "d1", "utility": 1.0}) + "\n")
    args = ["export", "--utilities", str(utils), "--data", str(beir), "--out", str(tmp_path / "x"), "--passages-per-query", "2"]
    assert main(args) == 1 and "has no qrels/train.tsv" in capsys.readouterr().err
    (beir / "qrels" / "train.tsv").write_text("q0\td1\t1\n")
    assert main(args) == 0
    d = datasets.load_dataset(str(tmp_path / "x"), split="train", cache_dir=str(tmp_path / "hf"))
    assert d["query"] == ["the train question"] and d["passage_0"] == ["passage 1"]


@pytest.mark.parametrize("cached", [False, True])
def test_trainer_two_steps_on_exported_data(exported, enc_dir, tmp_path, cached):
    import datasets
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, SentenceTransformerTrainingArguments

    out, _ = exported
    train = datasets.load_dataset(str(out), split="train", cache_dir=str(tmp_path / "hf"))  # no stale cache
    model = SentenceTransformer(enc_dir, device="cpu")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss = CachedUtilityInfoNCELoss(model, mini_batch_size=3) if cached else UtilityInfoNCELoss(model)
    args = SentenceTransformerTrainingArguments(str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=4,
                                                learning_rate=1e-3, report_to="none", save_strategy="no",
                                                logging_steps=1, use_cpu=True, dataloader_num_workers=0, seed=0)
    seen, forward = [], loss.forward

    def spy(features, labels):  # the export's `label` column reaches the loss as its utilities
        seen.append(None if labels is None else tuple(labels.shape))
        return forward(features, labels)
    loss.forward = spy
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=train, loss=loss)
    result = trainer.train()
    assert result.global_step == 2 and math.isfinite(result.training_loss)
    assert seen and all(x == (4, 4) for x in seen), seen
    changed = [n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert len(changed) > 5


# ------------------------------------------------------------------------------------ DDP (gloo)
WORLD = 2
GLOO_TIMEOUT = timedelta(seconds=120)  # a rank that dies mid-collective fails the test instead of hanging it


def _ddp_worker(rank, enc_dir, init_file, out_dir):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=GLOO_TIMEOUT)
    try:
        model = _model(enc_dir)
        labels = _ddp_labels()[rank * B:(rank + 1) * B]
        res = {}
        for texts, tag in ((_texts(WORLD * B), ""), (_dup_texts(), "-dup")):
            cols = [c[rank * B:(rank + 1) * B] for c in texts]
            for name, loss_fn in (("plain", UtilityInfoNCELoss(model, gather_across_devices=True)),
                                  ("cached", CachedUtilityInfoNCELoss(model, mini_batch_size=2, gather_across_devices=True))):
                res[name + tag] = _run(loss_fn, model, cols, labels)
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _dup_texts():
    """The DDP batch with paragraphs shared across the ranks' rows (questions of one paper on two ranks): rank 1's
    rows hold copies of rank 0's passages, a gold (passage_0) and a scored candidate among them."""
    cols = _texts(WORLD * B)
    cols[2][B + 1] = cols[1][0]  # rank 1 row 1, passage_1 = rank 0 row 0's gold
    cols[1][B + 3] = cols[2][2]  # rank 1 row 3's gold = rank 0 row 2's passage_1
    return cols


def _ddp_labels():
    g = torch.Generator().manual_seed(3)
    labels = torch.randn(WORLD * B, K, generator=g)
    labels[1, 1:] = math.nan
    labels[B + 2, :] = math.nan
    return labels


@pytest.mark.slow  # ~15 s: two spawned processes import sentence-transformers
def test_ddp_gather_equals_single_process(enc_dir, tmp_path):
    from conftest import spawn_with_deadline

    spawn_with_deadline(_ddp_worker, (enc_dir, str(tmp_path / "init"), str(tmp_path)), WORLD)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    model = _model(enc_dir)
    # one process, the whole batch (passages in column-major order, the ranks' in rank-major: same softmax)
    ref_loss, ref_g = _run(UtilityInfoNCELoss(model), model, _texts(WORLD * B), _ddp_labels())
    # the same with texts shared across ranks: one process deduplicates them over the whole batch, the ranks
    # after gathering (before, a rank-1 copy of a rank-0 target was a negative of that target's query)
    dup_loss, dup_g = _run(UtilityInfoNCELoss(model), model, _dup_texts(), _ddp_labels())
    assert abs(float(dup_loss) - float(ref_loss)) > 1e-4  # the copies change the batch
    for name, (want_loss, want_g) in (("plain", (ref_loss, ref_g)), ("cached", (ref_loss, ref_g)),
                                      ("plain-dup", (dup_loss, dup_g)), ("cached-dup", (dup_loss, dup_g))):
        # equal local batches: the mean of the local means is the global mean, and DDP's gradient
        # average is the gradient of the global mean
        loss = sum(r[name][0] for r in ranks) / WORLD
        torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6, msg=name)
        avg = {n: sum(r[name][1][n] for r in ranks) / WORLD for n in want_g}
        _assert_grads_close(avg, want_g)
    # without the gather, rank 0's queries would see only its own passages: a smaller loss
    alone, _ = _run(UtilityInfoNCELoss(model), model, [c[:B] for c in _texts(WORLD * B)], _ddp_labels()[:B])
    assert alone < ranks[0]["plain"][0] - 1e-3


class _Towers(torch.nn.Module):
    """A tiny encoder: queries (the first column) and passages through one trainable tower, or passages through
    a frozen tower of their own (a fixed document encoder: the GradCache replay's last mini-batch then needs
    no gradient)."""

    def __init__(self, frozen_passages: bool):
        super().__init__()
        torch.manual_seed(0)
        self.q = torch.nn.EmbeddingBag(64, 8, mode="sum")
        self.p = torch.nn.EmbeddingBag(64, 8, mode="sum").requires_grad_(False) if frozen_passages else None

    def forward(self, f):
        tower = self.p if f["tower"] == "p" and self.p is not None else self.q
        w = f["attention_mask"].float()
        return {"sentence_embedding": tower(f["input_ids"], per_sample_weights=w / w.sum(1, keepdim=True))}


def _tower_batch(rank):
    g = torch.Generator().manual_seed(10 + rank)
    cols = []
    for c in range(1 + K):
        ids = torch.randint(1, 64, (4, 6), generator=g)
        mask = torch.ones_like(ids)
        mask[1, 4:] = 0
        cols.append({"input_ids": ids * mask, "attention_mask": mask, "tower": "q" if c == 0 else "p"})
    return cols, torch.randn(4, K, generator=g)


def _ddp_towers_grads(rank):
    from torch.nn.parallel import DistributedDataParallel

    res = {}
    # (frozen passage tower, static graph, find_unused_parameters: the Hugging Face trainer's setting for ST)
    for frozen, static, unused in ((False, False, False), (True, False, False), (False, True, False),
                                   (True, True, False), (False, False, True), (True, False, True)):
        model = _Towers(frozen)
        loss_fn = CachedUtilityInfoNCELoss(model, mini_batch_size=3)
        # what sentence-transformers' trainer does under DDP (static_graph: `ddp_static_graph=True`)
        ddp = DistributedDataParallel(model, static_graph=static, find_unused_parameters=unused)
        loss_fn.model = ddp
        for step in range(2):  # a second step: DDP's reducer must be ready for the next iteration
            res[frozen, static, unused, step] = _run(loss_fn, model, *_tower_batch(rank + 2 * step))[1]
        # gradient accumulation: the first micro-batch under the trainer's outer no_sync, the second synced
        model.zero_grad(set_to_none=True)
        with ddp.no_sync():
            loss_fn(*_tower_batch(rank)).backward()
        loss_fn(*_tower_batch(rank + 2)).backward()
        res[frozen, static, unused, "accum"] = {n: p.grad.detach().clone() for n, p in model.named_parameters()
                                                if p.grad is not None}
    return res


def _ddp_towers_worker(rank, init_file, out_dir):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=GLOO_TIMEOUT)
    try:
        # the DDP wrappers die with _ddp_towers_grads' frame, before the group: a DDP reducer destroyed after
        # destroy_process_group hung rank 0 at exit now and then
        torch.save(_ddp_towers_grads(rank), os.path.join(out_dir, f"towers{rank}.pt"))
        gc.collect()  # and any reference cycle through them
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # ~10 s: two spawned processes
def test_ddp_cached_all_reduces_even_when_the_last_mini_batch_is_frozen(tmp_path):
    # Under DDP the replay accumulates under no_sync and all-reduces with the last mini-batch's backward.
    # With a frozen passage tower that mini-batch has no backward: the gradients must still be averaged.
    # Static-graph DDP (which failed an internal assert under no_sync in its first step) too.
    from conftest import spawn_with_deadline

    spawn_with_deadline(_ddp_towers_worker, (str(tmp_path / "init"), str(tmp_path)), WORLD)
    ranks = [torch.load(tmp_path / f"towers{r}.pt") for r in range(WORLD)]
    assert len(ranks[0]) == 18
    for key in ranks[0]:
        frozen, step = key[0], key[3]
        model = _Towers(frozen)
        if step == "accum":  # both micro-batches of every rank, averaged over the ranks
            local = [_run(UtilityInfoNCELoss(model), model, *_tower_batch(r))[1] for r in range(WORLD)]
            second = [_run(UtilityInfoNCELoss(model), model, *_tower_batch(r + 2))[1] for r in range(WORLD)]
            local = [{n: a[n] + b[n] for n in a} for a, b in zip(local, second)]
        else:
            local = [_run(UtilityInfoNCELoss(model), model, *_tower_batch(r + 2 * step))[1] for r in range(WORLD)]
        avg = {n: sum(g[n] for g in local) / WORLD for n in local[0]}
        assert set(avg) == {"q.weight"}
        assert not torch.allclose(local[0]["q.weight"], local[1]["q.weight"])  # averaging is visible
        for r in ranks:
            assert set(r[key]) == set(avg), key
            for n in avg:
                torch.testing.assert_close(r[key][n], avg[n], rtol=1e-5, atol=1e-7, msg=lambda m: f"{key}: {m}")


def test_ddp_find_unused_parameters_on_old_torch_is_refused(monkeypatch):
    # torch < 2.4 kept per-rank gradients for parameters used only under no_sync (pytorch#124193): one clear error
    from types import SimpleNamespace

    from torch.nn.parallel import DistributedDataParallel

    import uae_fast.losses.cached_utility_infonce as C

    ddp = object.__new__(DistributedDataParallel)  # no process group needed: the check comes first
    ddp.__dict__.update(find_unused_parameters=True, _parameters={}, _buffers={}, _modules={})
    monkeypatch.setattr(C, "_torch_before", lambda major, minor: True)
    with pytest.raises(ValueError, match="find_unused_parameters=True needs torch >= 2.4"):
        C._replay(torch.ones(()), loss_obj=SimpleNamespace(model=ddp), features=[], cache=[], states=[], ranges=[])
    monkeypatch.undo()
    assert not C._torch_before(2, 4) and C._torch_before(99, 0)  # this torch (2.13 here) is past the bug
    # release numbers only: 2.4 pre-releases and NVIDIA builds carry the fix; 2.3 does not
    for v, before in (("2.4.0a0+git34c1c4b", False), ("2.4.0rc1", False), ("2.4.0.dev20240501+cu121", False),
                      ("2.3.1+cu121", True), ("2.13.0+cpu", False), ("1.13.1", True)):
        assert C._torch_before(2, 4, v) is before, v



def test_scalar_label_column_with_one_passage_column():
    # (query, passage_0) with a float label: the trainer passes labels [B]; with K = 1 that is one utility per row
    from uae_fast.losses.st_utility_infonce import targets_from_labels

    idx, util = targets_from_labels(torch.tensor([0.5, float("nan"), 1.0]), 3, 1, "cpu")
    ref_idx, ref_util = targets_from_labels(torch.tensor([[0.5], [float("nan")], [1.0]]), 3, 1, "cpu")
    assert torch.equal(idx, ref_idx) and torch.equal(util.nan_to_num(-9), ref_util.nan_to_num(-9))
    with pytest.raises(ValueError, match=r"labels must be \[batch, K\] = \[3, 2\]"):
        targets_from_labels(torch.tensor([0.5, 0.1, 1.0]), 3, 2, "cpu")


def test_embedding_level_inputs_and_flags_are_checked(model):
    # keys of another length would pair passages with other rows' keys (a zero or wrong loss); a query
    # column of the wrong rank blamed the passages; a flag passed as a string read as True
    loss_fn = UtilityInfoNCELoss(model, temperature=0.1)
    q, c0, c1 = torch.randn(3, 4), torch.randn(3, 4), torch.randn(3, 4)
    labels = torch.randn(3, 2)
    with pytest.raises(ValueError, match="keys has 5 entries for 6 passages"):
        loss_fn.compute_loss_from_embeddings([q, c0, c1], labels, keys=[b"a"] * 5)
    with pytest.raises(ValueError, match="the query column's embeddings must be"):
        loss_fn.compute_loss_from_embeddings([q[0], c0, c1], labels)
    with pytest.raises(TypeError, match="gather_across_devices must be a bool"):
        UtilityInfoNCELoss(model, gather_across_devices="no")
    with pytest.raises(TypeError, match="dedupe_passages must be a bool"):
        UtilityInfoNCELoss(model, dedupe_passages=1)
    with pytest.raises(ValueError, match="mini_batch_size must be a positive int"):
        CachedUtilityInfoNCELoss(model, mini_batch_size=True)
