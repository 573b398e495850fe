"""Online / continual learning with Hope (SPEC §6): `OnlineLearner` and the `hope-learn` command.

    learner = hope.OnlineLearner(model, tokenizer=tokenizer)        # every CMS level with a chunk size learns
    learner.learn(["a document", "another one", ...])               # texts, token-id tensors, or dicts
    learner.consolidate(); model.save_pretrained("runs/learned")    # what was learned goes into the checkpoint

**What a step is (Eq. 71).** The learner reads the stream token by token (in pieces, below) and keeps one clock,
the number of tokens read since it was created or reset. Whenever the clock reaches a multiple of C_l, CMS level
l takes one optimizer step on the mean next-token cross-entropy of the tokens it has read since its previous
step (the prediction made at each of those positions), the paper's error signal. C_l is the level's
`cms_chunk_sizes[l]` unless `levels={l: C}` says otherwise; a level whose chunk size is None learns only when
given a period that way. The clock runs across sequences and across `learn()` calls, so a step lands exactly
C_l tokens after the previous one wherever the sequence boundaries fall.

**What is learned.** Level l's slow weights θ_0 = (W_gate, W_up, W_down) in every layer, through a persistent
delta that the learner keeps: the model is run with θ_0 + δ (`torch.func.functional_call`), and δ is what the
level's optimizer updates, so the model's own parameters stay untouched until `consolidate()` adds δ to them
(bitwise the tensor the learner ran with) and zeroes δ. The gradient with respect to δ is the gradient with
respect to θ_0, so this is a step on θ_0 itself; keeping it apart makes `reset()` exact and cheap, keeps the
learner's state small, and makes AdamW's weight decay (off by default) pull toward the pretrained weights
rather than toward zero. The in-context parameters of a level (P_v, w_eta, b_eta), the mixers, norms and
embeddings stay frozen unless `extra_trainable` names them; they then learn the same way, as a group of their
own with its own period (`extra_period`), learning rate and optimizer.

**The model's own in-context steps.** They stay as the model was trained: inside each sequence, every
in-context level still updates its fast weights θ_c from θ_0 + δ with its local objective (SPEC §3), and the
learner's gradient flows through that rule within the current piece. The learner therefore changes the
*starting point* of the per-sequence fast weights, which is what persists; the fast weights themselves remain
per-sequence state.

**Long sequences.** A sequence is read in pieces that end at the next step of any level (so every piece reads
the weights of the latest steps) or at the sequence's end. The model's recurrent cache (HopeCache: Titans
memories, short-convolution tails, CMS fast weights, attention keys) is carried from piece to piece and
detached after each piece (truncated backpropagation: a step's gradient reaches back to the start of the
current piece). A CMS fast weight is carried as its offset from the slow weights, θ_c = (θ_0 + δ) + offset with
the offset detached, so a step of δ moves the fast weights of the sequence in progress too, and the gradient
reaches δ through every piece. Attention mixers keep the last `attention_window` keys and values (default: the
model's `max_position_embeddings`), so a stream of any length runs in bounded memory: beyond the window, the
model attends over a sliding window, with RoPE positions still absolute (attention scores depend only on
relative positions).

**Sequence boundaries.** Each stream item is one sequence: it starts with a fresh recurrent state (the Titans
memories, CMS fast weights and keys of the previous item are dropped), and keeps everything the levels have
learned. The clock is not reset.

**Masks.** An item may be a dict with "input_ids", "attention_mask" and "labels" (Hugging Face conventions:
labels[t] is the target of position t - 1, -100 = ignored). A padded position (attention_mask 0) is removed
before the model reads it: it changes no state, teaches nothing and does not advance the clock. A position
whose label is -100 is read (it is context, and it advances the clock) but its prediction is not a learning
signal. A window in which a level has no target at all takes no optimizer step (so no optimizer moments,
counters or weight decay move): such tokens teach nothing, whatever the optimizer.

**The end of a stream.** When `learn()` returns, each level keeps what it has read since its last step (its
summed gradient and counts), and the next `learn()` call continues that window, so the clock stays exact
across calls. `flush()` (or `learn(..., flush=True)`) instead steps every level with pending targets on the
mean loss of its partial window; `hope-learn` flushes at the end of its data.

The fast paths of the model (`kernel_backend`) are used as they are: the learner only calls the model's forward.
"""
from __future__ import annotations

import argparse
import contextlib
import fnmatch
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100
OPTIMIZERS = ("sgd", "adamw", "m3")
EXTRA = "extra"  # the group key of the opt-in parameters
STATE_FORMAT = 1
LEVEL_WEIGHTS = ("w_gate", "w_up", "w_down")  # θ of a CMS level (SPEC §3)

OptimizerSpec = Union[str, Callable[[List[Tensor], float], torch.optim.Optimizer]]


