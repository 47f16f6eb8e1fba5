"""BM25: against a float64 brute-force reference of the Okapi formula, a hand-computed case, and errors."""
import math
import random

import numpy as np
import pytest

from uae_fast.bm25 import BM25, ENGLISH_STOPWORDS, tokenize


def _reference(texts, query, k1=1.2, b=0.75, stopwords=False):
    docs = [tokenize(t, stopwords) for t in texts]
    n = len(docs)
    avgdl = sum(map(len, docs)) / n
    out = []
    for d in docs:
        s = 0.0
        for term in tokenize(query, stopwords):  # a repeated query term counts each time
            df = sum(term in x for x in docs)
            if df == 0:
                continue
            idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
            tf = d.count(term)
            if tf == 0:
                continue
            s += idf * tf * (k1 + 1) / (tf + k1 * (1 - b + b * len(d) / avgdl))
        out.append(s)
    return np.array(out)


def _random_corpus(rng, n_docs, vocab=40):
    words = [f"w{i}" for i in range(vocab)] + ["the", "of", "and"]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(0, 30))) for _ in range(n_docs)]


@pytest.mark.parametrize("k1,b", [(1.2, 0.75), (0.0, 0.5), (2.0, 0.0), (1.5, 1.0)])
@pytest.mark.parametrize("stopwords", [False, True])
def test_matches_bruteforce_formula(k1, b, stopwords):
    rng = random.Random(hash((k1, b, stopwords)) & 0xFFFF)
    texts = _random_corpus(rng, 37)
    bm = BM25(texts, k1=k1, b=b, stopwords=stopwords)
    for _ in range(5):
        q = " ".join(rng.choice([f"w{i}" for i in range(45)] + ["the", "W3", "w3"]) for _ in range(rng.randint(1, 6)))
        np.testing.assert_allclose(bm.scores(q), _reference(texts, q, k1, b, stopwords), rtol=1e-12, atol=1e-12)


def test_hand_computed():
    texts = ["cat cat dog", "dog", "bird"]
    bm = BM25(texts, k1=1.2, b=0.75)
    avgdl = 5 / 3
    idf_cat = math.log(1 + (3 - 1 + 0.5) / 1.5)
    expect0 = idf_cat * 2 * 2.2 / (2 + 1.2 * (0.25 + 0.75 * 3 / avgdl))
    s = bm.scores("Cat!")
    assert s[0] == pytest.approx(expect0, rel=1e-12)
    assert s[1] == 0 and s[2] == 0
    assert bm.idf("cat") == pytest.approx(idf_cat) and bm.idf("zebra") == 0.0


def test_tokenize_and_stopwords():
    assert tokenize("The BERT-base model, v2.") == ["the", "bert", "base", "model", "v2"]
    assert tokenize("The BERT-base model", stopwords=True) == ["bert", "base", "model"]
    assert "the" in ENGLISH_STOPWORDS
    bm = BM25(["the the the", "the model"], stopwords=True)
    assert bm.scores("the").tolist() == [0.0, 0.0]  # a stopword-only query matches nothing


@pytest.mark.parametrize("passage, query", [
    ("text classi\ufb01cation", "classification"),   # the "fi" ligature of PDF-extracted text
    ("caf\u00e9 au lait", "cafe\u0301"),              # precomposed passage, decomposed query
    ("cafe\u0301 au lait", "CAF\u00c9"),              # and the other way round, upper case
    ("die Stra\u00dfe", "STRASSE"),                    # case folding: sharp s
    ("\uff2b\uff41\uff49 model", "kai"),             # full-width letters
])
def test_unicode_forms_match(passage, query):
    # NFKC + case folding (the default): the same word in another Unicode form matches; lowercase-only does not
    texts = [passage, "an unrelated paragraph"]
    assert BM25(texts).scores(query)[0] > 0
    assert BM25(texts).scores(query)[0] == pytest.approx(BM25([tokenize_text(passage), texts[1]]).scores(query)[0])
    assert BM25(texts, unicode=False).scores(query)[0] == 0


def test_combining_marks_stay_inside_words():
    hindi = "\u0939\u093f\u0928\u094d\u0926\u0940 \u092d\u093e\u0937\u093e"  # two words, each with vowel signs
    assert tokenize(hindi) == hindi.split()
    assert len(tokenize(hindi, unicode=False)) == 5  # the old tokeniser cut them into consonants
    assert tokenize("na\u00efve caf\u00e9", unicode=True) == tokenize("nai\u0308ve CAFE\u0301")


def tokenize_text(text):
    return " ".join(tokenize(text))


def test_nfkc_is_identity_on_ascii():
    rng = random.Random(5)
    texts = [t.upper() + " Mixed-Case, v2!" for t in _random_corpus(rng, 20)]
    for t in texts:
        assert tokenize(t) == tokenize(t, unicode=False) == _ascii_reference(t)


def _ascii_reference(text):
    import re

    return re.findall(r"\w+", text.lower())


def test_topk_order_ties_and_unknown_terms():
    bm = BM25(["alpha beta", "beta", "gamma", "beta"])
    s, i = bm.topk("beta", 3)
    assert i.tolist() == [1, 3, 0]  # equal scores: lower id first; longer doc scores lower
    assert np.all(np.diff(s) <= 0)
    s, i = bm.topk("zzz", 10)
    assert len(i) == 4 and s.tolist() == [0.0] * 4 and i.tolist() == [0, 1, 2, 3]
    assert bm.scores("").tolist() == [0.0] * 4


def test_empty_documents_are_fine():
    bm = BM25(["", "word"])
    assert bm.scores("word")[0] == 0 and bm.scores("word")[1] > 0
    assert BM25([""]).scores("x").tolist() == [0.0]


def test_bad_input():
    with pytest.raises(ValueError, match="texts is empty"):
        BM25([])
    with pytest.raises(TypeError, match="texts must be a sequence"):
        BM25("one string")
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        BM25(["ok", 3])
    with pytest.raises(ValueError, match="k1"):
        BM25(["a"], k1=-1)
    with pytest.raises(ValueError, match="b must be"):
        BM25(["a"], b=1.5)
    bm = BM25(["a"])
    with pytest.raises(TypeError, match="query"):
        bm.scores(None)
    with pytest.raises(ValueError, match="k must be"):
        bm.topk("a", 0)
