import copy
import functools
import math
import subprocess
import sys

import pytest

from harness.config.checks import ConfigError
from harness.config.compose import as_dict, config_hash
from harness.paths import PROJECT_ROOT
from interventions import REGISTRY, flatten
from tests.conftest import compose_config, run_in_process

OVERLAYS = sorted(p.stem for p in (PROJECT_ROOT / "conf" / "intervention").glob("*.yaml"))
SEVEN = ["gradient_clipping", "no_dropout", "qkv_bias", "lr_schedule", "weight_decay", "weight_tying", "no_amp"]


def changed_keys(*overrides):
    base = flatten(as_dict(compose_config()))
    new = flatten(as_dict(compose_config(*overrides)))
    return {k: v for k, v in new.items() if base.get(k, "<absent>") != v and k != "interventions"}


def assert_sets_exactly(overrides: list[str], expected: dict):
    """The overlay sets these keys to these values (some may equal the defaults) and changes nothing else."""
    new = flatten(as_dict(compose_config(*overrides)))
    assert {k: new[k] for k in expected} == expected
    assert set(changed_keys(*overrides)) <= set(expected)


def test_every_overlay_has_a_registry_entry_and_back():
    assert OVERLAYS == sorted(REGISTRY)
    assert set(SEVEN) < set(OVERLAYS)


@pytest.mark.parametrize("name", OVERLAYS)
def test_overlay_changes_exactly_its_registered_keys(name):
    assert_sets_exactly([f"+intervention={name}"], REGISTRY[name].changes)
    assert compose_config(f"+intervention={name}").interventions == sorted(REGISTRY[name].expanded())


def test_seed_interventions_match_the_seeds():
    assert changed_keys("+intervention=gradient_clipping") == {"optim.grad_clip": 3.5}
    assert changed_keys("+intervention=no_dropout") == {"model.dropout": 0.0}
    assert changed_keys("+intervention=weight_decay") == {"optim.weight_decay": 0.01}
    assert changed_keys("+intervention=no_amp") == {"trainer.precision": "fp32"}
    lr = compose_config("+intervention=lr_schedule").optim
    assert (lr.lr, lr.schedule, lr.warmup_fraction, lr.warmup_start_factor, lr.final_lr_ratio) == (
        1.4e-3,
        "warmup_cosine",
        0.05,
        1e-5,
        0.1,
    )


def test_stacked_overlays_compose_and_stacked_best_equals_its_four_parts():
    stacked = compose_config("+intervention=[no_dropout,gradient_clipping]")
    assert stacked.interventions == ["gradient_clipping", "no_dropout"]
    assert (stacked.model.dropout, stacked.optim.grad_clip) == (0.0, 3.5)
    best = compose_config("+intervention=stacked_best", "trainer.max_steps=2")
    parts = compose_config(
        "+intervention=[gradient_clipping,weight_decay,no_dropout,lr_schedule]", "trainer.max_steps=2"
    )
    assert best == parts
    assert as_dict(best) == as_dict(parts)
    assert config_hash(best) == config_hash(parts)


def test_settings_live_only_in_the_overlays_and_stacked_best_composes_its_parts():
    import dataclasses

    from interventions import Intervention, overlay_settings

    assert "changes" not in {f.name for f in dataclasses.fields(Intervention)}
    stacked = (PROJECT_ROOT / "conf" / "intervention" / "stacked_best.yaml").read_text()
    assert "defaults:" in stacked and "optim:" not in stacked and "model:" not in stacked
    parts = {}
    for name in REGISTRY["stacked_best"].components:
        parts.update(overlay_settings(name))
    assert REGISTRY["stacked_best"].changes == parts and len(parts) == 8
    assert REGISTRY["lr_schedule"].changes["optim.lr"] == 1.4e-3  # read from the YAML, a float
    assert overlay_settings("no_such_overlay") == {}


