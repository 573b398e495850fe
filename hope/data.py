"""The demo's corpus, offline: Python's own help topics (`pydoc_data.topics`), split by topic, as byte tokens.

The pipeline, one small function per step:

    load_topics()                     {topic name: text}, ~465k characters of English, shipped with CPython
    split_topics(names)               (train names, validation names): a deterministic hash of each name, so a
                                      topic's text lies wholly on one side and nothing leaks into validation
    topics_dataset(topics, names)     datasets.Dataset with columns "topic" and "text"
    tokenize_dataset(ds, tokenizer)   + "input_ids": the text's UTF-8 bytes (ByT5: byte b -> id b + 3), then </s>
    pack_dataset(ds, seq_len, eos)    fixed-length blocks of the concatenated stream: "input_ids" and "labels"
    build_datasets(tokenizer, ...)    all of the above for both splits

For `hope-train`, `load_text_dataset(source)` reads user data (local files, a saved directory or a hub name)
and `pack_for_training` tokenizes and packs it the same way, with EOS as a target. A row is a document: a
.txt file is one document, or one per paragraph (`text_split`), its newlines kept, so EOS marks only the ends
of documents and a validation split by rows never shares a document with training.

In the demo, labels are the input ids with every </s> replaced by -100: the model still sees </s> as a topic separator,
but never has to predict it, so the loss is a mean over UTF-8 bytes only and bits per byte = loss / ln 2.
"""
from __future__ import annotations

import glob
import hashlib
import math
import os
import re
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

from datasets import Dataset, DatasetDict, IterableDataset

IGNORE_INDEX = -100  # label value the causal-LM loss skips


class DataError(ValueError):
    """Data that cannot be trained on (empty, too short, a missing column): the CLIs print it without a traceback."""


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


def tokenize_dataset(dataset, tokenizer, text_column: str = "text"):
    """Add "input_ids": each text's tokens (no special tokens) followed by the tokenizer's EOS (for ByT5: the
    UTF-8 bytes + 3, then </s>); drops the other columns. Works on `Dataset` and streamed `IterableDataset`."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []

    def tokenize(batch: dict) -> dict:
        encoded = tokenizer(batch[text_column], add_special_tokens=False)
        return {"input_ids": [ids + eos for ids in encoded["input_ids"]]}

    columns = dataset.column_names or [text_column]
    extra = {} if isinstance(dataset, IterableDataset) else {"desc": "tokenize"}
    return dataset.map(tokenize, batched=True, remove_columns=columns, **extra)


def pack_dataset(dataset, seq_len: int, ignore_token_id: Optional[int] = None, name: str = "the dataset"):
    """Concatenate every row's "input_ids" and cut the stream into blocks of `seq_len` tokens.

    The remainder (< seq_len tokens) is dropped, so every block is full and needs no padding or attention
    mask. "labels" are the ids, with `ignore_token_id` (if given) set to -100 (the shift happens inside the
    model). A `Dataset` is packed as one stream; a streamed `IterableDataset` per 1000 rows.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len={seq_len!r} is not allowed: it must be at least 2")

    def pack(batch: dict) -> dict:
        stream = [token for ids in batch["input_ids"] for token in ids]
        blocks = [stream[start : start + seq_len] for start in range(0, len(stream) - seq_len + 1, seq_len)]
        labels = [[IGNORE_INDEX if token == ignore_token_id else token for token in block] for block in blocks]
        return {"input_ids": blocks, "labels": labels}

    if isinstance(dataset, IterableDataset):
        return dataset.map(pack, batched=True, batch_size=1000, remove_columns=["input_ids"])
    # batch_size=None packs the whole split as one stream, so only one remainder is dropped.
    packed = dataset.map(pack, batched=True, batch_size=None, remove_columns=dataset.column_names, desc="pack")
    if len(packed) == 0:
        total = sum(len(ids) for ids in dataset["input_ids"])
        raise DataError(f"{name} has only {total} tokens: fewer than one block of seq_len={seq_len}")
    return packed


def build_datasets(tokenizer, seq_len: int = 256, validation_fraction: float = 0.1) -> DatasetDict:
    """The demo's packed datasets: DatasetDict(train=..., validation=...), each with "input_ids" and "labels"
    of length `seq_len`; which topics each split holds is `split_topics(load_topics(), validation_fraction)`."""
    topics = load_topics()
    train_names, validation_names = split_topics(topics, validation_fraction)
    splits = {}
    for split, names in (("train", train_names), ("validation", validation_names)):
        tokens = tokenize_dataset(topics_dataset(topics, names), tokenizer)
        splits[split] = pack_dataset(tokens, seq_len, ignore_token_id=tokenizer.eos_token_id)
    return DatasetDict(splits)


