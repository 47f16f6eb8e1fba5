"""BiEncoder: same embeddings as sentence-transformers, saves a folder SentenceTransformer loads, clear errors."""
import json
import os

import pytest
import torch

from conftest import require_default_student
from uae_fast.student import BiEncoder, default_student_path, pool

TEXTS = ["What dataset do they use?", "We train on SQuAD and evaluate on NewsQA with 3 seeds.",
         "a", "The baseline is a BiLSTM-CRF tagger trained for 20 epochs on the CoNLL-2003 English corpus, "
         "with pretrained GloVe vectors and character features."]


def make_tiny_encoder(folder, *, hidden=32, layers=2, seed=0, **config):
    """A tiny random-init BERT (MiniLM's tokenizer) saved as a plain HF folder: loads in well under a second."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    require_default_student()
    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(default_student_path())
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                     intermediate_size=2 * hidden, max_position_embeddings=128, **config)
    BertModel(cfg).save_pretrained(folder)
    tok.model_max_length = 128
    tok.save_pretrained(folder)
    return str(folder)


def _st(path):
    st = pytest.importorskip("sentence_transformers")
    return st.SentenceTransformer(str(path), device="cpu")


def test_default_student_matches_sentence_transformers():
    require_default_student()
    enc = BiEncoder(device="cpu")
    assert enc.pooling_modes == ["mean"] and enc.normalize and enc.max_seq_length == 256 and enc.dim == 384
    ours = enc.encode(TEXTS, batch_size=3)
    ref = torch.from_numpy(_st(default_student_path()).encode(TEXTS, convert_to_numpy=True))
    assert ours.shape == (4, 384) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(ours.norm(dim=1), torch.ones(4))


def test_save_reload_with_sentence_transformers(tmp_path):
    enc = BiEncoder(make_tiny_encoder(tmp_path / "hf"), device="cpu", max_seq_length=64)
    assert enc.normalize and enc.pooling_modes == ["mean"]  # plain HF folder: mean + L2 norm
    out = tmp_path / "st"
    enc.save(out)
    st = _st(out)
    assert st.max_seq_length == 64
    ref = torch.from_numpy(st.encode(TEXTS, convert_to_numpy=True))
    torch.testing.assert_close(enc.encode(TEXTS), ref, atol=1e-5, rtol=1e-4)
    again = BiEncoder(out, device="cpu")  # and our own reload
    assert again.max_seq_length == 64
    torch.testing.assert_close(again.encode(TEXTS), enc.encode(TEXTS), atol=0, rtol=0)


def test_save_is_staged_and_weights_land_last(tmp_path, monkeypatch):
    enc = BiEncoder(make_tiny_encoder(tmp_path / "hf"), device="cpu")
    out = tmp_path / "st"
    moved = []
    real_replace = os.replace

    def spy(src, dst):
        moved.append(os.path.relpath(dst, out))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    enc.save(out)
    monkeypatch.undo()
    assert moved[-1] == "model.safetensors" and moved.count("model.safetensors") == 1
    assert {"config.json", "modules.json", "README.md", os.path.join("1_Pooling", "config.json")} <= set(moved)
    assert os.path.isdir(out / "2_Normalize")  # an empty module folder is published too
    assert not [e for e in os.listdir(out) if e.startswith(".saving-")]
    assert "SentenceTransformer(" in (out / "README.md").read_text() and str(out) in (out / "README.md").read_text()
    torch.testing.assert_close(BiEncoder(out, device="cpu").encode(TEXTS), enc.encode(TEXTS), atol=0, rtol=0)


def test_save_over_a_model_keeps_file_modes_and_drops_old_shards(tmp_path):
    enc = BiEncoder(make_tiny_encoder(tmp_path / "hf"), device="cpu")
    out = tmp_path / "st"
    enc.save(out)
    # new files get the umask's mode: the weights were 0600 (a private temp file), unreadable to other users
    mask = os.umask(0o022)
    os.umask(mask)
    for root, _, names in os.walk(out):
        for n in names:
            assert oct(os.stat(os.path.join(root, n)).st_mode & 0o777) == oct(0o666 & ~mask), n
    os.chmod(out / "config.json", 0o664)
    (out / "model-00001-of-00002.safetensors").write_bytes(b"old shard")  # an earlier sharded save
    (out / "model.safetensors.index.json").write_text("{}")
    (out / "notes.txt").write_text("mine")
    enc.save(out)
    assert oct(os.stat(out / "config.json").st_mode & 0o777) == oct(0o664)
    assert not (out / "model-00001-of-00002.safetensors").exists() and not (out / "model.safetensors.index.json").exists()
    assert (out / "notes.txt").read_text() == "mine" and (out / "model.safetensors").exists()


def test_failed_save_leaves_no_model_and_no_staging(tmp_path, monkeypatch):
    import uae_fast.model_card as mc

    enc = BiEncoder(make_tiny_encoder(tmp_path / "hf"), device="cpu")
    out = tmp_path / "st"

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(mc, "write_model_card", boom)  # the last file written: everything else is staged
    with pytest.raises(OSError, match="disk full"):
        enc.save(out)
    assert os.listdir(out) == []  # neither weights without their configs nor a leftover staging folder


@pytest.mark.parametrize("modes", [["cls"], ["max"], ["mean_sqrt_len_tokens"], ["lasttoken"], ["cls", "mean"], ["weightedmean"]])
def test_pooling_modes_match_sentence_transformers(tmp_path, modes):
    enc = BiEncoder(make_tiny_encoder(tmp_path / "hf"), device="cpu", normalize=False)
    enc.pooling_modes = modes
    enc.save(tmp_path / "st")
    cfg = json.load(open(tmp_path / "st" / "1_Pooling" / "config.json"))
    assert sorted(k for k, v in cfg.items() if v is True) == sorted(
        {"cls": "pooling_mode_cls_token", "max": "pooling_mode_max_tokens", "mean": "pooling_mode_mean_tokens",
         "mean_sqrt_len_tokens": "pooling_mode_mean_sqrt_len_tokens", "lasttoken": "pooling_mode_lasttoken",
         "weightedmean": "pooling_mode_weightedmean_tokens"}[m] for m in modes)
    assert not os.path.exists(tmp_path / "st" / "2_Normalize")
    ref = torch.from_numpy(_st(tmp_path / "st").encode(TEXTS, convert_to_numpy=True))
    ours = BiEncoder(tmp_path / "st", device="cpu").encode(TEXTS, batch_size=2)
    assert ours.shape == ref.shape == (4, 32 * len(modes))
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-4)


def test_pool_float64_reference():
    h = torch.randn(3, 5, 4, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    got = pool(h, mask, ["cls", "max", "mean", "lasttoken"])
    for i, n in enumerate([3, 5, 1]):
        x = h[i, :n]
        want = torch.cat([x[0], x.max(0).values, x.mean(0), x[-1]])
        torch.testing.assert_close(got[i], want)


def test_embed_keeps_graph_and_encode_restores_mode(tmp_path):
    enc = BiEncoder(make_tiny_encoder(tmp_path / "hf"), device="cpu")
    enc.train()
    e = enc.embed(TEXTS[:2])
    e.sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in enc.parameters())
    out = enc.encode(TEXTS)
    assert enc.training and torch.isfinite(out).all()
    assert enc.encode([]).shape == (0, 32)


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        BiEncoder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a model folder"):
        BiEncoder(tmp_path / "empty")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "modules.json").write_text(json.dumps([{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Dense"}]))
    with pytest.raises(ValueError, match="not supported"):
        BiEncoder(bad)
    (bad / "modules.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        BiEncoder(bad)
    # a module outside the model folder (a crafted folder loading another model's weights)
    (bad / "modules.json").write_text(json.dumps([{"idx": 0, "path": "../hf", "type": "x.Transformer"}]))
    with pytest.raises(ValueError, match="leads outside the model folder"):
        BiEncoder(bad)
    # hand-edited layouts: the file and the entry are named (they were AttributeErrors / TypeErrors)
    for modules in ([1], [{"idx": "0", "path": "", "type": "x.Transformer"}, {"idx": 1, "path": "p", "type": "x.Pooling"}],
                    [{"idx": 0, "path": 5, "type": "x.Transformer"}]):
        (bad / "modules.json").write_text(json.dumps(modules))
        with pytest.raises(ValueError, match="modules.json: each module must be an object with an integer idx"):
            BiEncoder(bad)
    st = tmp_path / "st"
    BiEncoder(make_tiny_encoder(tmp_path / "hf0"), device="cpu").save(st)
    for file, text, msg in (("sentence_bert_config.json", "[]", "must hold a JSON object, got list"),
                            ("sentence_bert_config.json", '{"max_seq_length": "64"}', "max_seq_length must be a positive integer"),
                            (os.path.join("1_Pooling", "config.json"), "[]", "must hold a JSON object, got list")):
        keep = (st / file).read_text()
        (st / file).write_text(text)
        with pytest.raises(ValueError, match=msg):
            BiEncoder(st)
        (st / file).write_text(keep)
    enc = BiEncoder(make_tiny_encoder(tmp_path / "hf"), device="cpu")
    with pytest.raises(TypeError, match="not one str"):
        enc.encode("one string")
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        enc.encode(["ok", 3])
    with pytest.raises(ValueError, match="batch_size"):
        enc.encode(["ok"], batch_size=0)


def test_bad_lengths_dtypes_and_texts_name_the_argument(tmp_path):
    enc = BiEncoder(make_tiny_encoder(tmp_path / "hf"), device="cpu")
    positions = enc.model.config.max_position_embeddings
    assert enc.max_seq_length <= positions
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="max_seq_length must be a positive int"):
            BiEncoder(str(tmp_path / "hf"), device="cpu", max_seq_length=bad)
        with pytest.raises(ValueError, match="max_length must be a positive int"):
            enc.encode(["a"], max_length=bad)
    with pytest.raises(ValueError, match=f"exceeds the model's {positions} positions"):
        BiEncoder(str(tmp_path / "hf"), device="cpu", max_seq_length=positions + 1)
    long_text = " ".join(["word"] * (3 * positions))
    torch.testing.assert_close(enc.encode([long_text], max_length=10 * positions), enc.encode([long_text], max_length=positions))
    for bad in (torch.int64, "float16", None):
        with pytest.raises(TypeError, match="dtype must be a floating torch.dtype"):
            enc.encode(["a"], dtype=bad)
    with pytest.raises(TypeError, match="texts must be a list of str, got NoneType"):
        enc.encode(None)


def test_roberta_positions_start_after_the_padding_index(tmp_path):
    # RoBERTa-family models number positions from pad_token_id + 1: 34 position embeddings hold 32 tokens
    from transformers import AutoTokenizer, RobertaConfig, RobertaModel

    require_default_student()
    tok = AutoTokenizer.from_pretrained(default_student_path())
    cfg = RobertaConfig(vocab_size=tok.vocab_size, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=34, pad_token_id=1)
    RobertaModel(cfg).save_pretrained(tmp_path / "rb")
    tok.save_pretrained(tmp_path / "rb")
    enc = BiEncoder(str(tmp_path / "rb"), device="cpu")
    assert enc.max_seq_length == 32
    with pytest.raises(ValueError, match="exceeds the model's 32 positions"):
        BiEncoder(str(tmp_path / "rb"), device="cpu", max_seq_length=34)
    assert torch.isfinite(enc.encode(["word " * 200])).all()  # cut to 32 tokens, not an IndexError


def _st_saved(tmp_path, **st_config):
    """A folder written by sentence-transformers itself (its own layout and config), ``st_config`` edited in."""
    st = _st(make_tiny_encoder(tmp_path / "hf"))  # Transformer + mean Pooling, no Normalize module, cosine
    out = tmp_path / "st"
    st.save(str(out))
    path = out / "config_sentence_transformers.json"
    cfg = json.loads(path.read_text())
    cfg.update(st_config)
    path.write_text(json.dumps(cfg))
    return out


def test_cosine_model_without_normalize_module_ranks_as_sentence_transformers(tmp_path):
    # sentence-transformers scores such a model by cosine at similarity time: BiEncoder ranks by inner product,
    # so it must normalise, and keep cosine when it saves the model again
    out = _st_saved(tmp_path)
    assert "Normalize" not in (out / "modules.json").read_text()
    enc = BiEncoder(out, device="cpu")
    assert enc.normalize
    # sentence-transformers writes empty query/document prompts: they change nothing, nor the cache keys
    from uae_fast.embcache import _settings

    assert set(enc.prompts.values()) <= {""} and _settings(enc) == "['mean']|True|128|False"
    st = _st(out)
    ref = st.similarity(st.encode(TEXTS[:1], convert_to_tensor=True), st.encode(TEXTS, convert_to_tensor=True))
    torch.testing.assert_close(enc.encode(TEXTS[:1]) @ enc.encode(TEXTS).T, ref.float(), atol=1e-5, rtol=1e-4)
    enc.save(tmp_path / "again")
    cfg = json.loads((tmp_path / "again" / "config_sentence_transformers.json").read_text())
    assert cfg["similarity_fn_name"] == "cosine" and BiEncoder(tmp_path / "again", device="cpu").normalize
    # a dot-product model stays unnormalised; other metrics are refused, not ranked by another one
    assert not BiEncoder(_st_saved(tmp_path / "dot", similarity_fn_name="dot"), device="cpu").normalize
    with pytest.raises(ValueError, match="similarity_fn_name 'euclidean' is not supported"):
        BiEncoder(_st_saved(tmp_path / "euc", similarity_fn_name="euclidean"), device="cpu")


def test_prompts_are_applied_as_sentence_transformers_does_and_kept_on_save(tmp_path):
    prompts = {"query": "query: ", "document": "passage: "}
    out = _st_saved(tmp_path, prompts=prompts, default_prompt_name="document")
    enc, st = BiEncoder(out, device="cpu"), _st(out)
    assert enc.prompt("query") == "query: " and enc.prompt("document") == enc.prompt() == "passage: "
    for role, ref in (("query", st.encode_query(TEXTS, convert_to_tensor=True)),
                      ("document", st.encode_document(TEXTS, convert_to_tensor=True)),
                      (None, st.encode(TEXTS, convert_to_tensor=True))):
        # the folder has no Normalize module: sentence-transformers applies cosine when it scores
        ref = torch.nn.functional.normalize(ref.float(), dim=-1)
        torch.testing.assert_close(enc.encode(TEXTS, role=role), ref, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(enc.encode(TEXTS, role="query"), enc.encode(TEXTS, role="document"))
    enc.save(tmp_path / "again")
    cfg = json.loads((tmp_path / "again" / "config_sentence_transformers.json").read_text())
    assert cfg["prompts"] == prompts and cfg["default_prompt_name"] == "document"
    # 'passage' is sentence-transformers' second name for the document prompt; no default: no prompt
    enc2 = BiEncoder(_st_saved(tmp_path / "p", prompts={"passage": "p: "}, default_prompt_name=None), device="cpu")
    assert enc2.prompt("document") == "p: " and enc2.prompt("query") == enc2.prompt() == ""
    # saved, the prompts it applies are written under sentence-transformers' role names too: version 6 adds empty
    # "query"/"document" prompts to a model without them, which would win over "passage" and the default prompt
    from sentence_transformers import SentenceTransformer

    enc3 = BiEncoder(_st_saved(tmp_path / "r", prompts={"retrieval": "r: "}, default_prompt_name="retrieval"), device="cpu")
    for e, name in ((enc2, "p2"), (enc3, "r2")):
        e.save(tmp_path / name)
        st = SentenceTransformer(str(tmp_path / name), device="cpu")
        for role, ref in (("query", st.encode_query(TEXTS, convert_to_tensor=True)),
                          ("document", st.encode_document(TEXTS, convert_to_tensor=True)),
                          (None, st.encode(TEXTS, convert_to_tensor=True))):
            torch.testing.assert_close(e.encode(TEXTS, role=role), torch.nn.functional.normalize(ref.float(), dim=-1),
                                       atol=1e-5, rtol=1e-4)
        back = BiEncoder(tmp_path / name, device="cpu")
        assert [back.prompt(r) for r in ("query", "document", None)] == [e.prompt(r) for r in ("query", "document", None)]
    with pytest.raises(ValueError, match="role must be"):
        enc.encode(TEXTS, role="passage")
    with pytest.raises(ValueError, match="default_prompt_name 'x' is not one of its prompts"):
        BiEncoder(_st_saved(tmp_path / "bad", prompts=prompts, default_prompt_name="x"), device="cpu")
    pooling = out / "1_Pooling" / "config.json"
    pooling.write_text(json.dumps(dict(json.loads(pooling.read_text()), include_prompt=False)))
    with pytest.raises(ValueError, match="include_prompt"):
        BiEncoder(out, device="cpu")
