"""Token cache: documents joined with end-of-text, tokenized once, memory-mapped, written atomically."""
import numpy as np
import pytest

import data.tokens
from data import cache_dir, eot_id, load_corpus, split_corpus, token_array, train_bpe_tokenizer


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SLM_LORA_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def corpus_tok(tmp_path):
    root = tmp_path / "src"
    root.mkdir()
    for i in range(12):
        (root / f"m{i}.py").write_text(f"# module {i} — ✓\n" + f"x_{i} = [{i}] * 3\n" * (i + 1))
    corpus = load_corpus(str(root))
    return corpus, train_bpe_tokenizer(corpus, vocab_size=300)


def test_documents_joined_with_eot(corpus_tok):
    corpus, tok = corpus_tok
    ids = token_array(corpus, tok)
    assert isinstance(ids, np.memmap) and ids.dtype == np.uint16 and not ids.flags.writeable
    eot = eot_id(tok)
    cuts = np.flatnonzero(ids == eot)
    assert len(cuts) == len(corpus.docs) and cuts[-1] == len(ids) - 1
    pieces = np.split(np.asarray(ids), cuts + 1)[:-1]
    assert [tok.decode(p[:-1].tolist()) for p in pieces] == [t for _, t in corpus.docs]


def test_cache_is_reused(corpus_tok, monkeypatch):
    corpus, tok = corpus_tok
    first = np.array(token_array(corpus, tok))

    def fail(*a, **k):
        raise AssertionError("re-tokenized despite the cache")

    monkeypatch.setattr(data.tokens, "encode_corpus", fail)
    assert np.array_equal(token_array(corpus, tok), first)
    train, _ = split_corpus(corpus, 0.3)  # another split is another cache entry
    with pytest.raises(AssertionError, match="re-tokenized"):
        token_array(train, tok)


def test_interrupted_write_leaves_no_cache(corpus_tok, monkeypatch):
    corpus, tok = corpus_tok
    real_save = np.save

    def dying_save(f, arr, *a, **k):
        f.write(b"\x93NUMPY partial")
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(data.tokens.np, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        token_array(corpus, tok)
    assert list(cache_dir("tokens").iterdir()) == []  # neither a .npy nor a stray temp file
    monkeypatch.setattr(data.tokens.np, "save", real_save)
    calls = []
    monkeypatch.setattr(data.tokens, "encode_corpus", lambda *a: calls.append(1) or real_encode(*a))
    ids = token_array(corpus, tok)
    assert calls == [1] and len(ids) > len(corpus.docs)


real_encode = data.tokens.encode_corpus
