"""HellaSwag scoring: lm-eval's tokenization of context and ending, left truncation at the model's context, and
batched, padded scoring that equals a one-row-at-a-time reference with full logits."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from harness.config.schema import ModelConfig
from harness.data.hellaswag import Example, load_hellaswag
from harness.data.tokenizer import gpt2_encoding
from harness.trial.hellaswag import encode_pair, example_rows, result_of, score
from harness.trial.model import GPTModel
from tests.fixtures.hellaswag import write_fixture

CONTEXT = 64  # the smoke scale's


@pytest.fixture(scope="module")
def model() -> GPTModel:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=50257, context_length=CONTEXT, n_layer=1, n_head=2, d_model=32, dropout=0.0)
    return GPTModel(cfg).eval()


@pytest.fixture(scope="module")
def examples(tmp_path_factory) -> list[Example]:
    path = tmp_path_factory.mktemp("hellaswag") / "fixture.jsonl"
    write_fixture(path, 8)
    return load_hellaswag(path)


@pytest.fixture(scope="module")
def expected(model, examples) -> list[list[float]]:
    return [reference_sums(model, example) for example in examples]


def reference_sums(model: nn.Module, example: Example) -> list[float]:
    """Each ending scored alone: full logits of the last CONTEXT tokens before it, no padding, no batching."""
    sums = []
    encoding = gpt2_encoding()
    for ending in example.endings:
        context_tokens = encoding.encode(example.context)
        ending_tokens = encoding.encode(example.context + " " + ending)[len(context_tokens) :]
        tokens = (context_tokens + ending_tokens)[-(CONTEXT + 1) :]
        with torch.no_grad():
            log_probs = F.log_softmax(model(torch.tensor([tokens[:-1]]))[0].float(), dim=-1)
        picked = log_probs[-len(ending_tokens) :].gather(1, torch.tensor(ending_tokens)[:, None])
        sums.append(picked.sum().item())
    return sums


def test_encode_pair_splits_the_whole_texts_tokens_and_moves_trailing_spaces():
    encoding = gpt2_encoding()
    context, ending = encode_pair("A man opens the door.", " He walks in.")
    assert context + ending == encoding.encode("A man opens the door. He walks in.")
    assert context == encoding.encode("A man opens the door.")
    spaced_context, spaced_ending = encode_pair("A man opens the door.  ", "He walks in.")
    assert (
        spaced_context == context
        and spaced_ending == encoding.encode("A man opens the door.  He walks in.")[len(context) :]
    )


def test_long_contexts_are_truncated_from_the_left_to_the_models_context(examples):
    rows = [row for example in examples for row in example_rows(example, CONTEXT)]
    assert max(len(tokens) for tokens, _ in rows) == CONTEXT + 1  # some rows were longer and were cut
    example = examples[0]
    context_tokens, ending_tokens = encode_pair(example.context, " " + example.endings[0])
    assert len(context_tokens) + len(ending_tokens) > CONTEXT + 1
    assert rows[0] == ((context_tokens + ending_tokens)[-(CONTEXT + 1) :], len(ending_tokens))


def test_an_ending_longer_than_the_context_is_refused():
    example = Example(ind=3, context="Cooking: She", endings=(" ".join(["word"] * 70), "a", "b", "c"), label=0)
    with pytest.raises(ValueError, match="ind=3: an ending of 70 tokens; scoring needs 1 to context_length=64"):
        example_rows(example, CONTEXT)


@pytest.mark.parametrize("batch_size", [1, 7, 64])
def test_batched_scoring_equals_one_row_at_a_time(model, examples, expected, batch_size):
    result = score(model, examples, batch_size=batch_size, progress=False)
    assert result.n == len(examples)
    assert torch.allclose(torch.tensor(result.loglikelihoods), torch.tensor(expected), atol=1e-4, rtol=1e-5)
    assert result.choices == [max(range(4), key=sums.__getitem__) for sums in expected]
    assert isinstance(model.out_head, nn.Linear)  # the head is the model's own again


def test_scoring_is_bit_identical_when_repeated_and_a_model_without_out_head_scores_the_same(model, examples):
    class Wrapped(nn.Module):
        def __init__(self, inner: GPTModel):
            super().__init__()
            self.inner, self.cfg = inner, inner.cfg

        def forward(self, idx):
            return self.inner(idx)

    model.train()
    first = score(model, examples[:4], batch_size=16, progress=False)
    assert model.training  # put back in the mode it was in
    model.eval()
    assert score(model, examples[:4], batch_size=16, progress=False).loglikelihoods == first.loglikelihoods
    wrapped = score(Wrapped(model), examples[:4], batch_size=16, progress=False)
    assert torch.allclose(torch.tensor(wrapped.loglikelihoods), torch.tensor(first.loglikelihoods), atol=1e-5)


def test_autocast_dtype_is_applied(model, examples):
    full = score(model, examples[:3], batch_size=12, progress=False)
    low = score(model, examples[:3], batch_size=12, autocast_dtype=torch.bfloat16, progress=False)
    full_sums, low_sums = torch.tensor(full.loglikelihoods), torch.tensor(low.loglikelihoods)
    assert not torch.equal(full_sums, low_sums)
    assert torch.allclose(full_sums, low_sums, rtol=0.05)


def test_acc_takes_the_argmax_of_sums_and_acc_norm_of_sums_per_character():
    examples = [
        Example(ind=0, context="c", endings=("aaaa", "b", "cc", "dd"), label=0),
        Example(ind=1, context="c", endings=("a", "bbbbbbbbbb", "c", "d"), label=1),
        Example(ind=2, context="c", endings=("a", "b", "c", "d"), label=3),
    ]
    sums = [-4.0, -3.0, -9.0, -9.0] + [-2.0, -5.0, -3.0, -3.0] + [-1.0, -1.0, -2.0, -1.0]
    result = result_of(examples, sums)
    assert result.choices == [1, 0, 0]  # ties go to the first, as numpy's argmax
    assert result.choices_norm == [0, 1, 0]  # -4/4 beats -3/1; -5/10 beats -2/1
    assert (result.acc, result.acc_norm) == (0.0, 2 / 3)
    assert result.correct == [False, False, False] and result.correct_norm == [True, True, False]


def test_bad_arguments_are_refused(model, examples):
    with pytest.raises(ValueError, match="batch_size=0"):
        score(model, examples, batch_size=0)
    with pytest.raises(ValueError, match="examples is empty"):
        score(model, [])
