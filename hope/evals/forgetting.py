"""Forgetting within one long stream: does what a model learnt in context early survive what it learns later?

A stream is `num_segments` segments. Segment s teaches `pairs_per_segment` facts "(marker_s, key) -> value",
each written as the three tokens `marker_s key value`, every fact `repeats` times in random order. Keys come
from a small shared pool, so later segments teach *other* values for keys that earlier segments used: the new
facts interfere with the old ones, and only the segment marker tells them apart. After the last segment every
fact of every segment is asked once, in random order, as `marker_s key ?` (only the value is labelled).

Recall is reported by age: the accuracy on facts taught 0, 1, ..., num_segments - 1 segments before the end.
A model that keeps old facts has a flat curve; catastrophic forgetting is a curve that falls with age. This
tests the paper's claim that continuum memory resists forgetting, and the numbers say what they say.

Token ids: 0 pads; markers are 1..num_segments; keys and values follow.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from datasets import Dataset

from hope.evals.common import IGNORE_INDEX, labelled_correct


@dataclass(frozen=True)
class ForgettingTask:
    """One stream setting; see the module docstring."""

    num_segments: int = 6
    pairs_per_segment: int = 4
    num_keys: int = 12
    num_values: int = 32
    repeats: int = 2

    def __post_init__(self):
        if self.num_segments < 1 or self.repeats < 1:
            raise ValueError(f"num_segments={self.num_segments} and repeats={self.repeats} must be positive")
        if not 1 <= self.pairs_per_segment <= self.num_keys:
            raise ValueError(f"pairs_per_segment={self.pairs_per_segment} must be in [1, num_keys={self.num_keys}] "
                             "(keys within a segment are distinct)")
        if self.num_values < 2:
            raise ValueError(f"num_values={self.num_values} must be at least 2")

    @property
    def facts(self) -> int:
        return self.num_segments * self.pairs_per_segment

    @property
    def seq_len(self) -> int:
        """Teaching (3 tokens per fact per repeat) plus one query of 3 tokens per fact."""
        return 3 * self.facts * (self.repeats + 1)

    @property
    def vocab_size(self) -> int:
        return 1 + self.num_segments + self.num_keys + self.num_values


def generate_stream(task: ForgettingTask, num_examples: int, seed: int) -> Dataset:
    """`num_examples` streams as a Dataset: "input_ids", "labels" (the queried values only) and "age" (for every
    position, how many segments before the end its fact was taught; -1 where nothing is asked)."""
    generator = torch.Generator().manual_seed(seed)
    segments, pairs = task.num_segments, task.pairs_per_segment
    first_key, first_value = 1 + segments, 1 + segments + task.num_keys
    rows = {"input_ids": [], "labels": [], "age": []}
    for _ in range(num_examples):
        facts = []  # (marker, key, value, age)
        tokens = []
        for segment in range(segments):
            keys = first_key + torch.randperm(task.num_keys, generator=generator)[:pairs]
            values = first_value + torch.randint(0, task.num_values, (pairs,), generator=generator)
            taught = [(1 + segment, int(k), int(v), segments - 1 - segment) for k, v in zip(keys, values)]
            facts += taught
            for _ in range(task.repeats):
                for index in torch.randperm(pairs, generator=generator).tolist():
                    tokens += taught[index][:3]
        labels = [IGNORE_INDEX] * len(tokens)
        ages = [-1] * len(tokens)
        for index in torch.randperm(len(facts), generator=generator).tolist():
            marker, key, value, age = facts[index]
            tokens += [marker, key, value]
            labels += [IGNORE_INDEX, IGNORE_INDEX, value]
            ages += [-1, -1, age]
        rows["input_ids"].append(tokens)
        rows["labels"].append(labels)
        rows["age"].append(ages)
    return Dataset.from_dict(rows)


def recall_by_age(model, dataset: Dataset, num_segments: int, batch_size: int = 32,
                  progress: bool = False) -> list[float]:
    """Accuracy on the queried facts grouped by age: entry a is the recall of facts taught a segments before
    the end of the teaching part (0 = the last segment). `progress` shows a tqdm bar."""
    correct = labelled_correct(model, dataset.select_columns(["input_ids", "labels"]), batch_size, progress)
    ages = torch.tensor(dataset["age"])
    return [float(correct[ages == age].float().mean()) for age in range(num_segments)]
