"""The tokenizer stored in a GGUF file's `tokenizer.ggml.*` metadata, rebuilt as a `tokenizers.Tokenizer`.

A GGUF holds no tokenizer.json: it stores the vocabulary, the merges, a type per token (normal, control, ...) and
the name of the pre-tokenizer llama.cpp applies (`tokenizer.ggml.pre`). Only byte-level BPE vocabularies
(`tokenizer.ggml.model == "gpt2"`: SmolLM, Qwen2, Llama 3) are built; the text split before BPE is picked by the
pre-tokenizer's name, and a name without a known split is refused rather than guessed, since a wrong split gives
other ids without any error. The result gives the ids transformers' own GGUF tokenizer gives
(`AutoTokenizer.from_pretrained(folder, gguf_file=...)`), checked in tests/test_gguf_tokenizer.py.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

from model.gguf import field, open_gguf

# llama.cpp's token types (llama_token_type): 3 is a control token (<|endoftext|>), 4 a user-defined one (<think>).
CONTROL, USER_DEFINED = 3, 4
# GPT-2's split (the tokenizers ByteLevel regex); the SmolLM / StarCoder family first cuts every digit apart.
_GPT2_NAMES = ("default", "gpt-2", "gpt2")
_DIGIT_NAMES = ("smollm", "starcoder", "refact")
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLITS = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "smaug-bpe", "dbrx"), _LLAMA3_SPLIT),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen"), _QWEN2_SPLIT),
}
PRE_TOKENIZERS = (*_GPT2_NAMES, *_DIGIT_NAMES, *_SPLITS)


def gguf_tokenizer(path: str | Path) -> Tokenizer:
    """The byte-level BPE tokenizer of a GGUF file. Its control tokens are special tokens (kept whole, so
    data.tokenizer.eot_id finds <|endoftext|>); no BOS is added to encodings, as transformers adds none either."""
    source = str(path)
    reader = open_gguf(path)
    kind = field(reader, "tokenizer.ggml.model")
    tokens = field(reader, "tokenizer.ggml.tokens")
    if kind is None or tokens is None:
        raise ValueError(
            f"{source}: the GGUF has no tokenizer metadata (tokenizer.ggml.model / tokenizer.ggml.tokens); "
            "convert the model again with llama.cpp's convert_hf_to_gguf.py, which stores it."
        )
    if kind != "gpt2":
        raise ValueError(
            f"{source}: its tokenizer is {kind!r}; only byte-level BPE ('gpt2': SmolLM, Qwen2, Llama 3) is supported."
        )
    pre = field(reader, "tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise ValueError(
            f"{source}: pre-tokenizer {pre!r} (tokenizer.ggml.pre) is not one whose text split is known here; "
            f"known: {', '.join(PRE_TOKENIZERS)}."
        )
    merges = field(reader, "tokenizer.ggml.merges", [])
    pairs = [tuple(m.split(" ")) for m in merges]
    broken = next((m for m, p in zip(merges, pairs) if len(p) != 2), None)
    if broken is not None:
        raise ValueError(f"{source}: merge {broken!r} is not two tokens separated by one space.")
    spelling = _byte_spelling()
    alphabet = set(spelling.values())
    # A token outside the byte alphabet is a mislabelled raw string; spelled in bytes, as transformers does.
    spelled = [t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")) for t in tokens]
    vocab = {t: i for i, t in enumerate(spelled)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = _pre_tokenizer(pre)
    tok.decoder = decoders.ByteLevel()
    types = field(reader, "tokenizer.ggml.token_type", [])
    tok.add_special_tokens(
        [
            AddedToken(t, normalized=False, special=True)
            for t, kind_ in zip(tokens, types)
            if kind_ == CONTROL and set(t) <= alphabet  # a control token in raw text would grow the vocab: skipped
        ]
    )
    tok.add_tokens(
        [AddedToken(t, normalized=False, special=False) for t, kind_ in zip(tokens, types) if kind_ == USER_DEFINED]
    )
    return tok


def _pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    """The split before BPE that llama.cpp applies for `tokenizer.ggml.pre`, then the bytes -> alphabet mapping."""
    if pre in _SPLITS:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_SPLITS[pre]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _DIGIT_NAMES:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    return byte_level


def _byte_spelling() -> dict[int, str]:
    """GPT-2's byte -> character table: printable Latin-1 bytes stand for themselves, the other 68 bytes (controls,
    space, ...) take the characters from U+0100 on, in byte order."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    moved = [b for b in range(256) if b not in kept]
    return {**{b: chr(b) for b in kept}, **{b: chr(256 + i) for i, b in enumerate(moved)}}
