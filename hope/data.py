"""The demo's corpus, offline: Python's own help topics (`pydoc_data.topics`), split by topic, as byte tokens.

The pipeline, one small function per step:

    load_topics()                     {topic name: text}, ~465k characters of English, shipped with CPython
    split_topics(names)               (train names, validation names): a deterministic hash of each name, so a
                                      topic's text lies wholly on one side and nothing leaks into validation
    topics_dataset(topics, names)     datasets.Dataset with columns "topic" and "text"
    tokenize_dataset(ds, tokenizer)   + "input_ids": the text's UTF-8 bytes (ByT5: byte b -> id b + 3), then </s>
    pack_dataset(ds, seq_len, eos)    fixed-length blocks of the concatenated stream: "input_ids" and "labels"
    build_datasets(tokenizer, ...)    all of the above for both splits

Labels are the input ids with every </s> replaced by -100: the model still sees </s> as a topic separator,
but never has to predict it, so the loss is a mean over UTF-8 bytes only and bits per byte = loss / ln 2.
"""
from __future__ import annotations

import hashlib
import math
from typing import Dict, Iterable, List, Sequence, Tuple

from datasets import Dataset, DatasetDict

IGNORE_INDEX = -100  # label value the causal-LM loss skips


def load_topics() -> Dict[str, str]:
    """Return CPython's help topics ({name: text}, ~80 topics): an English corpus that needs no download."""
    try:
        from pydoc_data.topics import topics
    except ImportError as error:  # some stripped-down Python builds drop pydoc_data
        raise RuntimeError(
            "the demo corpus is Python's own `pydoc_data.topics`, which this Python does not ship "
            f"({error}); use a full CPython build"
        ) from error
    topics = {name: text for name, text in topics.items() if text.strip()}
    if not topics:
        raise RuntimeError("pydoc_data.topics.topics is empty: nothing to train on")
    return dict(sorted(topics.items()))


def topic_bucket(name: str) -> float:
    """A deterministic pseudo-random number in [0, 1) for a topic name (SHA-256, stable across runs and
    Python processes, unlike the salted built-in `hash`)."""
    return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "big") / 2.0**64


def split_topics(names: Iterable[str], validation_fraction: float = 0.1) -> Tuple[List[str], List[str]]:
    """Split topic names into (train, validation) by `topic_bucket(name) < validation_fraction`.

    The split is by topic, never inside one, so no text is shared. Both sides are guaranteed non-empty: with
    no name under the threshold the lowest-bucket topic goes to validation (and vice versa for train).
    """
    names = sorted(set(names))
    if len(names) < 2:
        raise ValueError(f"need at least 2 topics to split into train and validation, got {len(names)}")
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(f"validation_fraction={validation_fraction!r} is not allowed: it must be in (0, 1)")
    by_bucket = sorted(names, key=topic_bucket)
    validation = {name for name in names if topic_bucket(name) < validation_fraction}
    if not validation:
        validation = {by_bucket[0]}
    if len(validation) == len(names):
        validation.discard(by_bucket[-1])
    train = [name for name in names if name not in validation]
    return train, sorted(validation)


def topics_dataset(topics: Dict[str, str], names: Sequence[str]) -> Dataset:
    """A `datasets.Dataset` with one row per topic: columns "topic" and "text"."""
    return Dataset.from_dict({"topic": list(names), "text": [topics[name] for name in names]})


def tokenize_dataset(dataset: Dataset, tokenizer) -> Dataset:
    """Add "input_ids": each text tokenized (for ByT5: its UTF-8 bytes, then </s>); drops the other columns."""

    def tokenize(batch: dict) -> dict:
        encoded = tokenizer(batch["text"], add_special_tokens=True)
        return {"input_ids": encoded["input_ids"]}

    return dataset.map(tokenize, batched=True, remove_columns=dataset.column_names, desc="tokenize")


def pack_dataset(dataset: Dataset, seq_len: int, eos_token_id: int) -> Dataset:
    """Concatenate every row's "input_ids" and cut the stream into blocks of `seq_len` tokens.

    The remainder (< seq_len tokens) is dropped, so every block is full and needs no padding or attention
    mask. "labels" are the ids with `eos_token_id` set to -100 (the shift happens inside the model).
    """
    if seq_len < 2:
        raise ValueError(f"seq_len={seq_len!r} is not allowed: it must be at least 2")

    def pack(batch: dict) -> dict:
        stream = [token for ids in batch["input_ids"] for token in ids]
        blocks = [stream[start : start + seq_len] for start in range(0, len(stream) - seq_len + 1, seq_len)]
        labels = [[IGNORE_INDEX if token == eos_token_id else token for token in block] for block in blocks]
        return {"input_ids": blocks, "labels": labels}

    # batch_size=None packs the whole split as one stream, so only one remainder is dropped.
    packed = dataset.map(pack, batched=True, batch_size=None, remove_columns=dataset.column_names, desc="pack")
    if len(packed) == 0:
        total = sum(len(ids) for ids in dataset["input_ids"])
        raise ValueError(f"only {total} tokens: fewer than one block of seq_len={seq_len}")
    return packed


def build_datasets(tokenizer, seq_len: int = 256, validation_fraction: float = 0.1) -> DatasetDict:
    """The demo's packed datasets: DatasetDict(train=..., validation=...), each with "input_ids" and "labels"
    of length `seq_len`; which topics each split holds is `split_topics(load_topics(), validation_fraction)`."""
    topics = load_topics()
    train_names, validation_names = split_topics(topics, validation_fraction)
    splits = {}
    for split, names in (("train", train_names), ("validation", validation_names)):
        tokens = tokenize_dataset(topics_dataset(topics, names), tokenizer)
        splits[split] = pack_dataset(tokens, seq_len, tokenizer.eos_token_id)
    return DatasetDict(splits)


def count_target_bytes(dataset: Dataset) -> int:
    """How many tokens the loss is averaged over: labels other than -100, minus each block's first position
    (a causal LM predicts tokens 1..T-1 of a block)."""
    return sum(sum(1 for label in labels[1:] if label != IGNORE_INDEX) for labels in dataset["labels"])


def bits_per_byte(loss_nats: float) -> float:
    """Bits per byte from a mean per-byte loss in nats (one token = one UTF-8 byte with ByT5)."""
    return loss_nats / math.log(2)
