"""HellaSwag accuracy of a model in-process, scored as lm-eval's `hellaswag` task scores it (completion style).

Each ending, after a space, is scored by the summed log-likelihood of its tokens after the example's context,
tokenized as lm-eval's `_encode_pair` does (context + ending encoded whole, the context's tokens split off).
A sequence longer than the model's context keeps its last tokens, as lm-eval truncates from the left. `acc`
takes the argmax of the sums, `acc_norm` the argmax of sum / len(ending) in characters (lm-eval's acc_norm).
Rows are batched longest first and padded on the right to the batch's longest row. See docs/hellaswag.md.
"""

import contextlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from harness.data.hellaswag import ENDINGS, Example
from harness.data.tokenizer import gpt2_encoding
from harness.progress import short_bar

PAD_TOKEN = 0  # right padding: a causal model's earlier positions never see it, and its positions are not read


@dataclass
class HellaswagResult:
    """Accuracies and, per example, the chosen endings and each ending's summed log-likelihood."""

    n: int
    acc: float
    acc_norm: float
    labels: list[int]
    choices: list[int]  # argmax of the summed log-likelihoods (acc)
    choices_norm: list[int]  # argmax of the sums per character of the ending (acc_norm)
    loglikelihoods: list[list[float]]

    @property
    def correct(self) -> list[bool]:
        return [choice == label for choice, label in zip(self.choices, self.labels)]

    @property
    def correct_norm(self) -> list[bool]:
        return [choice == label for choice, label in zip(self.choices_norm, self.labels)]


