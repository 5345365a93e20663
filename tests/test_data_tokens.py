"""Token cache: documents joined with end-of-text, tokenized once, memory-mapped, written atomically."""

import numpy as np
import pytest
from tokenizers import AddedToken, Tokenizer, processors

import data.tokens
from data import (
    TrainSampler,
    builtin_pretrain_corpus,
    cache_dir,
    eot_id,
    load_corpus,
    load_tokenizer,
    split_corpus,
    token_array,
    train_bpe_tokenizer,
    val_windows,
)

real_encode = data.tokens.encode_corpus


pytestmark = pytest.mark.usefixtures("isolated_cache")


def encoded_by_hand(corpus, tok) -> np.ndarray:
    """The token stream the cache should hold, computed here: each document's tokens, then end-of-text."""
    eot = eot_id(tok)
    return np.array([i for _, text in corpus.docs for i in (*tok.encode(text, add_special_tokens=False).ids, eot)])


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
    assert calls == [1] and np.array_equal(ids, encoded_by_hand(corpus, tok))  # written whole the second time


def test_checkpoint_tokenizer_bos_is_not_inserted(corpus_tok, tmp_path):
    """OPT's post-processor prepends </s> to every encode; the token stream must hold only EOT separators."""
    corpus, ours = corpus_tok
    tok = Tokenizer.from_str(ours.to_str())
    tok.add_special_tokens([AddedToken("</s>", special=True)])
    eos = tok.token_to_id("</s>")
    tok.post_processor = processors.TemplateProcessing(single="</s> $A", special_tokens=[("</s>", eos)])
    (tmp_path / "opt").mkdir()
    tok.save(str(tmp_path / "opt" / "tokenizer.json"))
    tok = load_tokenizer(tmp_path / "opt")
    assert tok.encode("x = 1").ids[0] == eos  # the post-processor is live ...
    ids = token_array(corpus, tok)
    assert eot_id(tok) == 0  # ours and declared special: "<|endoftext|>" first
    assert len(ids) == sum(len(tok.encode(t, add_special_tokens=False).ids) + 1 for _, t in corpus.docs)
    assert not (np.asarray(ids) == eos).any()  # ... but never used for the cache


def test_builtin_pipeline_tiny_cut():
    corpus = builtin_pretrain_corpus(max_bytes=300_000)
    train, val = split_corpus(corpus, 0.2)
    tok = train_bpe_tokenizer(train, vocab_size=512)
    ids, vids = token_array(train, tok), token_array(val, tok)
    assert np.array_equal(ids, encoded_by_hand(train, tok)) and np.array_equal(vids, encoded_by_hand(val, tok))
    assert tok.get_vocab_size() == 512 and int(ids.max()) < 512
    sampler = TrainSampler(ids, 64, 4, seed=0)
    x, y = sampler.batch(0)
    assert x.shape == y.shape == (4, 64)
    for row, start in enumerate(sampler.offsets(0)):  # each row a window of the stream, targets one token on
        assert np.array_equal(x[row].numpy(), ids[start : start + 64])
        assert np.array_equal(y[row].numpy(), ids[start + 1 : start + 65])
    xv, yv = val_windows(vids, 64, 1024)  # the first 1024 predictions of the stream, in order, each once
    assert xv.shape == yv.shape == (16, 64)
    assert np.array_equal(xv.flatten().numpy(), vids[:1024]) and np.array_equal(yv.flatten().numpy(), vids[1:1025])
    assert tok.decode(tok.encode(corpus.docs[0][1]).ids) == corpus.docs[0][1]
