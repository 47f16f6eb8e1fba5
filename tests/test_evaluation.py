"""uae eval: tiny end-to-end (train -> save -> SentenceTransformer reload -> eval), oracle rankings, UPR re-ranker
scores vs a plain HF log-softmax, reader Token F1, bad input."""
import json
import os

import pytest
import torch

from conftest import require_default_student
from test_student import make_tiny_encoder
from test_training import TRAIN, write_utilities
from uae_fast.data import load_dataset
from uae_fast.evaluation import DenseRanker, UPRReranker, evaluate, format_table
from uae_fast.metrics import retrieval_metrics
from uae_fast.student import BiEncoder, default_student_path
from uae_fast.training import TrainConfig, train

HERE = os.path.dirname(__file__)
DEV = os.path.join(HERE, "fixtures", "qasper-dev-mini.json.gz")


@pytest.fixture(scope="module")
def dev():
    return load_dataset(DEV)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_encoder(tmp_path_factory.mktemp("enc") / "tiny")


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    """A tiny random-init Llama with MiniLM's (BERT) tokenizer: a causal LM folder load_causal_lm accepts."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    require_default_student()
    folder = tmp_path_factory.mktemp("lm") / "tiny-llama"
    tok = AutoTokenizer.from_pretrained(default_student_path())
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=1024, pad_token_id=0)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def _oracle_rankings(enc, ds, queries):
    """Brute-force torch ranking (stable: ties keep pool order) as the oracle for the TopKIndex path."""
    out = []
    for q in queries:
        pool = ds.pool(q)
        s = enc.encode([ds.passages[p].text for p in pool]) @ enc.encode([q.question])[0]
        out.append([pool[i] for i in torch.argsort(-s, stable=True).tolist()])
    return out


def test_tiny_end_to_end(tmp_path, dev, tiny):
    st = pytest.importorskip("sentence_transformers")
    train_ds = load_dataset(TRAIN)
    utils = write_utilities(tmp_path / "u.jsonl.gz", train_ds)
    out = tmp_path / "uae-model"
    cfg = TrainConfig(data=TRAIN, utilities=utils, student=tiny, loss="uae", max_steps=3, batch_size=4, passages_per_query=3,
                      max_passage_length=32, lr=1e-3)
    s = train(cfg, str(out), save_every=2, progress=False, ds=train_ds)
    assert s["finished"]
    assert os.path.isdir(out / "checkpoints")
    # the output folder is a sentence-transformers model with the same embeddings
    texts = [q.question for q in dev.queries[:4]]
    ref = torch.from_numpy(st.SentenceTransformer(str(out), device="cpu").encode(texts, convert_to_numpy=True))
    enc = BiEncoder(out, device="cpu")
    torch.testing.assert_close(enc.encode(texts), ref, atol=1e-5, rtol=1e-4)

    res = evaluate(dev, [str(out)], names=["uae"], baselines=("bm25", "base"), student=tiny, progress=False, device="cpu")
    queries = [q for q in dev.queries if q.gold]
    assert res["n_queries"] == len(queries) == 14
    assert set(res["systems"]) == {"uae", "base", "bm25"}
    for m in res["systems"].values():
        assert m["n"] == 14 and m["latency_ms_mean"] > 0
        for k in ("Success@1", "Success@5", "Recall@1", "Recall@5", "MAP", "MRR"):
            assert 0.0 <= m[k] <= 1.0
        assert m["Success@1"] <= m["Success@5"] and m["Success@1"] <= m["MRR"]
        assert m["Recall@1"] <= m["Success@1"] and m["Recall@5"] <= m["Success@5"]
    # the TopKIndex rankings equal brute-force rankings, so the metrics do too
    want = retrieval_metrics(_oracle_rankings(enc, dev, queries), [set(q.gold) for q in queries])
    for k in ("Success@1", "Success@5", "Recall@1", "Recall@5", "MAP", "MRR"):
        assert res["systems"]["uae"][k] == pytest.approx(want[k])
    table = format_table(res)
    assert "uae" in table and "bm25" in table and "S@1" in table and "R@1" in table
    assert f"ms/query excludes encoding the passages once: uae {res['systems']['uae']['index_build_s']:.1f} s" in table
    # Paired differences: the model against each baseline, means equal to the difference of the table's means.
    assert set(res["paired"]) == {"uae - base", "uae - bm25"} and "Paired differences" in table
    for other in ("base", "bm25"):
        for k in ("Success@1", "Success@5", "Recall@1", "Recall@5", "MAP", "MRR"):
            d = res["paired"][f"uae - {other}"][k]
            assert d["diff"] == pytest.approx(res["systems"]["uae"][k] - res["systems"][other][k])
            assert d["ci95_low"] <= d["diff"] + 1e-12 and d["diff"] - 1e-12 <= d["ci95_high"] and 0 <= d["p"] <= 1


def test_bm25_baseline_ranks_by_bm25(dev):
    from uae_fast.bm25 import BM25

    res = evaluate(dev, [], baselines=("bm25",), progress=False, limit=5)
    import os

    import uae_fast
    # the timings say what they ran on
    assert res["machine"]["uae_fast"] == uae_fast.__version__ and res["machine"]["cpus"] == os.cpu_count()
    assert res["machine"]["torch"] == torch.__version__ and res["machine"]["cpu"]
    queries = [q for q in dev.queries if q.gold][:5]
    rk = []
    for q in queries:
        pool = dev.pool(q)
        _, ids = BM25([dev.passages[p].text for p in pool]).topk(q.question, len(pool))
        rk.append([pool[i] for i in ids.tolist()])
    want = retrieval_metrics(rk, [set(q.gold) for q in queries])
    assert res["systems"]["bm25"]["MAP"] == pytest.approx(want["MAP"])
    assert res["systems"]["bm25"]["n"] == 5


def test_upr_scores_match_plain_hf(dev, tiny_lm):
    from uae_fast.teacher import load_causal_lm

    model, tok = load_causal_lm(tiny_lm, device="cpu")
    upr = UPRReranker(model, tok, depth=3, max_passage_tokens=40)
    q = dev.queries[1]
    pool = dev.pool(q)[:4]
    texts = [dev.passages[p].text for p in pool]
    got = upr.scores(q.question, texts)
    target = tok(" " + q.question, add_special_tokens=False).input_ids
    for i, t in enumerate(texts):
        prompt = upr._prompt_ids(t)
        ids = torch.tensor([prompt + target], dtype=torch.long)
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0].double(), -1)
        n = len(prompt)
        want = logp[n - 1:n - 1 + len(target)].gather(1, torch.tensor(target)[:, None]).mean()
        assert float(got[i]) == pytest.approx(float(want), abs=1e-4)
    # only the top `depth` are re-ordered; the tail keeps the first-stage order
    ranking = dev.pool(q)
    rr = upr.rerank(q.question, ranking, {p: dev.passages[p].text for p in ranking})
    assert sorted(rr[:3]) == sorted(ranking[:3]) and rr[3:] == ranking[3:]
    s = upr.scores(q.question, [dev.passages[p].text for p in rr[:3]])
    assert (s[:-1] >= s[1:]).all()


def test_rerank_and_reader_in_one_run(tmp_path, dev, tiny, tiny_lm, capsys):
    from uae_fast.cli import main

    js = tmp_path / "res.json"
    rc = main(["eval", "--data", DEV, "--model", tiny, "--name", "tiny", "--baselines", "bm25,base,rerank", "--student", tiny,
               "--teacher", tiny_lm, "--rerank-limit", "3", "--rerank-depth", "4", "--reader", "--reader-limit", "5",
               "--json", str(js), "--no-progress"])
    assert rc == 0
    res = json.loads(js.read_text())
    sub = res["rerank_subset"]
    assert sub["n"] == 3 and set(sub["systems"]) == {"tiny", "base", "bm25", "rerank"}
    assert res["systems"]["rerank"]["n"] == 3
    # the first model against the re-ranker is paired on the re-ranker's 3 queries: the same difference as the
    # subset table's (a misaligned slice of the first model's queries would differ)
    for k, pair in res["paired"]["tiny - rerank"].items():
        assert pair["diff"] == pytest.approx(sub["systems"]["tiny"][k] - sub["systems"]["rerank"][k], abs=1e-12), k
    # the LM re-ranker runs the student plus 4 LM forwards per query; over 3 queries a pause on a busy machine
    # could invert a wall-clock ratio, so only its presence and sign are checked here (BENCHMARKS has the timing)
    assert res["speedup_vs_rerank"]["tiny"] > 0
    r = res["reader"]
    assert r["n"] == 5 and set(r["systems"]) == {"tiny", "base", "bm25", "rerank", "gold"}
    assert all(0.0 <= v["token_f1"] <= 1.0 for v in r["systems"].values())
    out = capsys.readouterr().out
    assert "re-ranker" in out and "Reader Token F1" in out
    # the re-ranker answered on its 3-query subset only: its row says on how many
    assert r["systems"]["rerank"]["n"] < 5 and f"(on {r['systems']['rerank']['n']} of them" in out


def test_eval_paired_by_document_resamples_papers(dev, tiny):
    res = evaluate(dev, [tiny], names=["tiny"], baselines=("bm25",), progress=False, paired_by="document")
    assert res["paired_by"] == "document"
    pair = res["paired"]["tiny - bm25"]["Success@1"]
    qs = [q for q in dev.queries if q.gold]
    papers = [q.doc_id for q in qs]
    assert pair["groups"] == len(set(papers)) < len(qs) and pair["n"] == len(qs)
    # the same difference as the question bootstrap; only the resampled unit changes
    plain = evaluate(dev, [tiny], names=["tiny"], baselines=("bm25",), progress=False)
    assert "paired_by" in plain and plain["paired_by"] == "question" and "groups" not in plain["paired"]["tiny - bm25"]["MAP"]
    assert pair["diff"] == pytest.approx(plain["paired"]["tiny - bm25"]["Success@1"]["diff"])
    with pytest.raises(ValueError, match="paired_by must be"):
        evaluate(dev, [tiny], baselines=("bm25",), paired_by="paper")


def test_eval_errors(tmp_path, dev, tiny, capsys):
    from uae_fast.cli import main
    from uae_fast.data import RetrievalDataset

    (tmp_path / "notamodel").mkdir()
    with pytest.raises(ValueError, match="not a model folder"):
        evaluate(dev, [str(tmp_path / "notamodel")], baselines=(), progress=False)
    with pytest.raises(ValueError, match="unknown baseline"):
        evaluate(dev, [], baselines=("bm26",))
    with pytest.raises(ValueError, match="nothing to evaluate"):
        evaluate(dev, [], baselines=())
    nogold = RetrievalDataset(dev.passages, [q for q in dev.queries if not q.gold], "nogold")
    with pytest.raises(ValueError, match="no queries with gold evidence"):
        evaluate(nogold, [tiny], baselines=())
    with pytest.raises(ValueError, match="rerank_limit"):
        evaluate(dev, [tiny], baselines=(), rerank_limit=0)
    with pytest.raises(ValueError, match="unique"):
        evaluate(dev, [tiny, tiny], baselines=())
    rc = main(["eval", "--data", DEV, "--model", str(tmp_path / "notamodel"), "--baselines", "", "--no-progress"])
    assert rc == 1 and "not a model folder" in capsys.readouterr().err
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"type": "passage", "id": "a", "doc_id": "d", "text": "x"}) + "\n")
    rc = main(["eval", "--data", str(empty), "--baselines", "bm25", "--no-progress"])
    assert rc == 1 and "no queries" in capsys.readouterr().err


def test_dense_ranker_topk_index(dev, tiny):
    enc = BiEncoder(tiny, device="cpu")
    queries = [q for q in dev.queries if q.gold][:4]
    ranker = DenseRanker(enc, dev, queries)
    assert ranker.n_passages == len({p for q in queries for p in dev.pool(q)})
    for q, want in zip(queries, _oracle_rankings(enc, dev, queries)):
        got = ranker.rank(q)
        assert sorted(got) == sorted(dev.pool(q))
        assert got[:3] == want[:3]
        assert ranker.rank(q, k=2) == got[:2]


def test_one_query_eval_has_no_paired_rows(dev, tiny):
    # a paired bootstrap needs 2 queries: one query still evaluates, without the paired block
    res = evaluate(dev, [tiny], names=["tiny"], baselines=("bm25",), progress=False, limit=1)
    assert res["systems"]["tiny"]["n"] == 1 and not res.get("paired")
    res2 = evaluate(dev, [tiny], names=["tiny"], baselines=("bm25",), progress=False, limit=2)
    assert set(res2["paired"]) == {"tiny - bm25"}