def _optimizer_factory(spec: OptimizerSpec, kwargs: Mapping[str, Any], where: str):
    """A callable (params, lr) -> Optimizer for "sgd", "adamw", "m3" or a user callable."""
    if callable(spec):
        return spec
    if spec == "sgd":
        return lambda params, lr: torch.optim.SGD(params, lr=lr, **kwargs)
    if spec == "adamw":
        # weight_decay 0 by default: on δ it would pull toward the pretrained weights, a choice left to the user.
        return lambda params, lr: torch.optim.AdamW(params, lr=lr, **{"weight_decay": 0.0, **kwargs})
    if spec == "m3":
        try:
            from hope.optim import M3
        except ImportError as error:
            raise ValueError(f"{where}: optimizer='m3' needs hope.optim.M3, which this installation lacks "
                             f"({error}); use 'sgd', 'adamw' or a callable (params, lr) -> Optimizer") from None
        return lambda params, lr: M3(params, lr=lr, **kwargs)
    raise ValueError(f"{where}: optimizer={spec!r} is not allowed: choose one of {list(OPTIMIZERS)} or pass a "
                     "callable (params, lr) -> torch.optim.Optimizer")


@dataclass
class _Group:
    """One set of weights that steps together: a CMS level in every layer, or the opt-in extra parameters."""

    key: str  # "0", "1", ... for CMS levels, "extra"
    period: int  # step every `period` tokens of the clock
    lr: float
    names: List[str]  # parameter names in the model
    params: List[Tensor]  # the model's parameters (θ_0), in `names` order
    deltas: List[Tensor]  # what the learner has learned: the model runs with θ_0 + δ
    factory: Callable[[List[Tensor], float], torch.optim.Optimizer]
    optimizer: torch.optim.Optimizer = field(init=False)
    tokens: int = 0  # tokens read since the last step (the window)
    targets: int = 0  # labelled predictions in the window
    loss_sum: float = 0.0  # their summed loss (nats), for reporting
    steps: int = 0  # optimizer steps taken

    def __post_init__(self):
        self.new_optimizer()

    def new_optimizer(self) -> None:
        optimizer = self.factory(self.deltas, self.lr)
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"the optimizer factory of {self.label} returned {type(optimizer).__name__}, not a "
                            "torch.optim.Optimizer")
        self.optimizer = optimizer

    @property
    def label(self) -> str:
        return "the extra parameters" if self.key == EXTRA else f"CMS level {self.key}"


@dataclass
class _Sequence:
    """One stream item, ready to read: ids (T,) without padding, targets (T,) (targets[t] is what position t
    predicts: the next token, or -100)."""

    ids: Tensor
    targets: Tensor


