"""MQAR, multi-query associative recall (Zoology, Arora et al. 2023): the model reads key-value pairs, then is
asked for the values of some of the keys. It measures how much a sequence mixer can store and retrieve in
context, which is what Hope's fast memories are for.

Token ids: 0 pads; keys are 1..num_keys; values follow them. A row with P pairs and Q queries is

    k_1 v_1 k_2 v_2 ... k_P v_P   q_1 a_1 q_2 a_2 ... q_Q a_Q   0 0 ... 0        (length seq_len)

where the q are distinct keys of the context in random order and a_j its value. Only the a_j are labelled,
so accuracy is the fraction of answers the model predicts (greedy) from its query key.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from datasets import Dataset, concatenate_datasets

from hope.evals.common import IGNORE_INDEX, labelled_correct

PAD_ID = 0


@dataclass(frozen=True)
class MQARTask:
    """One MQAR setting: `num_pairs` key-value pairs in context, `num_queries` of them asked (default all),
    keys drawn from `num_keys` ids and values from `num_values` ids, rows padded to `seq_len`."""

    num_pairs: int = 8
    num_queries: Optional[int] = None
    num_keys: int = 64
    num_values: int = 64
    seq_len: int = 64

    def __post_init__(self):
        queries = self.queries
        if not 1 <= self.num_pairs <= self.num_keys:
            raise ValueError(f"num_pairs={self.num_pairs} must be in [1, num_keys={self.num_keys}] (keys are distinct)")
        if not 1 <= queries <= self.num_pairs:
            raise ValueError(f"num_queries={queries} must be in [1, num_pairs={self.num_pairs}]")
        if self.num_values < 1:
            raise ValueError(f"num_values={self.num_values} must be positive")
        if 2 * (self.num_pairs + queries) > self.seq_len:
            raise ValueError(f"seq_len={self.seq_len} is shorter than the {2 * (self.num_pairs + queries)} tokens of "
                             f"{self.num_pairs} pairs and {queries} queries")

    @property
    def queries(self) -> int:
        return self.num_pairs if self.num_queries is None else self.num_queries

    @property
    def vocab_size(self) -> int:
        """Smallest model vocabulary that holds the task's ids."""
        return 1 + self.num_keys + self.num_values


def generate_mqar(task: MQARTask, num_examples: int, seed: int) -> Dataset:
    """`num_examples` random rows of `task` as a Dataset with "input_ids" and "labels" (seq_len each), and the
    setting in "num_pairs"; the same seed gives the same rows."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.full((num_examples, task.seq_len), PAD_ID, dtype=torch.long)
    labels = torch.full_like(ids, IGNORE_INDEX)
    pairs, queries = task.num_pairs, task.queries
    for row in range(num_examples):
        keys = 1 + torch.randperm(task.num_keys, generator=generator)[:pairs]
        values = 1 + task.num_keys + torch.randint(0, task.num_values, (pairs,), generator=generator)
        ids[row, 0 : 2 * pairs : 2], ids[row, 1 : 2 * pairs : 2] = keys, values
        asked = torch.randperm(pairs, generator=generator)[:queries]
        start = 2 * pairs
        ids[row, start : start + 2 * queries : 2] = keys[asked]
        ids[row, start + 1 : start + 2 * queries : 2] = values[asked]
        labels[row, start + 1 : start + 2 * queries : 2] = values[asked]
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": labels.tolist(),
                              "num_pairs": [pairs] * num_examples})


def generate_mixture(tasks: Sequence[MQARTask], num_examples: int, seed: int) -> Dataset:
    """Rows of several settings (same seq_len), `num_examples` of each, shuffled together."""
    if len({task.seq_len for task in tasks}) != 1:
        raise ValueError("all settings of a mixture must share seq_len")
    parts = [generate_mqar(task, num_examples, seed + 1000 * index) for index, task in enumerate(tasks)]
    return concatenate_datasets(parts).shuffle(seed=seed)


def mqar_accuracy(model, dataset: Dataset, batch_size: int = 32, progress: bool = False) -> float:
    """Fraction of the labelled answers that `model` predicts greedily from the query key (`progress`: a bar)."""
    correct = labelled_correct(model, dataset, batch_size, progress)
    answers = int((torch.tensor(dataset["labels"]) != IGNORE_INDEX).sum())
    return int(correct.sum()) / max(answers, 1)