def count_target_bytes(dataset: Dataset) -> int:
    """How many tokens the loss is averaged over: labels other than -100, minus each block's first position
    (a causal LM predicts tokens 1..T-1 of a block)."""
    return sum(sum(1 for label in labels[1:] if label != IGNORE_INDEX) for labels in dataset["labels"])


def bits_per_byte(loss_nats: float) -> float:
    """Bits per byte from a mean per-byte loss in nats (one token = one UTF-8 byte with ByT5)."""
    return loss_nats / math.log(2)


# ------------------------------------------------------------------------------ user data (hope-train)

FILE_BUILDERS = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet",
                 ".csv": "csv"}
# How a text file is cut into rows (documents). "paragraph" (the default) cuts at blank lines: one corpus file
# still gives many documents to split validation by, and the newlines inside a paragraph are kept.
TEXT_SPLITS = ("paragraph", "document", "line")
# A paragraph break: the newline ending a line, one or more blank (whitespace-only) lines, and their newlines;
# the next paragraph keeps its indentation.
_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")


def split_paragraphs(text: str) -> List[str]:
    """The paragraphs of `text`: the pieces between blank lines, trailing whitespace removed, blank ones dropped."""
    return [piece.rstrip() for piece in _PARAGRAPH_BREAK.split(text) if piece.strip()]


def _first_undecodable(files: Sequence[str]) -> Optional[Tuple[str, int, int]]:
    """(file, byte offset, byte) of the first byte that is not valid UTF-8 in `files`, or None."""
    import codecs

    for path in files:
        decoder = codecs.getincrementaldecoder("utf-8")()
        offset = 0  # of the first byte the decoder has not consumed (it holds an incomplete character back)
        with open(path, "rb") as handle:
            while True:
                chunk = handle.read(1 << 20)
                pending = len(decoder.getstate()[0])
                try:
                    decoder.decode(chunk, final=not chunk)
                except UnicodeDecodeError as error:  # error.object is the held-back bytes + chunk
                    return path, offset - pending + error.start, error.object[error.start]
                if not chunk:
                    break
                offset += len(chunk)
    return None


def _unreadable(source: str, files: Sequence[str], error: BaseException) -> DataError:
    """A one-line DataError for files `datasets` failed to read: the first byte that is not UTF-8, when that is
    the cause, else the innermost exception's type and message."""
    cause = error
    while cause.__cause__ is not None or cause.__context__ is not None:
        cause = cause.__cause__ or cause.__context__
    if isinstance(cause, UnicodeDecodeError) or isinstance(error, UnicodeDecodeError):
        found = _first_undecodable(files)
        if found is not None:
            path, offset, byte = found
            return DataError(f"{path!r} is not UTF-8 text (byte 0x{byte:02x} at offset {offset}): binary data? "
                             "text files are read as UTF-8")
    message = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
    return DataError(f"cannot read {source!r}: {type(cause).__name__}: {message}")


def _data_files(source: str) -> Optional[List[str]]:
    """The files a --data argument names (a file, a glob, or a directory of data files), or None when it names
    no local path at all (then it is a hub dataset name). Raises FileNotFoundError for a path that does not
    exist or holds no data files."""
    if any(char in source for char in "*?["):
        files = sorted(glob.glob(source, recursive=True))
        if not files:
            raise FileNotFoundError(f"no file matches {source!r}")
        return files
    path = Path(source)
    if path.is_file():
        return [str(path)]
    if path.is_dir():
        files = sorted(str(p) for p in path.rglob("*") if p.is_file() and p.suffix.lower() in FILE_BUILDERS)
        if not files:
            raise FileNotFoundError(f"directory {source!r} holds no {'/'.join(sorted(FILE_BUILDERS))} files "
                                    "and is not a saved datasets directory")
        return files
    looks_local = source.startswith((".", "/", "~")) or Path(source).suffix.lower() in FILE_BUILDERS \
        or source.count("/") > 1
    if looks_local:
        raise FileNotFoundError(f"no such file or directory: {source!r}")
    return None