class OnlineLearner:
    """Learn from a stream at each CMS level's frequency, persistently (SPEC §6); see the module docstring.

    Args:
        model: a HopeForCausalLM with at least one CMS level to learn.
        levels: which CMS levels learn: None = every level with a chunk size, each at its `cms_chunk_sizes[l]`;
            a list of level indices; or a dict {level: period} (period None = the level's chunk size), which
            can also give a `None` level a period.
        lr: one learning rate, a list (one per learned level, in `levels` order), or a dict {level: lr} that may
            also hold "extra"; missing levels get `default_lr` (1e-3).
        optimizer: "sgd", "adamw", "m3" (`hope.optim.M3`) or a callable (params, lr) -> torch.optim.Optimizer;
            or a dict {level or "extra": any of those} (entries it omits get "adamw"). Each level (and the extra
            group) has its own optimizer.
        optimizer_kwargs: keyword arguments of the named optimizers (e.g. {"momentum": 0.9} for SGD).
        extra_trainable: opt-in parameters beside the levels: a list of fnmatch patterns over parameter names
            (e.g. ["model.layers.*.cms.levels.0.p_v"]) or a predicate (name, parameter) -> bool.
        extra_period: the extra group's period in tokens (default: the shortest level period).
        tokenizer: needed for text items; `append_eos` adds its EOS after each text (as `hope-train` does).
        max_grad_norm: clip each group's gradient norm before a step (None = no clipping).
        attention_window: keys kept by attention mixers (default: `config.max_position_embeddings`).
        progress: show a tqdm bar with tokens/s.
    """

    def __init__(
        self,
        model,
        levels: Union[None, Sequence[int], Mapping[int, Optional[int]]] = None,
        lr: Union[float, Sequence[float], Mapping[Union[int, str], float]] = 1e-3,
        optimizer: Union[OptimizerSpec, Mapping[Union[int, str], OptimizerSpec]] = "adamw",
        optimizer_kwargs: Optional[Mapping[str, Any]] = None,
        extra_trainable: Union[None, Sequence[str], Callable[[str, Tensor], bool]] = None,
        extra_period: Optional[int] = None,
        tokenizer=None,
        append_eos: bool = True,
        max_grad_norm: Optional[float] = 1.0,
        attention_window: Optional[int] = None,
        progress: bool = True,
        default_lr: float = 1e-3,
    ):
        from hope.modeling_hope import HopeForCausalLM

        if not isinstance(model, HopeForCausalLM):
            hint = " (for a pretrained Llama-family model, build a Hope model with hope.stack_levels first)" \
                if "llama" in type(model).__name__.lower() or "qwen" in type(model).__name__.lower() else ""
            raise TypeError(f"OnlineLearner needs a HopeForCausalLM, got {type(model).__name__}{hint}")
        config = model.config
        self.model = model
        self.config = config
        self.tokenizer = tokenizer
        self.append_eos = append_eos
        self.progress = progress
        if max_grad_norm is not None and not (isinstance(max_grad_norm, (int, float)) and max_grad_norm > 0):
            raise ValueError(f"max_grad_norm={max_grad_norm!r} is not allowed: a number > 0, or None")
        self.max_grad_norm = max_grad_norm
        window = config.max_position_embeddings if attention_window is None else attention_window
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"attention_window={attention_window!r} is not allowed: a positive int, or None")
        self.attention_window = window
        self.optimizer_kwargs = dict(optimizer_kwargs or {})

        periods = self._resolve_levels(levels)
        lrs = self._resolve_lrs(lr, list(periods), default_lr)
        named = dict(model.named_parameters())
        self.groups: Dict[str, _Group] = {}
        for level, period in periods.items():
            names = [f"model.layers.{i}.cms.levels.{level}.{w}" for i in range(config.num_hidden_layers)
                     for w in LEVEL_WEIGHTS]
            self.groups[str(level)] = self._group(str(level), period, lrs[str(level)], names, named, optimizer)
        extra = self._resolve_extra(extra_trainable, named)
        if extra:
            period = min(periods.values()) if extra_period is None else extra_period
            if isinstance(period, bool) or not isinstance(period, int) or period < 1:
                raise ValueError(f"extra_period={extra_period!r} is not allowed: a positive int, or None")
            self.groups[EXTRA] = self._group(EXTRA, period, lrs.get(EXTRA, default_lr), extra, named, optimizer)
        elif extra_period is not None:
            raise ValueError("extra_period is given but extra_trainable selects no parameter")
        if isinstance(optimizer, Mapping):
            unknown = set(map(str, optimizer)) - set(self.groups)
            if unknown:
                raise ValueError(f"optimizer names {sorted(unknown)}, which are not learned here "
                                 f"(learned: {sorted(self.groups)})")
        # Every name of each learned tensor (tied weights have several), so that functional_call can skip its
        # per-call scan for ties (tie_weights=False) and still override all of them.
        aliases: Dict[int, List[str]] = {}
        for name, param in model.named_parameters(remove_duplicate=False):
            aliases.setdefault(id(param), []).append(name)
        self._aliases = {name: aliases[id(param)] for group in self.groups.values()
                         for name, param in zip(group.names, group.params)}
        self.tokens_read = 0  # the clock

    # ------------------------------------------------------------------------------------ configuration

    def _resolve_levels(self, levels) -> Dict[int, int]:
        sizes = list(self.config.cms_chunk_sizes)
        allowed = f"the model has levels 0..{len(sizes) - 1} (cms_chunk_sizes={sizes})"
        if levels is None:
            periods = {level: size for level, size in enumerate(sizes) if size is not None}
            if not periods:
                raise ValueError(f"the model has no CMS level that learns: cms_chunk_sizes={sizes}; give a level a "
                                 "period to learn it online, e.g. levels={0: 16}")
            return periods
        if isinstance(levels, Mapping):
            items = list(levels.items())
        elif isinstance(levels, (list, tuple)):
            items = [(level, None) for level in levels]
        else:
            raise TypeError(f"levels={levels!r} is not allowed: None, a list of level indices, or a dict "
                            "{level: period}")
        if not items:
            raise ValueError("levels is empty: name at least one CMS level to learn")
        periods = {}
        for level, period in items:
            if isinstance(level, bool) or not isinstance(level, int) or not 0 <= level < len(sizes):
                raise ValueError(f"unknown level {level!r}: {allowed}")
            if level in periods:
                raise ValueError(f"level {level} is listed twice in levels={levels!r}")
            period = sizes[level] if period is None else period
            if period is None:
                raise ValueError(f"level {level} has chunk size None, so it has no period of its own: give one, "
                                 f"e.g. levels={{{level}: 512}}")
            if isinstance(period, bool) or not isinstance(period, int) or period < 1:
                raise ValueError(f"the period of level {level} must be a positive int, got {period!r}")
            periods[level] = period
        return periods

    @staticmethod
    def _resolve_lrs(lr, levels: List[int], default_lr: float) -> Dict[str, float]:
        if isinstance(lr, Mapping):
            lrs = {str(key): value for key, value in lr.items()}
            unknown = set(lrs) - {str(level) for level in levels} - {EXTRA}
            if unknown:
                raise ValueError(f"lr names {sorted(unknown)}, which are not learned here (levels {levels} and "
                                 f"'{EXTRA}')")
            lrs = {str(level): lrs.get(str(level), default_lr) for level in levels} | \
                ({EXTRA: lrs[EXTRA]} if EXTRA in lrs else {})
        elif isinstance(lr, (list, tuple)):
            if len(lr) != len(levels):
                raise ValueError(f"lr has {len(lr)} entries but {len(levels)} levels learn ({levels})")
            lrs = {str(level): value for level, value in zip(levels, lr)}
        else:
            lrs = {str(level): lr for level in levels} | {EXTRA: lr}
        for key, value in lrs.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0 or \
                    not math.isfinite(value):
                raise ValueError(f"lr of {key} must be a finite number >= 0, got {value!r}")
        return lrs

    def _resolve_extra(self, extra_trainable, named: Dict[str, Tensor]) -> List[str]:
        if extra_trainable is None:
            return []
        if callable(extra_trainable):
            chosen = [name for name, param in named.items() if extra_trainable(name, param)]
        elif isinstance(extra_trainable, (list, tuple)) and all(isinstance(p, str) for p in extra_trainable):
            chosen = []
            for pattern in extra_trainable:
                hits = [name for name in named if fnmatch.fnmatchcase(name, pattern)]
                if not hits:
                    raise ValueError(f"extra_trainable pattern {pattern!r} matches no parameter of the model "
                                     f"(e.g. {next(iter(named))!r})")
                chosen += [name for name in hits if name not in chosen]
        else:
            raise TypeError("extra_trainable must be None, a list of fnmatch patterns over parameter names, or a "
                            "predicate (name, parameter) -> bool")
        taken = [name for name in chosen if any(name in group.names for group in self.groups.values())]
        if taken:
            raise ValueError(f"extra_trainable selects {taken[:3]}, which a learned level already holds")
        if not chosen:
            raise ValueError("extra_trainable selects no parameter")
        return chosen

    def _group(self, key: str, period: int, lr: float, names: List[str], named: Dict[str, Tensor], optimizer):
        missing = [name for name in names if name not in named]
        if missing:
            raise ValueError(f"the model has no parameter {missing[0]!r}")
        spec = optimizer.get(key, optimizer.get(int(key), "adamw") if key.isdigit() else "adamw") \
            if isinstance(optimizer, Mapping) else optimizer
        factory = _optimizer_factory(spec, self.optimizer_kwargs, f"level {key}" if key != EXTRA else EXTRA)
        params = [named[name] for name in names]
        deltas = [torch.zeros_like(p, dtype=torch.promote_types(p.dtype, torch.float32), requires_grad=True)
                  for p in params]
        return _Group(key, period, float(lr), names, params, deltas, factory)

    # ------------------------------------------------------------------------------------ introspection

    @property
    def periods(self) -> Dict[str, int]:
        """{group key: period in tokens}; keys are the level indices as strings, and "extra"."""
        return {key: group.period for key, group in self.groups.items()}

    @property
    def steps(self) -> Dict[str, int]:
        """{group key: optimizer steps taken}."""
        return {key: group.steps for key, group in self.groups.items()}

    def optimizers(self) -> Dict[str, torch.optim.Optimizer]:
        """{group key: its optimizer}."""
        return {key: group.optimizer for key, group in self.groups.items()}

    def deltas(self) -> Dict[str, Tensor]:
        """{parameter name: δ}, what has been learned since the last consolidation (views, not copies)."""
        return {name: delta for group in self.groups.values() for name, delta in zip(group.names, group.deltas)}

    # ------------------------------------------------------------------------------------ the model with δ

    def _effective(self) -> Dict[str, Tensor]:
        """{name: θ_0 + δ} in the parameter's dtype; differentiable with respect to δ."""
        out = {}
        for group in self.groups.values():
            for name, param, delta in zip(group.names, group.params, group.deltas):
                out[name] = (param.detach() + delta).to(param.dtype)
        return out

    def _call(self, effective: Dict[str, Tensor], args: tuple, kwargs: dict):
        """The model's forward with `effective` in place of the learned parameters (every alias of each)."""
        overrides = {alias: value for name, value in effective.items() for alias in self._aliases[name]}
        return torch.func.functional_call(self.model, overrides, args, kwargs, tie_weights=False)

    def forward(self, *args: Any, **kwargs: Any):
        """The model's forward with what the learner has learned (θ_0 + δ); same arguments and outputs as
        `model.forward`. Differentiable with respect to δ."""
        return self._call(self._effective(), args, kwargs)

    __call__ = forward

    @contextlib.contextmanager
    def applied(self) -> Iterator[Any]:
        """Within the block the model's parameters hold θ_0 + δ (e.g. to `generate`); restored on exit."""
        saved = []
        with torch.no_grad():
            effective = self._effective()
            for group in self.groups.values():
                for name, param in zip(group.names, group.params):
                    saved.append((param, param.detach().clone()))
                    param.copy_(effective[name])
        try:
            yield self.model
        finally:
            with torch.no_grad():
                for param, value in saved:
                    param.copy_(value)

    @torch.no_grad()
    def consolidate(self) -> None:
        """Write what was learned into the model's slow weights: θ_0 <- θ_0 + δ (the very tensor the learner runs
        with, so the consolidated model equals the learner's model exactly), then δ <- 0. Optimizer moments and
        the windows in progress are kept: the gradient with respect to δ is the gradient with respect to θ_0."""
        effective = self._effective()
        for group in self.groups.values():
            for name, param, delta in zip(group.names, group.params, group.deltas):
                param.copy_(effective[name])
                delta.zero_()

    def reset(self) -> None:
        """Forget what was learned since the last `consolidate()` (δ <- 0), the optimizers' states, the windows
        in progress and the clock. What was consolidated stays in the model."""
        for group in self.groups.values():
            with torch.no_grad():
                for delta in group.deltas:
                    delta.zero_()
                    delta.grad = None
            group.tokens = group.targets = group.steps = 0
            group.loss_sum = 0.0
            group.new_optimizer()
        self.tokens_read = 0

    # ------------------------------------------------------------------------------------ state

    def _settings(self) -> Dict[str, Any]:
        return {key: {"period": group.period, "names": list(group.names)} for key, group in self.groups.items()}

    def state_dict(self) -> Dict[str, Any]:
        """Everything needed to continue exactly: δ, pending window gradients and counts, optimizer states, clock."""
        groups = {}
        for key, group in self.groups.items():
            groups[key] = {
                "deltas": [delta.detach().clone() for delta in group.deltas],
                "grads": [None if delta.grad is None else delta.grad.clone() for delta in group.deltas],
                "tokens": group.tokens, "targets": group.targets, "loss_sum": group.loss_sum, "steps": group.steps,
                "optimizer": group.optimizer.state_dict(),
            }
        return {"format": STATE_FORMAT, "settings": self._settings(), "tokens_read": self.tokens_read,
                "groups": groups}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a `state_dict()` of a learner with the same levels, periods and parameters."""
        if not isinstance(state, Mapping) or state.get("format") != STATE_FORMAT:
            raise ValueError(f"not an OnlineLearner state (format {STATE_FORMAT}): got keys "
                             f"{sorted(state) if isinstance(state, Mapping) else type(state).__name__}")
        if state["settings"] != self._settings():
            raise ValueError("the state was saved by a learner with other levels, periods or parameters: "
                             f"saved {_describe(state['settings'])}, this learner {_describe(self._settings())}")
        for key, group in self.groups.items():
            saved = state["groups"][key]
            with torch.no_grad():
                for delta, value, grad in zip(group.deltas, saved["deltas"], saved["grads"]):
                    if value.shape != delta.shape:
                        raise ValueError(f"{group.label}: saved delta of shape {tuple(value.shape)}, expected "
                                         f"{tuple(delta.shape)}")
                    delta.copy_(value)
                    delta.grad = None if grad is None else grad.to(delta.device, delta.dtype).clone()
            group.tokens, group.targets = int(saved["tokens"]), int(saved["targets"])
            group.loss_sum, group.steps = float(saved["loss_sum"]), int(saved["steps"])
            group.new_optimizer()
            group.optimizer.load_state_dict(saved["optimizer"])
        self.tokens_read = int(state["tokens_read"])

    # ------------------------------------------------------------------------------------ the stream

    def _sequences(self, stream: Iterable) -> Iterator[_Sequence]:
        """Turn each stream item into one or more _Sequence (a 2-D item holds one sequence per row)."""
        if isinstance(stream, (str, Tensor, Mapping)):
            stream = [stream]  # one item, not an iterable of characters / rows
        device = next(self.model.parameters()).device
        for index, item in enumerate(stream):
            for ids, mask, labels in self._rows(item, index):
                if mask is not None:
                    keep = mask.bool()
                    ids, labels = ids[keep], (None if labels is None else labels[keep])
                if ids.numel() == 0:
                    continue
                low, high = int(ids.min()), int(ids.max())
                if low < 0 or high >= self.config.vocab_size:
                    raise ValueError(f"stream item {index}: token ids must lie in [0, vocab_size="
                                     f"{self.config.vocab_size}), got values in [{low}, {high}]")
                targets = torch.full_like(ids, IGNORE_INDEX)
                source = ids if labels is None else labels
                targets[:-1] = source[1:]  # position t predicts the token (label) at t + 1
                yield _Sequence(ids.to(device), targets.to(device))

    def _rows(self, item, index: int):
        """(ids (T,), attention_mask (T,) or None, labels (T,) or None) for each sequence of one item."""
        if isinstance(item, str):
            if self.tokenizer is None:
                raise ValueError(f"stream item {index} is a text, but the learner has no tokenizer: pass "
                                 "OnlineLearner(..., tokenizer=...) or give token-id tensors")
            ids = list(self.tokenizer(item, add_special_tokens=False)["input_ids"])
            if self.append_eos and self.tokenizer.eos_token_id is not None:
                ids.append(self.tokenizer.eos_token_id)
            yield torch.tensor(ids, dtype=torch.long), None, None
            return
        if isinstance(item, Mapping):
            if "input_ids" not in item:
                raise ValueError(f"stream item {index} is a dict without 'input_ids' (keys: {sorted(item)})")
            unknown = set(item) - {"input_ids", "attention_mask", "labels"}
            if unknown:
                raise ValueError(f"stream item {index} has keys {sorted(unknown)}; allowed: input_ids, "
                                 "attention_mask, labels")
            ids = _as_ids(item["input_ids"], index, "input_ids")
            mask = None if item.get("attention_mask") is None else _as_ids(item["attention_mask"], index,
                                                                           "attention_mask")
            labels = None if item.get("labels") is None else _as_ids(item["labels"], index, "labels")
            for name, other in (("attention_mask", mask), ("labels", labels)):
                if other is not None and other.shape != ids.shape:
                    raise ValueError(f"stream item {index}: {name} has shape {tuple(other.shape)}, input_ids "
                                     f"{tuple(ids.shape)}")
            if mask is not None and not bool(((mask == 0) | (mask == 1)).all()):
                raise ValueError(f"stream item {index}: attention_mask must hold only 0 and 1")
            rows = [ids] if ids.dim() == 1 else list(ids)
            masks = [None] * len(rows) if mask is None else ([mask] if mask.dim() == 1 else list(mask))
            labels = [None] * len(rows) if labels is None else ([labels] if labels.dim() == 1 else list(labels))
            yield from zip(rows, masks, labels)
            return
        ids = _as_ids(item, index, "item")
        for row in ([ids] if ids.dim() == 1 else ids):
            yield row, None, None

    def learn(self, stream: Iterable, flush: bool = False) -> Dict[str, Any]:
        """Read `stream` and learn from it; returns a summary (tokens, sequences, steps per group in this call,
        mean loss of the read predictions, tokens/s, pending tokens per group).

        Items: a text (needs a tokenizer), a 1-D token-id tensor or list, a 2-D tensor (its rows are sequences,
        read one after another), or a dict with "input_ids" and optional "attention_mask" / "labels" (1-D or
        2-D). Each sequence starts with a fresh recurrent state; what the levels learned persists.
        """
        from tqdm.auto import tqdm

        from hope.cache_hope import HopeCache

        started = time.perf_counter()
        steps_before = self.steps
        tokens = sequences = targets = 0
        loss_sum = 0.0
        bar = tqdm(desc="hope-learn", unit="tok", unit_scale=True, disable=not self.progress, dynamic_ncols=True)
        with self._frozen_model():
            for sequence in self._sequences(stream):
                cache = HopeCache(self.config.num_hidden_layers)
                offsets: Dict[tuple, tuple] = {}
                T = sequence.ids.numel()
                position = 0
                while position < T:
                    length = min(self._until_next_step(), T - position)
                    piece_targets = sequence.targets[position : position + length]
                    piece_loss, count = self._read_piece(sequence.ids[position : position + length], piece_targets,
                                                         cache, offsets)
                    position += length
                    self._advance(length, count, piece_loss)
                    tokens += length
                    targets += count
                    loss_sum += piece_loss
                    bar.update(length)
                    if targets and bar.n % 256 < length:
                        bar.set_postfix(loss=f"{loss_sum / targets:.3f}", refresh=False)
                sequences += 1
        bar.close()
        if flush:
            self.flush()
        elapsed = time.perf_counter() - started
        return {
            "tokens": tokens, "sequences": sequences, "targets": targets,
            "mean_loss": loss_sum / targets if targets else None,
            "steps": {key: self.steps[key] - steps_before[key] for key in self.groups},
            "pending_tokens": {key: group.tokens for key, group in self.groups.items()},
            "seconds": elapsed, "tokens_per_second": tokens / elapsed if elapsed > 0 else None,
        }

    def flush(self) -> List[str]:
        """Step every group on its partial window (the mean loss of what it read since its last step), if that
        window holds a target; returns the keys of the groups that stepped. The clock is unchanged."""
        stepped = []
        for key, group in self.groups.items():
            if group.tokens:
                if self._step(group):
                    stepped.append(key)
        return stepped

    # ------------------------------------------------------------------------------------ internals

    @contextlib.contextmanager
    def _frozen_model(self):
        """Every model parameter stops requiring grad while learning (autograd then tracks δ only)."""
        flags = [(param, param.requires_grad) for param in self.model.parameters()]
        for param, _ in flags:
            param.requires_grad_(False)
        try:
            yield
        finally:
            for param, flag in flags:
                param.requires_grad_(flag)

    def _until_next_step(self) -> int:
        """Tokens to read before the next step of any group: the length of the next piece."""
        return min(group.period - self.tokens_read % group.period for group in self.groups.values())

    def _read_piece(self, ids: Tensor, targets: Tensor, cache, offsets: Dict[tuple, tuple]) -> tuple[float, int]:
        """Run one piece (L,) through the model with θ_0 + δ, continuing `cache`; backpropagate its summed loss
        into every δ.grad (the windows' sums). Returns (summed loss, labelled predictions)."""
        count = int((targets != IGNORE_INDEX).sum())
        # A piece without a target teaches nothing: it is only read (no graph, no backward).
        with torch.set_grad_enabled(count > 0):
            effective = self._effective()
            self._rebase(cache, effective, offsets)
            out = self._call(effective, (), {"input_ids": ids.unsqueeze(0), "cache": cache, "use_cache": True})
            logits = out.logits[0]
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # fp32 at least, fp64 stays
            loss = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum") if count \
                else logits.new_zeros(())
        if count:
            loss.backward()
        self._carry(cache, effective, offsets)
        return float(loss.detach()), count

    def _rebase(self, cache, effective: Dict[str, Tensor], offsets: Dict[tuple, tuple]) -> None:
        """Before a piece: each carried CMS fast weight becomes (θ_0 + δ) + its detached offset, so that δ's
        latest step moves it and the gradient reaches δ through it."""
        for (layer, level), offset in offsets.items():
            state = cache.layers[layer].cms[level]
            prefix = f"model.layers.{layer}.cms.levels.{level}."
            cache.layers[layer].cms[level] = state._replace(**{
                w: (effective[prefix + w].to(o.dtype) + o) for w, o in zip(LEVEL_WEIGHTS, offset)})

    @torch.no_grad()
    def _carry(self, cache, effective: Dict[str, Tensor], offsets: Dict[tuple, tuple]) -> None:
        """After a piece: keep each learned level's fast weights as detached offsets from θ_0 + δ, detach the
        rest of the cache (truncated backpropagation), and slide attention keys to `attention_window`."""
        for layer, layer_cache in enumerate(cache.layers):
            for level, state in enumerate(layer_cache.cms):
                prefix = f"model.layers.{layer}.cms.levels.{level}."
                if state is not None and prefix + LEVEL_WEIGHTS[0] in effective:
                    if not all(hasattr(state, w) for w in LEVEL_WEIGHTS):
                        raise RuntimeError(f"the CMS state ({type(state).__name__}) has no fields {LEVEL_WEIGHTS}: "
                                           "OnlineLearner cannot carry its fast weights across pieces")
                    offsets[(layer, level)] = tuple(
                        (getattr(state, w) - effective[prefix + w].to(getattr(state, w).dtype)).detach()
                        for w in LEVEL_WEIGHTS)
        cache.detach()
        for layer_cache in cache.layers:
            if layer_cache.key is not None and layer_cache.key.shape[2] > self.attention_window:
                window = self.attention_window
                layer_cache.key = layer_cache.key[:, :, -window:]
                layer_cache.value = layer_cache.value[:, :, -window:]
                layer_cache.key_valid = layer_cache.key_valid[:, -window:]

    def _advance(self, length: int, count: int, loss: float) -> None:
        """Move the clock by a piece and step every group whose period it completes."""
        self.tokens_read += length
        for group in self.groups.values():
            group.tokens += length
            group.targets += count
            group.loss_sum += loss
            if self.tokens_read % group.period == 0:
                self._step(group)

    def _step(self, group: _Group) -> bool:
        """One optimizer step of `group` on the mean loss of its window (Eq. 71); returns whether it stepped (a
        window without a target teaches nothing: no step)."""
        stepped = group.targets > 0
        if stepped:
            for delta in group.deltas:
                if delta.grad is None:
                    delta.grad = torch.zeros_like(delta)
                else:
                    delta.grad.div_(group.targets)
            if self.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(group.deltas, self.max_grad_norm)
            group.optimizer.step()
            group.steps += 1
        for delta in group.deltas:
            delta.grad = None
        group.tokens = group.targets = 0
        group.loss_sum = 0.0
        return stepped


def _as_ids(value, index: int, name: str) -> Tensor:
    """A stream item's field as an integer tensor of 1 or 2 dims, or a clear error."""
    if isinstance(value, (list, tuple)):
        try:
            value = torch.tensor(value, dtype=torch.long)
        except (TypeError, ValueError) as error:
            raise ValueError(f"stream item {index}: {name} is a list that is not rectangular integers ({error})") \
                from None
    if not isinstance(value, Tensor):
        raise TypeError(f"stream item {index}: {name} is a {type(value).__name__}; allowed: a text, a token-id "
                        "tensor or list, or a dict with input_ids / attention_mask / labels")
    if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool and name != "attention_mask":
        raise ValueError(f"stream item {index}: {name} must hold integers, got dtype {value.dtype}")
    if value.dim() not in (1, 2):
        raise ValueError(f"stream item {index}: {name} must be 1-D (T,) or 2-D (rows, T), got shape "
                         f"{tuple(value.shape)}")
    return value.long()


def _describe(settings: Mapping[str, Any]) -> str:
    return ", ".join(f"{key}: every {value['period']} tokens, {len(value['names'])} tensors"
                     for key, value in settings.items())


# ============================================================================================ hope-learn


class UsageError(ValueError):
    """A bad command line: one line on stderr, exit status 2."""


def _parse_mapping(text: Optional[str], name: str, value_type) -> Union[None, Any, Dict[int, Any]]:
    """'1e-3' -> 1e-3; '0:1e-3,1:1e-4' -> {0: 1e-3, 1: 1e-4}; '0,1' -> [0, 1] (for --levels)."""
    if text is None:
        return None
    text = text.strip()
    try:
        if ":" not in text:
            if name == "--levels":
                return [int(part) for part in text.split(",") if part.strip()]
            return value_type(text)
        out = {}
        for part in filter(str.strip, text.split(",")):
            key, _, value = part.partition(":")
            key = key.strip()
            out[key if key == EXTRA else int(key)] = None if value.strip().lower() == "none" else value_type(value)
        return out
    except ValueError:
        raise UsageError(f"{name} {text!r} is not of the form VALUE or LEVEL:VALUE,LEVEL:VALUE") from None


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="hope-learn", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Learn online from a data stream at each CMS level's frequency (hope.OnlineLearner), then "
                    "save the consolidated checkpoint.",
        epilog="examples:\n"
               "  hope-learn --model runs/small --data notes.txt --output_dir runs/small-learned\n"
               "  cat log.txt | hope-learn --model runs/small --data - --levels 0:16,1:128 --lr 0:1e-3,1:3e-4\n"
               "each text (a .txt paragraph by default, --text_split; a json/jsonl/csv/parquet row's --text_column; "
               "a line of stdin) is one sequence (fresh recurrent state), followed by EOS.")
    parser.add_argument("--model", required=True, help="checkpoint directory of a Hope model")
    parser.add_argument("--data", required=True, help="a txt/json/jsonl/parquet/csv file, glob or directory, a saved "
                                                      "dataset, or '-' for stdin (one text per line)")
    parser.add_argument("--output_dir", "--output-dir", default=None, help="where the consolidated checkpoint goes "
                                                                           "(default: <model>-learned)")
    parser.add_argument("--text_column", default="text")
    parser.add_argument("--text_split", default="paragraph", choices=("paragraph", "document", "line"),
                        help="how a .txt file is cut into texts (as hope-train): at blank lines, a file a text, or a "
                             "line a text")
    parser.add_argument("--tokenizer", default=None, help="default: the checkpoint's own, else ByT5")
    parser.add_argument("--levels", default=None, help="levels to learn: '0,1' or with periods '0:16,2:512' "
                                                       "(default: every level with a chunk size)")
    parser.add_argument("--lr", default="1e-3", help="one learning rate or per level '0:1e-3,1:3e-4'")
    parser.add_argument("--optimizer", default="adamw", help="sgd, adamw or m3, or per level '0:sgd,1:adamw'")
    parser.add_argument("--max_grad_norm", type=float, default=1.0, help="<= 0 disables clipping")
    parser.add_argument("--attention_window", type=int, default=None, help="keys kept by attention mixers")
    parser.add_argument("--max_texts", type=int, default=None, help="learn from the first N texts only")
    parser.add_argument("--resume_state", default=None, help="a learner_state.pt to continue from")
    parser.add_argument("--no_flush", action="store_true", help="do not step on the partial windows at the end")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--num_threads", type=int, default=None,
                        help="CPU threads (default: OMP_NUM_THREADS, else the idle cores; hope.runtime)")
    parser.add_argument("--no_progress", action="store_true")
    args = parser.parse_args(argv)
    args.lr = _parse_mapping(args.lr, "--lr", float)
    args.levels = _parse_mapping(args.levels, "--levels", int)
    args.optimizer = _parse_mapping(args.optimizer, "--optimizer", str)
    if args.max_texts is not None and args.max_texts < 1:
        raise UsageError(f"--max_texts must be positive, got {args.max_texts}")
    if args.num_threads is not None and args.num_threads < 1:
        raise UsageError(f"--num_threads must be positive, got {args.num_threads}")
    args.output_dir = Path(args.output_dir or f"{args.model.rstrip('/')}-learned")
    return args


