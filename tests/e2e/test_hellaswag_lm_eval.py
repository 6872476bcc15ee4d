"""The harness's HellaSwag scoring agrees with EleutherAI's lm-evaluation-harness example by example.

A tiny GPT-2 (the real vocabulary, random weights) is exported with the harness's own export code; lm-eval itself
(`simple_evaluate`, model "hf") scores it offline on a fixture through a task that includes the installed
`hellaswag` task and changes only where the documents come from. Its per-example choices, accuracies and
processed texts must equal the harness's. lm-eval runs in its own process: the offline switches of
`datasets` and `huggingface_hub` are read when they are imported.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from harness.config.schema import ModelConfig
from harness.data.hellaswag import load_hellaswag
from harness.data.tokenizer import gpt2_encoding
from harness.trial.hellaswag import example_rows, score
from harness.trial.hf import load_gpt2, save_gpt2
from harness.trial.model import GPTModel
from tests.fixtures.hellaswag import write_fixture

EXAMPLES = 24
CONTEXT = 64  # the smoke scale's

RUN_LM_EVAL = """
import json, sys
import lm_eval
from lm_eval.tasks import TaskManager

model_dir, task_dir, out = sys.argv[1:4]
results = lm_eval.simple_evaluate(
    model="hf",
    model_args=f"pretrained={model_dir},dtype=float32",
    tasks=["hellaswag_fixture"],
    task_manager=TaskManager(include_path=task_dir, include_defaults=False),
    num_fewshot=0,
    batch_size=16,
    device="cpu",
    log_samples=True,
)
samples = sorted(results["samples"]["hellaswag_fixture"], key=lambda sample: sample["doc_id"])
json.dump({
    "acc": results["results"]["hellaswag_fixture"]["acc,none"],
    "acc_norm": results["results"]["hellaswag_fixture"]["acc_norm,none"],
    "samples": [
        {
            "query": sample["doc"]["query"],
            "choices": sample["doc"]["choices"],
            "gold": sample["doc"]["gold"],
            "loglikelihoods": [response[0] for response in sample["filtered_resps"]],
            "acc": sample["acc"],
            "acc_norm": sample["acc_norm"],
        }
        for sample in samples
    ],
}, open(out, "w"))
"""


def installed_hellaswag_task() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("lm_eval")
    assert spec is not None, "lm_eval is not installed: pip install -e .[test]"
    return Path(spec.origin).parent / "tasks" / "hellaswag" / "hellaswag.yaml"


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=50257, context_length=CONTEXT, n_layer=2, n_head=2, d_model=64, dropout=0.0)
    return save_gpt2(GPTModel(cfg), tmp_path_factory.mktemp("export") / "gpt2")


def test_the_exported_tokenizer_is_the_harness_tokenizer(exported, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(exported, local_files_only=True)
    write_fixture(tmp_path / "fixture.jsonl", EXAMPLES)
    texts = [e.context + " " + ending for e in load_hellaswag(tmp_path / "fixture.jsonl") for ending in e.endings]
    texts += ["naïve café — 日本語 ✓", "  spaced\n\nlines\t tabs", "ends with <|endoftext|> here", "'s 've 123 4567"]
    encoding = gpt2_encoding()
    assert [tokenizer.encode(text) for text in texts] == [
        encoding.encode(text, allowed_special="all") for text in texts
    ]
    assert tokenizer.model_max_length == CONTEXT


def test_choices_and_accuracies_equal_lm_evals_hellaswag_example_by_example(exported, tmp_path):
    fixture = tmp_path / "fixture.jsonl"
    write_fixture(fixture, EXAMPLES)
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "hellaswag_fixture.yaml").write_text(
        f"include: {installed_hellaswag_task()}\n"
        "task: hellaswag_fixture\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n"
        "  data_files:\n"
        f"    validation: {fixture}\n"
        "training_split: null\n"
    )
    offline = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env = {**os.environ, **offline, "HF_HOME": str(tmp_path / "hf_home"), "TOKENIZERS_PARALLELISM": "false"}
    out = tmp_path / "lm_eval.json"
    done = subprocess.run(
        [sys.executable, "-c", RUN_LM_EVAL, str(exported), str(tasks), str(out)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    theirs = json.loads(out.read_text())

    examples = load_hellaswag(fixture)
    ours = score(load_gpt2(exported), examples, batch_size=32, progress=False)
    samples = theirs["samples"]
    assert len(samples) == ours.n == EXAMPLES
    # The same texts: lm-eval's process_docs and preprocess are ours.
    assert [s["query"] for s in samples] == [e.context for e in examples]
    assert [tuple(s["choices"]) for s in samples] == [e.endings for e in examples]
    assert [s["gold"] for s in samples] == ours.labels
    # Some rows were longer than the model's context, so both truncated from the left.
    assert any(len(tokens) == CONTEXT + 1 for e in examples for tokens, _ in example_rows(e, CONTEXT))
    theirs_sums = np.array([s["loglikelihoods"] for s in samples])
    assert np.allclose(theirs_sums, np.array(ours.loglikelihoods), atol=2e-3, rtol=1e-5)
    assert [int(np.argmax(sums)) for sums in theirs_sums] == ours.choices
    lengths = np.array([[float(len(ending)) for ending in e.endings] for e in examples])
    assert [int(np.argmax(row)) for row in theirs_sums / lengths] == ours.choices_norm
    assert [bool(s["acc"]) for s in samples] == ours.correct
    assert [bool(s["acc_norm"]) for s in samples] == ours.correct_norm
    assert (theirs["acc"], theirs["acc_norm"]) == (ours.acc, ours.acc_norm)
