"""Tokenizer: exact round trip on code with unicode, end-of-text detection, caching, checkpoint folders."""

import json

import pytest
from tokenizers import Tokenizer, models

import data.tokenizer
from data import EOT, eot_id, load_corpus, load_tokenizer, tokenizer_fingerprint, train_bpe_tokenizer

CODE = (
    'def größe(x: float) -> str:\n\t"""Naïve λ-calculus — 数据 ✓ 🚀."""\r\n'
    '    return f"{x!r:>10}"   \n\n\n  # trailing\n'
)


pytestmark = pytest.mark.usefixtures("isolated_cache")


@pytest.fixture
def corpus(tmp_path):
    root = tmp_path / "src"
    root.mkdir()
    for i in range(20):
        (root / f"m{i}.py").write_text(f"def func_{i}(value):\n    return value * {i}  # ünï\n" * 5 + CODE)
    return load_corpus(str(root))


def test_round_trip_and_eot(corpus):
    tok = train_bpe_tokenizer(corpus, vocab_size=400)
    assert tok.get_vocab_size() <= 400 and eot_id(tok) == 0 and tok.id_to_token(0) == EOT
    for text in (CODE, "never seen: ☃ ∮ 𝔘 Ω\x00\x7f", " leading space\n\n"):
        ids = tok.encode(text).ids
        assert tok.decode(ids) == text
    assert len(tok.encode(CODE).ids) < len(CODE.encode())  # merges were learned


def test_trained_tokenizer_is_cached(corpus, monkeypatch):
    tok = train_bpe_tokenizer(corpus, vocab_size=400)

    def no_training(*a, **k):
        raise AssertionError("retrained despite the cache")

    monkeypatch.setattr(data.tokenizer.trainers, "BpeTrainer", no_training)
    assert tokenizer_fingerprint(train_bpe_tokenizer(corpus, vocab_size=400)) == tokenizer_fingerprint(tok)
    with pytest.raises(AssertionError, match="retrained"):  # another vocab size is another tokenizer
        train_bpe_tokenizer(corpus, vocab_size=300)


def test_load_tokenizer_file_and_folders(corpus, tmp_path):
    tok = train_bpe_tokenizer(corpus, vocab_size=300)
    ours = tmp_path / "ours"
    ours.mkdir()
    (ours / "tokenizer.json").write_text(tok.to_str())
    for p in (ours, ours / "tokenizer.json"):
        assert tokenizer_fingerprint(load_tokenizer(p)) == tokenizer_fingerprint(tok)
    # an OPT-style folder: vocab.json + merges.txt, eos "</s>" declared in tokenizer_config.json; a plain
    # "<|endoftext|>" vocab entry (OPT's vocab has GPT-2's) must not win over the declared eos
    opt = tmp_path / "opt"
    opt.mkdir()
    tok.model.save(str(opt))
    vocab = json.loads((opt / "vocab.json").read_text())
    vocab["</s>"] = max(vocab.values()) + 1
    (opt / "vocab.json").write_text(json.dumps(vocab))
    (opt / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "</s>"}}))
    t2 = load_tokenizer(opt)
    assert eot_id(t2) == vocab["</s>"]
    assert t2.decode(t2.encode(CODE, add_special_tokens=False).ids) == CODE
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)


def test_eot_missing_is_a_clear_error():
    with pytest.raises(ValueError, match="No end-of-text token"):
        eot_id(Tokenizer(models.BPE(vocab={"a": 0}, merges=[])))