def _texts(args: argparse.Namespace) -> Iterable[str]:
    if args.data == "-":
        texts: Iterable[str] = (line.rstrip("\n") for line in sys.stdin)
    else:
        from hope.data import load_text_dataset

        texts = (row[args.text_column] for row in load_text_dataset(args.data, text_column=args.text_column,
                                                                     text_split=args.text_split))
    texts = (text for text in texts if text and text.strip())
    if args.max_texts is not None:
        texts = (text for index, text in zip(range(args.max_texts), texts))
    return texts


def run(args: argparse.Namespace) -> Dict[str, Any]:
    """Load, learn, consolidate, save (model, tokenizer, learner_state.pt, learn_results.json)."""
    import hope  # noqa: F401  (Auto classes)
    from hope.runtime import configure_threads, describe_threads
    from hope.train import is_checkpoint, load_tokenizer, pick_device

    from transformers import AutoModelForCausalLM

    if not is_checkpoint(args.model):
        raise UsageError(f"--model {args.model!r} is not a checkpoint directory (no config.json)")
    device = pick_device(args.device)
    try:
        threads = configure_threads(args.num_threads)
    except ValueError as error:  # a bad OMP_NUM_THREADS
        raise UsageError(str(error)) from None
    print(f"hope-learn: {describe_threads(threads, args.num_threads)}", file=sys.stderr, flush=True)
    tokenizer = load_tokenizer(args.tokenizer, args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model).to(device)
    if len(tokenizer) > model.config.vocab_size:
        raise UsageError(f"the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is "
                         f"{model.config.vocab_size}")
    learner = OnlineLearner(
        model, levels=args.levels, lr=args.lr if args.lr is not None else 1e-3, optimizer=args.optimizer,
        tokenizer=tokenizer, max_grad_norm=args.max_grad_norm if args.max_grad_norm > 0 else None,
        attention_window=args.attention_window, progress=not args.no_progress)
    if args.resume_state:
        if not Path(args.resume_state).is_file():
            raise UsageError(f"--resume_state {args.resume_state!r}: no such file")
        learner.load_state_dict(torch.load(args.resume_state, map_location=device, weights_only=False))
    summary = learner.learn(_texts(args), flush=not args.no_flush)
    if summary["tokens"] == 0:
        raise UsageError(f"{args.data!r} holds no text to learn from")
    learner.consolidate()
    args.output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.output_dir)
    tokenizer.save_pretrained(args.output_dir)
    torch.save(learner.state_dict(), args.output_dir / "learner_state.pt")
    summary.update(model=args.model, data=args.data, periods=learner.periods, total_steps=learner.steps,
                   threads=threads)
    (args.output_dir / "learn_results.json").write_text(json.dumps(summary, indent=2))
    print(f"hope-learn: {summary['tokens']:,} tokens from {summary['sequences']:,} texts at "
          f"{summary['tokens_per_second'] or 0:,.0f} tokens/s; steps {summary['steps']}; mean loss "
          f"{summary['mean_loss'] if summary['mean_loss'] is None else round(summary['mean_loss'], 4)}; "
          f"consolidated checkpoint: {args.output_dir}", flush=True)
    return summary


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Console entry point of `hope-learn`: 0 on success, 2 with a one-line error."""
    from hope.data import DataError

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        run(parse_args(sys.argv[1:] if argv is None else argv))
    except (UsageError, DataError, FileNotFoundError, ValueError, TypeError) as error:
        print(f"hope-learn: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
