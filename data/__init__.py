"""Corpora -> tokenizer -> cached token arrays -> batches. See each module's docstring for the why."""

from data.batches import IGNORE_INDEX, TrainSampler, val_windows
from data.cache import cache_dir
from data.corpus import Corpus, builtin_finetune_corpus, builtin_pretrain_corpus, load_corpus, split_corpus, split_tune
from data.tokenizer import EOT, eot_id, load_tokenizer, tokenizer_fingerprint, train_bpe_tokenizer
from data.tokens import token_array

__all__ = [
    "Corpus",
    "builtin_pretrain_corpus",
    "builtin_finetune_corpus",
    "load_corpus",
    "split_corpus",
    "split_tune",
    "train_bpe_tokenizer",
    "load_tokenizer",
    "eot_id",
    "tokenizer_fingerprint",
    "EOT",
    "token_array",
    "TrainSampler",
    "val_windows",
    "IGNORE_INDEX",
    "cache_dir",
]