def encode_pair(context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's `_encode_pair` for a causal model: trailing spaces of the context move to the continuation,
    the whole text is encoded, and the context's own encoding's length splits it."""
    encoding = gpt2_encoding()
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = encoding.encode(context + continuation, allowed_special="all")
    context_tokens = encoding.encode(context, allowed_special="all")
    return context_tokens, whole[len(context_tokens) :]


def example_rows(example: Example, context_length: int) -> list[tuple[list[int], int]]:
    """For each ending: its tokens (at most `context_length` + 1: the model's input and one last target) and how
    many of the last ones are the ending's."""
    rows = []
    for ending in example.endings:
        context_tokens, ending_tokens = encode_pair(example.context, " " + ending)
        if not 0 < len(ending_tokens) <= context_length:
            raise ValueError(
                f"HellaSwag example ind={example.ind}: an ending of {len(ending_tokens)} tokens; "
                f"scoring needs 1 to context_length={context_length}"
            )
        tokens = (context_tokens + ending_tokens)[-(context_length + 1) :]
        rows.append((tokens, len(ending_tokens)))
    return rows


class PickedHead(nn.Module):
    """The output head applied only at the given (row, position) pairs: [pairs, vocab] logits."""

    def __init__(self, head: nn.Module, rows: torch.Tensor, positions: torch.Tensor):
        super().__init__()
        self.head, self.rows, self.positions = head, rows, positions

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(hidden[self.rows, self.positions])


@contextlib.contextmanager
def picked_positions(model: nn.Module, rows: torch.Tensor, positions: torch.Tensor):
    """While open, a GPTModel-style model (its own `out_head` submodule applied last) computes logits only at
    the given (row, position) pairs, which saves most of the head's work and memory; yields whether it does
    (False: any other module, e.g. a compiled or distributed wrapper, whose full logits the caller picks from)."""
    head = model._modules.get("out_head")  # registered on this module itself, not reached through a wrapper
    if head is None:
        yield False
        return
    model.out_head = PickedHead(head, rows, positions)
    try:
        yield True
    finally:
        model.out_head = head


def score_batch(model: nn.Module, rows: list[tuple[list[int], int]], device: torch.device) -> list[float]:
    """Summed log-likelihood (fp32) of each row's last `ending` tokens, the rows padded to the longest."""
    width = max(len(tokens) - 1 for tokens, _ in rows)
    longest_ending = max(ending for _, ending in rows)
    inputs = torch.full((len(rows), width), PAD_TOKEN, dtype=torch.long)
    positions = torch.zeros((len(rows), longest_ending), dtype=torch.long)
    targets = torch.zeros((len(rows), longest_ending), dtype=torch.long)
    scored = torch.zeros((len(rows), longest_ending), dtype=torch.bool)
    for row, (tokens, ending) in enumerate(rows):
        length = len(tokens) - 1
        inputs[row, :length] = torch.tensor(tokens[:-1])
        positions[row, :ending] = torch.arange(length - ending, length)
        targets[row, :ending] = torch.tensor(tokens[-ending:])
        scored[row, :ending] = True
    row_of = torch.arange(len(rows))[:, None].expand_as(scored)
    picked_rows, picked_positions_ = row_of[scored].to(device), positions[scored].to(device)
    with picked_positions(model, picked_rows, picked_positions_) as picked_by_head:
        logits = model(inputs.to(device))
    if not picked_by_head:
        logits = logits[picked_rows, picked_positions_]
    log_probs = F.log_softmax(logits.float(), dim=-1).gather(1, targets[scored].to(device)[:, None]).squeeze(1)
    per_token = torch.zeros(scored.shape, dtype=torch.float32, device=device)
    per_token[scored.to(device)] = log_probs  # row-major, the order the pairs were picked in
    return per_token.sum(dim=1).tolist()


def score(
    model: nn.Module,
    examples: list[Example],
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    autocast_dtype: torch.dtype | None = None,
    progress: bool = True,
    context_length: int | None = None,
) -> HellaswagResult:
    """HellaSwag acc and acc_norm of `model` (token ids -> logits; scored in eval mode, then put back in the
    mode it was in) on `examples`.

    `batch_size` counts rows (one per ending); `context_length` defaults to the model's `cfg.context_length`.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}; it must be at least 1")
    if not examples:
        raise ValueError("examples is empty; HellaSwag scoring needs at least one example")
    device = torch.device(device)
    context_length = context_length if context_length is not None else model.cfg.context_length
    rows = [row for example in examples for row in example_rows(example, context_length)]
    order = sorted(range(len(rows)), key=lambda i: (-len(rows[i][0]), rows[i][0]))  # lm-eval's order
    sums = [0.0] * len(rows)
    autocast = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None else None
    was_training = model.training
    model.eval()
    try:
        with (
            torch.inference_mode(),
            autocast or contextlib.nullcontext(),
            short_bar(total=len(rows), desc="hellaswag", unit="ending", enabled=progress) as bar,
        ):
            for start in range(0, len(order), batch_size):
                batch = order[start : start + batch_size]
                for index, value in zip(batch, score_batch(model, [rows[index] for index in batch], device)):
                    sums[index] = value
                bar.update(len(batch))
    finally:
        model.train(was_training)
    return result_of(examples, sums)


def result_of(examples: list[Example], sums: list[float]) -> HellaswagResult:
    """The choices and accuracies of the summed log-likelihoods, with lm-eval's arithmetic (numpy argmax: the
    first of equal scores; sums divided by float lengths)."""
    loglikelihoods = [sums[ENDINGS * i : ENDINGS * (i + 1)] for i in range(len(examples))]
    choices, choices_norm = [], []
    for example, scores in zip(examples, loglikelihoods):
        lengths = np.array([float(len(ending)) for ending in example.endings])
        choices.append(int(np.argmax(scores)))
        choices_norm.append(int(np.argmax(np.array(scores) / lengths)))
    labels = [example.label for example in examples]
    n = len(examples)
    return HellaswagResult(
        n=n,
        acc=sum(c == label for c, label in zip(choices, labels)) / n,
        acc_norm=sum(c == label for c, label in zip(choices_norm, labels)) / n,
        labels=labels,
        choices=choices,
        choices_norm=choices_norm,
        loglikelihoods=loglikelihoods,
    )
