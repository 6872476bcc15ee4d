"""Hugging Face GPT-2 directories: import into GPTModel, export a trial's checkpoint, and the `reference` run,
checked against `transformers` (a test-only dependency: the harness reads and writes the files itself)."""

import json
import shutil

import mlflow
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from analysis.load import mlflow_store
from harness.commands.export import main as export_main
from harness.commands.reference import main as reference_main
from harness.config.compose import config_hash, to_trial_config
from harness.data.loader import held_out_batches, open_dataset
from harness.trial import checkpoint, hf
from harness.trial.evaluation import load_saved_trial
from harness.trial.model import cross_entropy
from harness.trial.plugins import Plugin, register
from harness.trial.trainer import Trial
from tests.conftest import TINY, compose_config, rewrite_state

TINY_GPT2 = {"n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": 64, "vocab_size": 50257}


def transformers_gpt2(directory, tie: bool = True, **config):
    """A tiny GPT2LMHeadModel with every parameter (biases, LayerNorms) randomised, saved to `directory`."""
    from transformers import GPT2Config, GPT2LMHeadModel  # here: loading transformers takes seconds

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(**{**TINY_GPT2, **config}, tie_word_embeddings=tie))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    model.save_pretrained(directory)
    return model.eval()


@torch.no_grad()
def logits_agree(ours, theirs, context: int, atol: float = 1e-5) -> None:
    tokens = torch.randint(0, 50257, (3, context), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(ours(tokens), theirs(tokens).logits, rtol=1e-5, atol=atol)


@pytest.fixture(scope="module")
def trained(store, tmp_path_factory):
    """Run directories of two TINY trials (one checkpoint each): the untied baseline (no QKV bias) and a tied
    head with QKV bias."""
    runs = {}
    for name, overrides in (("untied", []), ("tied", ["+intervention=[weight_tying,qkv_bias]"])):
        runs[name] = tmp_path_factory.mktemp(name) / "run"
        Trial(compose_config(*TINY, "trainer.checkpoint_interval=4", *overrides), runs[name]).run()
    return runs


@pytest.mark.parametrize("tie", [True, False])
def test_import_computes_what_transformers_computes(tie, tmp_path):
    theirs = transformers_gpt2(tmp_path, tie=tie)
    ours = hf.load_gpt2(tmp_path)
    assert (ours.out_head.weight is ours.tok_emb.weight) == tie
    assert ours.cfg.qkv_bias and ours.num_parameters() == theirs.num_parameters()
    logits_agree(ours, theirs, context=64)
    shorter = hf.load_gpt2(tmp_path, context_length=16)
    assert shorter.pos_emb.weight.shape == (16, 32)
    logits_agree(shorter, theirs, context=16)


def test_openai_checkpoint_names_without_prefix_and_with_mask_buffers_are_read(tmp_path):
    theirs = transformers_gpt2(tmp_path)
    saved = load_file(tmp_path / hf.WEIGHTS_FILE)
    tensors = {name.removeprefix("transformer."): tensor for name, tensor in saved.items()}
    for layer in range(TINY_GPT2["n_layer"]):
        tensors[f"h.{layer}.attn.bias"] = torch.tril(torch.ones(1, 1, 64, 64))
    save_file(tensors, str(tmp_path / hf.WEIGHTS_FILE), metadata={"format": "pt"})
    logits_agree(hf.load_gpt2(tmp_path), theirs, context=64)


@pytest.mark.parametrize("name", ["untied", "tied"])
def test_exported_trial_reads_back_identically_and_in_transformers(name, trained, tmp_path, capsys):
    out = tmp_path / "export"
    assert export_main([str(trained[name]), f"out={out}"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    saved = load_saved_trial(trained[name])
    cfg = saved.model.cfg
    config = json.loads((out / hf.CONFIG_FILE).read_text())
    assert {
        k: config[k]
        for k in (
            "n_embd",
            "n_layer",
            "n_head",
            "n_positions",
            "vocab_size",
            "layer_norm_epsilon",
            "activation_function",
            "tie_word_embeddings",
        )
    } == {
        "n_embd": cfg.d_model,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_positions": cfg.context_length,
        "vocab_size": 50257,
        "layer_norm_epsilon": cfg.ln_eps,
        "activation_function": "gelu_new",
        "tie_word_embeddings": cfg.tie_weights,
    }
    with safe_open(str(out / hf.WEIGHTS_FILE), framework="pt") as f:
        assert f.metadata()["harness_run_id"] == saved.run_id and f.metadata()["format"] == "pt"
        assert ("lm_head.weight" in f.keys()) != cfg.tie_weights
        c_attn_bias = f.get_tensor("transformer.h.0.attn.c_attn.bias")
    assert bool(c_attn_bias.abs().sum()) == cfg.qkv_bias  # a model without QKV bias exports zeros

    tokens = torch.randint(0, 50257, (2, cfg.context_length), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = saved.model(tokens)
        assert torch.equal(hf.load_gpt2(out)(tokens), expected)
        from transformers import GPT2LMHeadModel

        theirs = GPT2LMHeadModel.from_pretrained(out).eval()
        torch.testing.assert_close(theirs(tokens).logits, expected, rtol=1e-5, atol=1e-5)
    assert (theirs.lm_head.weight is theirs.transformer.wte.weight) == cfg.tie_weights


def test_export_refuses_a_directory_that_holds_files(trained, tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("mine")
    assert export_main([str(trained["untied"]), f"out={tmp_path}"]) == 2
    assert f"out={tmp_path} already holds files" in capsys.readouterr().err
    assert export_main([str(trained["untied"])]) == 2
    assert "expected PATH [best|latest] out=DIR" in capsys.readouterr().err


@register("reshaping_for_test")
class ReshapingForTest(Plugin):
    def build_model(self, model):
        return model


def test_export_refuses_a_trial_whose_plugins_change_the_model(trained, tmp_path, capsys):
    run_dir = shutil.copytree(trained["untied"], tmp_path / "run")
    config = OmegaConf.load(run_dir / "config.yaml")
    config.plugins = {"reshaping_for_test": {}}
    OmegaConf.save(config, run_dir / "config.yaml")
    rewrite_state(checkpoint.resolve(run_dir / "checkpoints"), config_hash=config_hash(to_trial_config(config)))
    assert export_main([str(run_dir), f"out={tmp_path / 'export'}"]) == 2
    assert "plugins ['reshaping_for_test'] change the model" in capsys.readouterr().err


def test_reference_run_scores_the_test_window_as_transformers_does(store, tmp_path, capsys):
    theirs = transformers_gpt2(tmp_path / "gpt2")
    assert reference_main([f"path={tmp_path / 'gpt2'}", *TINY, "study=demo"]) == 0
    cfg = compose_config(*TINY)  # the window the reference is scored on: TINY's, context 32 of the model's 64
    total, count = 0.0, 0
    with torch.no_grad():
        for inputs, targets in held_out_batches(open_dataset(cfg.data, "test"), cfg.data, cfg.model.context_length):
            total += cross_entropy(theirs(inputs).logits, targets).item() * targets.numel()
            count += targets.numel()
    with mlflow_store(store) as fluent:
        runs = fluent.search_runs(search_all_experiments=True, filter_string="tags.intervention = 'reference'")
    assert len(runs) == 1
    run = mlflow.MlflowClient(store).get_run(runs.run_id[0])
    assert run.info.status == "FINISHED"
    assert (run.data.tags["scale"], run.data.tags["reference_source"]) == ("smoke", str((tmp_path / "gpt2").resolve()))
    assert "study" not in run.data.tags and run.data.params["study"] == "demo"
    np.testing.assert_allclose(run.data.metrics["test_loss"], total / count, rtol=1e-6)
    np.testing.assert_allclose(run.data.metrics["test_loss_amp"], total / count, rtol=1e-6)  # smoke: no autocast
    assert run.data.tags["test_loss_amp_autocast"] == "none"
    assert (
        f"test_loss {run.data.metrics['test_loss']:.6f}  test_loss_amp {run.data.metrics['test_loss_amp']:.6f}  "
        f"run {run.info.run_id}"
    ) in capsys.readouterr().out


@pytest.mark.parametrize(
    "problem, message",
    [
        ("no config", "config.json is missing; a Hugging Face GPT-2 directory holds config.json and model.safetensors"),
        ("wrong shape", "tensor h.1.attn.c_attn.weight has shape (32, 48); config.json implies (32, 96)"),
        ("missing tensor", "missing ['h.1.mlp.c_fc.bias'], unexpected none"),
        ("relu", "activation_function='relu', but the harness's GPT-2 needs the tanh GELU"),
        ("short context", "has 64 positions (n_positions); evaluating at context 128 needs at least that many"),
        ("intervention", "a reference run evaluates fixed weights"),
    ],
)
def test_unusable_reference_directories_are_explained(problem, message, tmp_path, capsys):
    directory = tmp_path / "gpt2"
    transformers_gpt2(directory, activation_function="relu" if problem == "relu" else "gelu_new")
    tensors = load_file(directory / hf.WEIGHTS_FILE)
    if problem == "no config":
        (directory / hf.CONFIG_FILE).unlink()
    if problem == "wrong shape":
        tensors["transformer.h.1.attn.c_attn.weight"] = tensors["transformer.h.1.attn.c_attn.weight"][:, :48]
    if problem == "missing tensor":
        del tensors["transformer.h.1.mlp.c_fc.bias"]
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / hf.WEIGHTS_FILE))
    overrides = {
        "short context": ["model.context_length=128", "data.test_tokens=512"],
        "intervention": ["+intervention=no_dropout"],
    }.get(problem, [])
    assert reference_main([f"path={directory}", *TINY, *overrides]) == 2
    assert message in capsys.readouterr().err


def test_reference_run_scores_hellaswag_the_same_way_with_its_per_example_record(store, tmp_path, capsys):
    from harness.data.hellaswag import load_hellaswag
    from harness.trial.hellaswag import score
    from tests.fixtures.hellaswag import write_fixture

    transformers_gpt2(tmp_path / "gpt2")
    write_fixture(tmp_path / "hellaswag.jsonl", count=12)
    overrides = [
        *TINY,
        "model.context_length=64",
        "eval.hellaswag=true",
        f"eval.hellaswag_path={tmp_path / 'hellaswag.jsonl'}",
    ]
    assert reference_main([f"path={tmp_path / 'gpt2'}", *overrides, "study=hellaswag_reference"]) == 0
    with mlflow_store(store) as fluent:
        runs = fluent.search_runs(search_all_experiments=True, filter_string="params.study = 'hellaswag_reference'")
    run = mlflow.MlflowClient(store).get_run(runs.run_id[0])
    ours = score(hf.load_gpt2(tmp_path / "gpt2", 64), load_hellaswag(tmp_path / "hellaswag.jsonl"), progress=False)
    assert (run.data.metrics["hellaswag_acc"], run.data.metrics["hellaswag_acc_norm"]) == (ours.acc, ours.acc_norm)
    record = mlflow.artifacts.load_dict(f"{run.info.artifact_uri}/hellaswag/final.json")
    assert record["choice_norm"] == ours.choices_norm and record["choice"] == ours.choices
    assert f"hellaswag_acc_norm {ours.acc_norm:.4f}" in capsys.readouterr().out
