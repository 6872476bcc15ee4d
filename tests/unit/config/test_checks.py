"""Bad input is refused before anything runs: one line per problem naming the key, its value and what is
allowed; every problem at once; exit status 2; no traceback (unless HYDRA_FULL_ERROR=1); no output directory,
no MLflow store, nothing trained; and the commands that only answer (`list`, `--help`, a config error) never
import torch or MLflow."""

import copy
import functools

import pytest
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra._internal.config_loader_impl import ConfigLoaderImpl
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from harness.config.checks import ConfigError
from harness.config.compose import compose, overlay_conflicts
from harness.config.overrides import override_problems
from harness.paths import PROJECT_ROOT
from harness.study.design import StudyConf, study_trials
from harness.trial.preflight import checked_trial, refuse

# A smoke scale: a trial that would train in seconds if the input were accepted.
SMOKE = [
    "trainer.global_batch_size=4",
    "trainer.micro_batch_size=4",
    "data.test_tokens=2048",
    "trainer.max_steps=4",
    "trainer.checkpoint_interval=2",
    "trainer.progress=false",
]


def problems_of(*overrides: str) -> list[str]:
    """What `python -m harness SMOKE OVERRIDES` reports, through the same checks in this process: the overrides
    against the schema, then the composed trial and what it needs from this machine and its data."""
    overrides = [*SMOKE, *overrides]
    problems = override_problems(overrides)
    if problems:
        return problems
    with pytest.raises(ConfigError) as refused:
        checked_trial(composed(overrides), overrides)
    return refused.value.problems


@functools.cache
def smoke_config():
    with initialize_config_dir(config_dir=str(PROJECT_ROOT / "conf"), version_base="1.3"):
        return hydra_compose("config", overrides=SMOKE)