def test_the_schema_and_the_model_load_without_hydra_or_omegaconf():
    code = (
        "import sys, harness.trial.model, harness.config.schema, harness.config.checks; "
        "assert 'hydra' not in sys.modules and 'omegaconf' not in sys.modules, "
        "sorted(m for m in sys.modules if m.split('.')[0] in ('hydra', 'omegaconf', 'interventions'))"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_the_callbacks_checked_trial_is_the_one_the_task_function_runs():
    from hydra import compose, initialize_config_dir

    from harness.trial import preflight

    overrides = ["trainer.max_steps=3", "trainer.device=cpu", "trainer.precision=fp32"]
    with initialize_config_dir(config_dir=str(PROJECT_ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    preflight.check_job(cfg, overrides)
    checked = preflight.CHECKED[tuple(overrides)]
    assert preflight.trial_for_job(cfg, overrides) is checked  # handed over, not composed again
    assert tuple(overrides) not in preflight.CHECKED
    again = preflight.trial_for_job(cfg, overrides)  # no callback ran: composed and checked here
    assert again is not checked and again == checked


def test_the_commands_split_their_settings_from_the_rest():
    from harness.arguments import split, whole_number

    given = split(["steps=3", "optim.lr=1", "--mark", "--other", "path", "steps=4", "warmup"], {"steps"}, {"--mark"})
    assert given.settings == {"steps": "4"} and given.flags == {"--mark"}
    assert given.rest == ["optim.lr=1", "--other", "path", "warmup"]
    assert whole_number("steps", "7") == 7
    with pytest.raises(ValueError, match=r"^steps=x: must be a whole number$"):
        whole_number("steps", "x")


def test_baseline_matches_the_seeds_at_gpt2_small():
    cfg = compose_config("scale=gpt2_small")
    m, o, t = cfg.model, cfg.optim, cfg.trainer
    assert (m.vocab_size, m.context_length, m.n_layer, m.n_head, m.d_model) == (50257, 1024, 12, 12, 768)
    assert (m.dropout, m.qkv_bias, m.tie_weights, m.ln_eps) == (0.1, False, False, 1e-5)
    assert (o.lr, o.weight_decay, o.schedule, o.grad_clip, o.beta1, o.beta2, o.eps) == (
        4e-4,
        0.1,
        "constant",
        None,
        0.9,
        0.999,
        1e-8,
    )
    assert (t.precision, t.global_batch_size, t.micro_batch_size, t.grad_accum_steps(1)) == ("fp16_amp", 96, 6, 16)
    assert t.checkpoint_interval == 617
    tokens_per_step = t.global_batch_size * m.context_length
    assert tokens_per_step == 98_304
    assert t.max_steps == math.ceil(20 * 163_009_536 / tokens_per_step) == 33_165
    assert t.max_steps * tokens_per_step == 3_260_252_160
    assert (cfg.data.dataset, cfg.data.test_offset, cfg.data.test_tokens, cfg.data.eval_batch_size) == (
        "fineweb_gpt2_tokens",
        50_000_000,
        19_660_800,
        6,
    )
    assert cfg.seed == 42 and cfg.train_seed is None


def changed(cfg, key: str, value):
    """A copy of the composed config with one dotted key set (no Hydra composition: fast)."""
    cfg = copy.deepcopy(cfg)
    *parents, leaf = key.split(".")
    setattr(functools.reduce(getattr, parents, cfg), leaf, value)
    return cfg


def test_config_hash_covers_only_what_changes_the_computation():
    cfg = compose_config()
    base = config_hash(cfg)
    assert config_hash(compose_config("study=abc", "trainer.progress=false")) == base  # through Hydra too
    for key, value in [
        ("study", "abc"),
        ("tracking.experiment", "other"),
        ("tracking.log_interval", 3),
        ("rerun", True),
        ("reuse_other_code_versions", True),
        ("resume", "x"),
        ("trainer.progress", False),
        ("trainer.sample_prompt", "Hello"),
        ("trainer.sample_tokens", 5),
        ("trainer.sample_top_k", 3),
        ("trainer.sample_temperature", 1.3),
        ("data.verify_checksums", False),
    ]:
        assert config_hash(changed(cfg, key, value)) == base, key
    for key, value in [
        ("seed", 67),
        ("train_seed", 1),
        ("interventions", ["no_dropout"]),
        ("optim.lr", 1e-3),
        ("model.dropout", 0.0),
        ("data.seed", 3),
        ("trainer.max_steps", 50),
        ("trainer.checkpoint_interval", 10),
        ("trainer.exploding_grad_norm", 5.0),
        ("trainer.precision", "fp32"),
    ]:
        assert config_hash(changed(cfg, key, value)) != base, key


def test_misspelt_and_invalid_values_fail_with_the_key_name():
    with pytest.raises(Exception, match="max_stpes"):
        compose_config("trainer.max_stpes=3")
    with pytest.raises(ConfigError, match="trainer.max_stpes: no such config key; did you mean trainer.max_steps?"):
        compose_config("+trainer.max_stpes=3")
    with pytest.raises(ValueError, match="trainer.precision"):
        compose_config("trainer.precision=fp8")
    with pytest.raises(ValueError, match="trainer.global_batch_size=16: must be divisible by"):
        compose_config("trainer.micro_batch_size=5")


def test_cli_rejects_unknown_intervention_listing_the_available_ones(tmp_path):
    result = run_in_process("+intervention=no_droput", cwd=tmp_path, env_uri=f"sqlite:///{tmp_path}/m.db", check=False)
    assert result.returncode == 2
    assert (
        "intervention=no_droput: no such intervention in conf/intervention/; did you mean no_dropout?" in result.stderr
    )
    for name in OVERLAYS:
        assert name in result.stderr
    assert not (tmp_path / "m.db").exists()  # failed before anything ran


def test_gpt2_small_without_the_prepared_study_tokens_says_how_to_prepare(tmp_path):
    result = run_in_process(
        "scale=gpt2_small",
        "trainer.device=cpu",
        "trainer.precision=fp32",
        f"data.path={tmp_path}/none",
        cwd=tmp_path,
        env_uri=f"sqlite:///{tmp_path}/m.db",
        check=False,
    )
    assert result.returncode != 0
    assert "python -m harness.data prepare dataset=fineweb_gpt2_tokens" in result.stderr


def test_list_shows_every_intervention(tmp_path):
    out = run_in_process("list", cwd=tmp_path, env_uri="sqlite:///unused").stdout
    for name, item in REGISTRY.items():
        assert name in out and item.description in out