def load_text_dataset(source: str, *, config: Optional[str] = None, text_column: str = "text",
                      streaming: bool = False, split: str = "train",
                      text_split: str = "paragraph") -> Union[Dataset, IterableDataset]:
    """Load the texts of `source` with `datasets`: a txt/json/jsonl/parquet/csv file, glob or directory of them
    (`load_dataset(<builder>, data_files=...)`), a directory written by `save_to_disk`, or a hub dataset name.

    A row is a document. Text files (.txt, .text) are read as UTF-8 and cut by `text_split`: "paragraph" (at
    blank lines), "document" (a file a row) or "line" (a line a row, without its newline); paragraphs and
    documents keep their inner newlines. Returns a Dataset (or IterableDataset with `streaming`) whose column
    `text_column` holds strings. Raises FileNotFoundError for missing paths, and DataError for data with no
    text in it (empty or whitespace only), a file that is not UTF-8 text, a missing column, or mixed file types.
    """
    from datasets import load_dataset, load_from_disk

    if text_split not in TEXT_SPLITS:
        raise DataError(f"--text_split {text_split!r} is not allowed: choose one of {', '.join(TEXT_SPLITS)}")
    saved = Path(source) / "dataset_info.json", Path(source) / "dataset_dict.json", Path(source) / "state.json"
    files: List[str] = []
    if Path(source).is_dir() and any(marker.is_file() for marker in saved):
        dataset = load_from_disk(source)
        if isinstance(dataset, DatasetDict):
            if split not in dataset:
                raise DataError(f"saved dataset {source!r} has splits {list(dataset)}, not {split!r}")
            dataset = dataset[split]
        if streaming:
            dataset = dataset.to_iterable_dataset()
    else:
        files = _data_files(source) or []
        if not files:
            try:
                dataset = load_dataset(source, config, split=split, streaming=streaming)
            except Exception as error:  # the hub raises many types; the message says what went wrong
                offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "") or \
                    os.environ.get("HF_DATASETS_OFFLINE", "0") not in ("0", "")
                hint = " (HF_HUB_OFFLINE is set: hub datasets must already be cached)" if offline else ""
                raise FileNotFoundError(f"{source!r} is neither a local path nor a loadable hub dataset{hint}: "
                                        f"{type(error).__name__}: {error}") from None
        else:
            if all(os.path.getsize(f) == 0 for f in files):  # `datasets` fails on these with a bare StopIteration
                raise DataError(f"{source!r} holds no text: it is empty or whitespace only")
            builders = {FILE_BUILDERS.get(Path(f).suffix.lower()) for f in files}
            if None in builders or len(builders) != 1:
                raise DataError(f"{source!r}: the files must all be one of {sorted(FILE_BUILDERS)}, got "
                                 f"{sorted({Path(f).suffix or '(none)' for f in files})}")
            builder = builders.pop()
            options = {"sample_by": "line" if text_split == "line" else "document"} if builder == "text" else {}
            try:
                dataset = load_dataset(builder, data_files=files, split="train", streaming=streaming, **options)
            except Exception as error:  # a DatasetGenerationError wraps what the file reader raised
                raise _unreadable(source, files, error) from None
            if builder == "text" and text_split == "paragraph":
                dataset = dataset.map(lambda batch: {"text": [p for text in batch["text"] for p in split_paragraphs(text)]},
                                      batched=True, remove_columns=["text"],
                                      **({} if streaming else {"desc": "split paragraphs"}))
    columns = dataset.column_names
    if columns is not None and text_column not in columns:
        raise DataError(f"{source!r} has no column {text_column!r} (columns: {columns}); pass --text_column")
    dataset = dataset.select_columns([text_column])
    try:
        has_rows = next(iter(dataset.take(1)), None) is not None if streaming else len(dataset) > 0
    except Exception as error:  # a streamed file is first read here
        raise _unreadable(source, files, error) from None
    if not has_rows:
        raise DataError(f"{source!r} holds no text: it is empty or whitespace only")
    return dataset


def pack_for_training(dataset, tokenizer, seq_len: int, text_column: str = "text",
                      max_blocks: Optional[int] = None, name: str = "the dataset"):
    """Tokenize (each text + EOS) and pack `dataset` into blocks of `seq_len` "input_ids"/"labels"; EOS is a
    target here (a fine-tuned model should learn to stop). Keeps the first `max_blocks` blocks if given."""
    texts = dataset.filter(lambda row: bool(row[text_column] and row[text_column].strip()))
    empty = next(iter(texts.take(1)), None) is None if isinstance(texts, IterableDataset) else len(texts) == 0
    if empty:
        raise DataError(f"{name} holds no text: every row is empty or whitespace")
    packed = pack_dataset(tokenize_dataset(texts, tokenizer, text_column), seq_len, name=name)
    if max_blocks is not None:
        packed = packed.take(max_blocks) if isinstance(packed, IterableDataset) else \
            packed.select(range(min(max_blocks, len(packed))))
    return packed