def composed(overrides: list[str]):
    """Hydra's composition of the overrides. Value overrides are applied by Hydra's own function to the smoke
    config composed once (a composition takes ~0.2 s); overrides that choose configs compose from the start."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    if any(o.key_or_group in ("intervention", "scale", "sweep") for o in parsed):
        with initialize_config_dir(config_dir=str(PROJECT_ROOT / "conf"), version_base="1.3"):
            return hydra_compose("config", overrides=overrides)
    cfg = copy.deepcopy(smoke_config())
    ConfigLoaderImpl._apply_overrides_to_config(parsed, cfg)
    return cfg


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    (root / "empty").mkdir()
    (root / "a_file").write_text("not a directory")
    (root / "bad_manifest").mkdir()
    (root / "bad_manifest" / "manifest.json").write_text('{"dataset": "fineweb",\n "splits": {\n')
    (root / "store_dir").mkdir()
    return root


# (overrides, the key the message must name, a fragment saying what is allowed). {root} is a temporary directory.
BAD = [
    # model
    (["model.vocab_size=1000"], "model.vocab_size", "≥ 50257"),
    (["model.context_length=0"], "model.context_length", "≥ 1"),
    (["model.context_length=1000000"], "model.context_length", "whole number of eval batches"),
    (["model.n_head=0"], "model.n_head", "≥ 1"),
    (["model.n_layer=0"], "model.n_layer", "≥ 1"),
    (["model.d_model=0"], "model.d_model", "≥ 1"),
    (["model.n_head=3"], "model.d_model", "divisible by model.n_head=3"),
    (["model.dropout=1.0"], "model.dropout", "[0, 1)"),
    (["model.tied_init=random"], "model.tied_init", "one of embedding, head"),
    (["model.ln_eps=0"], "model.ln_eps", "> 0"),
    # data
    (["data.dataset=imagenet"], "data.dataset", "one of bundled, fineweb, fineweb_edu"),
    (["data.holdout_fraction=-0.5"], "data.holdout_fraction", "(0, 1)"),
    (["data.holdout_fraction=1"], "data.holdout_fraction", "(0, 1)"),
    (["data.test_tokens=0"], "data.test_tokens", "≥ 1"),
    (["data.test_tokens=1000"], "data.test_tokens", "a multiple of data.eval_batch_size × model.context_length"),
    (["data.eval_batch_size=0"], "data.eval_batch_size", "≥ 1"),
    (["data.test_offset=-1000"], "data.test_offset", "≥ 0"),
    (["data.seed=-1"], "data.seed", "≥ 0, or null"),
    (["data.max_epochs=0"], "data.max_epochs", "> 0"),
    (["data.path={root}/empty"], "data.path", "the bundled corpus takes no path"),
    (
        ["data.dataset=fineweb", "data.path={root}/empty"],
        "data.path",
        "holds no prepared dataset (no manifest.json); prepare it once with `python -m harness.data prepare dataset=fineweb",
    ),
    (["data.dataset=fineweb", "data.path={root}/missing"], "data.path", "does not exist; prepare it once"),
    (["data.dataset=fineweb", "data.path={root}/a_file"], "data.path", "is a file"),
    (
        ["data.dataset=fineweb", "data.path={root}/bad_manifest"],
        "bad_manifest/manifest.json",
        "is not a valid manifest (Expecting property name",
    ),
    (["data.test_offset=100000000"], "data.test_tokens", "does not fit|needs 100,002,049 tokens"),
    (["trainer.max_steps=100000"], "data.max_epochs", "epochs > data.max_epochs=1.0"),
    # optim
    (["optim.lr=nan"], "optim.lr", "a finite number > 0"),
    (["optim.lr=0"], "optim.lr", "> 0"),
    (["optim.lr=inf"], "optim.lr", "a finite number"),
    (["optim.weight_decay=-1"], "optim.weight_decay", "≥ 0"),
    (["optim.beta1=1.5"], "optim.beta1", "[0, 1)"),
    (["optim.beta2=-0.1"], "optim.beta2", "[0, 1)"),
    (["optim.eps=0"], "optim.eps", "> 0"),
    (["optim.grad_clip=0"], "optim.grad_clip", "> 0, or null"),
    (["optim.schedule=cosine"], "optim.schedule", "one of constant, warmup_cosine"),
    (["optim.warmup_fraction=1"], "optim.warmup_fraction", "[0, 1)"),
    (["optim.warmup_start_factor=0"], "optim.warmup_start_factor", "(0, 1]"),
    (["optim.final_lr_ratio=2"], "optim.final_lr_ratio", "[0, 1]"),
    (["+intervention=lr_wsd", "optim.decay_fraction=0.99"], "optim.decay_fraction", "≤ 1 - optim.warmup_fraction"),
    # trainer
    (["trainer.device=cuda"], "trainer.device", "no CUDA device"),
    (["trainer.device=tpu"], "trainer.device", "one of auto, cpu, cuda"),
    (["trainer.precision=fp8"], "trainer.precision", "one of fp32, tf32, fp16_amp, bf16_amp"),
    (["trainer.precision=fp16_amp"], "trainer.precision", "needs a CUDA device"),
    (["trainer.global_batch_size=0"], "trainer.global_batch_size", "≥ 1"),
    (["trainer.micro_batch_size=3"], "trainer.global_batch_size", "divisible by trainer.micro_batch_size"),
    (["trainer.max_steps=0"], "trainer.max_steps", "≥ 1"),
    (["trainer.checkpoint_interval=0"], "trainer.checkpoint_interval", "≥ 1"),
    (["trainer.nproc_per_node=0"], "trainer.nproc_per_node", "≥ 1"),
    (["trainer.divergence_patience=0"], "trainer.divergence_patience", "≥ 1"),
    (["trainer.sample_top_k=-1"], "trainer.sample_top_k", "≥ 0"),
    (["trainer.sample_temperature=0"], "trainer.sample_temperature", "> 0"),
    (["trainer.sample_tokens=-1"], "trainer.sample_tokens", "≥ 0"),
    (["trainer.sample_prompt=''"], "trainer.sample_prompt", "non-empty text"),
    (["trainer.exploding_grad_norm=0"], "trainer.exploding_grad_norm", "> 0"),
    # tracking and the trial
    (["tracking.uri=garbage"], "tracking.uri", "an MLflow tracking URI"),
    (["tracking.uri=sqlite:///{root}/store_dir"], "tracking.uri", "sqlite:///PATH/mlflow.db (a file)"),
    (["tracking.log_interval=0"], "tracking.log_interval", "≥ 1"),
    (["tracking.experiment=''"], "tracking.experiment", "non-empty text"),
    (["tracking.parent_run_id=abc"], "tracking.parent_run_id", "32 hex digits"),
    (["seed=-1"], "seed", "[0, 4294967295]"),
    (["train_seed=4294967296"], "train_seed", "[0, 4294967295]"),
    (["study='a study'"], "study", "letters, digits"),
    (["resume={root}/missing"], "resume", "no such directory"),
    (["resume={root}/empty"], "resume", "holds no config.yaml"),
    # keys, types and options
    (["optim.lrr=1"], "optim.lrr", "no such config key; did you mean optim.lr?"),
    (["+optim.lrr=1"], "optim.lrr", "did you mean optim.lr?"),
    (["trainer.max_stpes=3"], "trainer.max_stpes", "did you mean trainer.max_steps?"),
    (["lr=0.1"], "lr", "did you mean optim.lr?"),
    (["optim.learning_rate=0.1"], "optim.learning_rate", "did you mean optim.lr?"),
    (["model.n_embd=64"], "model.n_embd", "did you mean model.d_model?"),
    (["optim.lr=abc"], "optim.lr", "must be a number"),
    (["model.n_head=1.5"], "model.n_head", "must be a whole number"),
    (["seed=null"], "seed", "must be a whole number"),
    (["interventions=[no_dropout]"], "interventions", "+intervention=NAME"),
    (["+intervention=no_droput"], "intervention=no_droput", "did you mean no_dropout?"),
    (["intervention=no_dropout"], "intervention=no_dropout", "+intervention="),
    (["scale=gpt3"], "scale=gpt3", "choose from gpt2_small, proxy, smoke"),
    (["+intervention=[bf16,no_amp]"], "trainer.precision", "bf16 to bf16_amp and no_amp to fp32"),
    (["+intervention=[no_amp,bf16]"], "trainer.precision", "no_amp to fp32 and bf16 to bf16_amp"),
    (["+intervention=[weight_decay,weight_decay_cerebras]"], "optim.weight_decay", "weight_decay to 0.01"),
    (["+intervention=[lr_schedule,lr_wsd]"], "optim.schedule", "lr_schedule to warmup_cosine and lr_wsd to wsd"),
    (
        ["+intervention=z_loss", "plugins.z_loss.coef=1"],
        "plugins.z_loss.coef",
        "did you mean plugins.z_loss.coefficient?",
    ),
    (["+intervention=z_loss", "+plugins.z_loss.coef=1"], "plugins.z_loss", "unexpected keyword argument 'coef'"),
    (["plugins.z_loss.coefficient=1"], "plugins.z_loss.coefficient", "plugin z_loss is not enabled"),
    (["+plugins.no_such_plugin={}"], "plugins.no_such_plugin", "no plugin named 'no_such_plugin'"),
]


def test_at_least_forty_kinds_of_bad_input_are_checked():
    assert len(BAD) >= 40


@pytest.mark.parametrize("overrides, key, allowed", BAD, ids=[" ".join(row[0]) for row in BAD])
def test_bad_input_is_refused_naming_the_key_and_what_is_allowed(overrides, key, allowed, paths, capsys):
    overrides = [o.replace("{root}", str(paths)) for o in overrides]
    problems = problems_of(*overrides)
    line = next((p for p in problems if key in p), None)
    assert line is not None, problems
    assert any(fragment in line for fragment in allowed.split("|")), line
    assert all("\n" not in p for p in problems)  # one line per problem
    # and what the command does with them: one `error:` line each, exit status 2, no traceback
    with pytest.raises(SystemExit) as exit:
        refuse(ConfigError(problems))
    err = capsys.readouterr().err
    assert exit.value.code == 2
    assert err.splitlines() == [f"error: {p}" for p in problems] and "Traceback" not in err


def test_every_problem_is_reported_at_once():
    problems = problems_of(
        "optim.weight_decay=-1",
        "model.n_head=0",
        "data.eval_batch_size=0",
        "optim.lr=nan",
        "trainer.sample_top_k=-1",
        "tracking.uri=garbage",
    )
    keys = [
        "model.n_head",
        "data.eval_batch_size",
        "optim.lr",
        "optim.weight_decay",
        "trainer.sample_top_k",
        "tracking.uri",
    ]
    assert [p.split("=")[0] for p in problems] == keys


def test_a_trial_that_cannot_start_here_is_told_about_its_data_too(paths):
    hellaswag = f"{paths}/no_hellaswag"  # gpt2_small scores HellaSwag: its data is checked as well
    assert problems_of(
        "scale=gpt2_small", "data.test_tokens=6144", f"data.path={paths}/missing", f"eval.hellaswag_path={hellaswag}"
    ) == [
        "trainer.precision=fp16_amp: needs a CUDA device (fp16 autocast with GradScaler) and this trial runs on the "
        "CPU; use trainer.precision=tf32 or fp32 there (the same arithmetic on a CPU), or bf16_amp (runs, but ~15× "
        "slower on CPUs without bf16 matmul units); fp16 emulated on the CPU, several times slower than fp32, runs "
        "when asked for with trainer.device=cpu",
        f"data.path={paths}/missing: {paths}/missing does not exist; prepare it once with `python -m harness.data "
        f"prepare dataset=fineweb_gpt2_tokens out={paths}/missing`, or point data.path at a prepared directory",
        f"eval.hellaswag=true: {hellaswag} does not exist; prepare it once with `python -m harness prepare "
        f"dataset=hellaswag out={hellaswag}`, or point eval.hellaswag_path at a prepared directory",
    ]


def test_an_unset_tracking_uri_checks_the_environments(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "garbage")
    assert problems_of() == [
        "MLFLOW_TRACKING_URI=garbage (the store, as tracking.uri is not set): must be an MLflow tracking URI: "
        "sqlite:///PATH/mlflow.db (a file), http(s)://HOST:PORT, or a database (postgresql://, mysql://, mssql://) "
        "or databricks URI"
    ]


def test_every_field_of_every_section_has_its_range_or_is_free_text_or_a_switch():
    import dataclasses

    from harness.config.schema import TrialConfig

    unchecked = []
    for section in [
        TrialConfig,
        *(f.type for f in dataclasses.fields(TrialConfig) if dataclasses.is_dataclass(f.type)),
    ]:
        for f in dataclasses.fields(section):
            if not dataclasses.is_dataclass(f.type) and f.name not in section.allowed and f.type is not bool:
                unchecked.append(f"{section.section}.{f.name}")
    assert unchecked == [], "give each new config field its range in `allowed`"


# --- overlays ----------------------------------------------------------------------------------------------
def test_a_key_set_on_the_command_line_settles_an_overlay_conflict():
    cfg = compose(["+intervention=[bf16,no_amp]", "trainer.precision=bf16_amp"])
    assert cfg.trainer.precision == "bf16_amp" and cfg.interventions == ["bf16", "no_amp"]


def test_overlays_that_agree_stack_without_conflict():
    stacked = compose(["+intervention=[stacked_best,lr_schedule,gradient_clipping]"])
    assert stacked.interventions == ["gradient_clipping", "lr_schedule", "no_dropout", "weight_decay"]


def test_every_arm_of_every_shipped_study_is_free_of_overlay_conflicts():
    studies = sorted(p.stem for p in (PROJECT_ROOT / "conf" / "sweep").glob("*.yaml"))
    with initialize_config_dir(config_dir=str(PROJECT_ROOT / "conf"), version_base="1.3"):
        settings = [
            hydra_compose("config", overrides=[f"+sweep={s}"], return_hydra_config=True).hydra.sweeper for s in studies
        ]
    arms = set()
    for study in settings:
        conf = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(StudyConf), study))
        arms |= {tuple(trial.overrides()[:-2]) for trial in study_trials(conf)}  # without the seeds
    assert len(arms) >= 20 and ("+intervention=stacked_best",) in arms
    assert [arm for arm in arms if overlay_conflicts(list(arm))] == []
    assert compose(
        ["+intervention=[gradient_clipping,lr_schedule,no_dropout,qkv_bias,weight_decay]"]
    ).interventions == [
        "gradient_clipping",
        "lr_schedule",
        "no_dropout",
        "qkv_bias",
        "weight_decay",
    ]  # the factorial's largest arm
