"""GPT-2 checkpoints in Hugging Face's layout, to and from the harness's GPTModel, without transformers.

How the two layouts differ (Conv1D weights, the fused `c_attn`, the tied head, name prefixes) is in docs/trial.md."""

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from harness.data.tokenizer import END_OF_TEXT, save_hf_tokenizer
from harness.trial.model import GPTModel, ModelConfig

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
BODY_PREFIX = "transformer."
HEAD = "lm_head.weight"
TANH_GELU = ("gelu_new", "gelu_pytorch_tanh")  # Hugging Face's names for the tanh-approximated GELU
MASK_BUFFER = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)")
QKV = ("W_query", "W_key", "W_value")
LAYER_NORMS = {"ln_1": "norm1", "ln_2": "norm2"}
CONV1D = {"attn.c_proj": "att.out_proj", "mlp.c_fc": "ff.layers.0", "mlp.c_proj": "ff.layers.2"}

# Hugging Face's GPT2Config defaults, for keys a config.json leaves out.
HF_DEFAULTS = {
    "vocab_size": 50257,
    "n_positions": 1024,
    "n_embd": 768,
    "n_layer": 12,
    "n_head": 12,
    "n_inner": None,
    "activation_function": "gelu_new",
    "resid_pdrop": 0.1,
    "embd_pdrop": 0.1,
    "attn_pdrop": 0.1,
    "layer_norm_epsilon": 1e-5,
    "scale_attn_weights": True,
    "scale_attn_by_inverse_layer_idx": False,
    "tie_word_embeddings": True,
}


# --- config ---------------------------------------------------------------------------------------
def hf_config(cfg: ModelConfig) -> dict:
    """The config.json of a GPT2LMHeadModel that computes what GPTModel(cfg) computes."""
    return {
        "model_type": "gpt2",
        "architectures": ["GPT2LMHeadModel"],
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.context_length,
        "n_embd": cfg.d_model,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_inner": None,
        "activation_function": "gelu_new",
        "resid_pdrop": cfg.dropout,
        "embd_pdrop": cfg.dropout,
        "attn_pdrop": cfg.dropout,
        "layer_norm_epsilon": cfg.ln_eps,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": cfg.tie_weights,
        "bos_token_id": END_OF_TEXT,
        "eos_token_id": END_OF_TEXT,
    }


def model_config(hf: dict, source: Path) -> ModelConfig:
    """The harness ModelConfig of a Hugging Face GPT-2 config.json; refuses what GPTModel cannot compute."""
    hf = {**HF_DEFAULTS, **hf}

    def require(condition: bool, key: str, wanted: str) -> None:
        if not condition:
            raise ValueError(f"{source}: {key}={hf[key]!r}, but the harness's GPT-2 needs {wanted}")

    require(hf.get("model_type", "gpt2") == "gpt2", "model_type", "'gpt2'")
    require(hf["activation_function"] in TANH_GELU, "activation_function", f"the tanh GELU ({' or '.join(TANH_GELU)})")
    require(hf["n_inner"] in (None, 4 * hf["n_embd"]), "n_inner", f"null or 4 × n_embd = {4 * hf['n_embd']}")
    require(hf["scale_attn_weights"] is True, "scale_attn_weights", "true")
    require(hf["scale_attn_by_inverse_layer_idx"] is False, "scale_attn_by_inverse_layer_idx", "false")
    require(
        hf["embd_pdrop"] == hf["attn_pdrop"] == hf["resid_pdrop"],
        "embd_pdrop",
        f"one dropout rate (attn_pdrop={hf['attn_pdrop']}, resid_pdrop={hf['resid_pdrop']})",
    )
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        context_length=hf["n_positions"],
        n_layer=hf["n_layer"],
        n_head=hf["n_head"],
        d_model=hf["n_embd"],
        dropout=hf["resid_pdrop"],
        qkv_bias=True,
        tie_weights=hf["tie_word_embeddings"],
        ln_eps=hf["layer_norm_epsilon"],
    )


# --- weights --------------------------------------------------------------------------------------
def to_hf_state_dict(model: GPTModel) -> dict[str, torch.Tensor]:
    """Hugging Face names (without the `transformer.` prefix) and layouts of the model's weights."""
    cfg, ours = model.cfg, model.state_dict()
    hf = {
        "wte.weight": ours["tok_emb.weight"],
        "wpe.weight": ours["pos_emb.weight"],
        "ln_f.weight": ours["final_norm.weight"],
        "ln_f.bias": ours["final_norm.bias"],
    }
    for i in range(cfg.n_layer):
        h, block = f"h.{i}.", f"trf_blocks.{i}."
        for hf_norm, our_norm in LAYER_NORMS.items():
            for kind in ("weight", "bias"):
                hf[f"{h}{hf_norm}.{kind}"] = ours[f"{block}{our_norm}.{kind}"]
        hf[f"{h}attn.c_attn.weight"] = torch.cat([ours[f"{block}att.{w}.weight"] for w in QKV]).t()
        no_bias = torch.zeros(cfg.d_model, dtype=ours["tok_emb.weight"].dtype, device=ours["tok_emb.weight"].device)
        hf[f"{h}attn.c_attn.bias"] = torch.cat([ours.get(f"{block}att.{w}.bias", no_bias) for w in QKV])
        for hf_conv, our_linear in CONV1D.items():
            hf[f"{h}{hf_conv}.weight"] = ours[f"{block}{our_linear}.weight"].t()
            hf[f"{h}{hf_conv}.bias"] = ours[f"{block}{our_linear}.bias"]
    if not cfg.tie_weights:
        hf[HEAD] = ours["out_head.weight"]
    return {name: tensor.contiguous() for name, tensor in hf.items()}


def from_hf_state_dict(hf: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The harness state dict (with QKV biases) of checked Hugging Face tensors (names without the prefix)."""
    ours = {
        "tok_emb.weight": hf["wte.weight"],
        "pos_emb.weight": hf["wpe.weight"],
        "final_norm.weight": hf["ln_f.weight"],
        "final_norm.bias": hf["ln_f.bias"],
        "out_head.weight": hf["wte.weight"] if cfg.tie_weights else hf[HEAD],
    }
    for i in range(cfg.n_layer):
        h, block = f"h.{i}.", f"trf_blocks.{i}."
        for hf_norm, our_norm in LAYER_NORMS.items():
            for kind in ("weight", "bias"):
                ours[f"{block}{our_norm}.{kind}"] = hf[f"{h}{hf_norm}.{kind}"]
        weights = hf[f"{h}attn.c_attn.weight"].t().split(cfg.d_model)
        biases = hf[f"{h}attn.c_attn.bias"].split(cfg.d_model)
        for w, weight, bias in zip(QKV, weights, biases):
            ours[f"{block}att.{w}.weight"], ours[f"{block}att.{w}.bias"] = weight, bias
        for hf_conv, our_linear in CONV1D.items():
            ours[f"{block}{our_linear}.weight"] = hf[f"{h}{hf_conv}.weight"].t()
            ours[f"{block}{our_linear}.bias"] = hf[f"{h}{hf_conv}.bias"]
    return ours


def read_hf_tensors(path: Path, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The file's tensors as fp32, names without the prefix, checked against the names and shapes `cfg` needs."""
    with torch.device("meta"):
        expected = {name: tuple(t.shape) for name, t in to_hf_state_dict(GPTModel(cfg)).items()}
    tensors = {}
    with safe_open(str(path), framework="pt") as f:
        for stored in f.keys():
            name = stored.removeprefix(BODY_PREFIX)
            if not MASK_BUFFER.fullmatch(name):
                tensors[name] = f.get_tensor(stored).float()
    if cfg.tie_weights and HEAD in tensors:  # a tied head stored anyway must be the embedding
        head = tensors.pop(HEAD)
        if "wte.weight" in tensors and not torch.equal(head, tensors["wte.weight"]):
            raise ValueError(f"{path}: {HEAD} differs from wte.weight, but config.json says tie_word_embeddings=true")
    missing, unexpected = sorted(expected.keys() - tensors.keys()), sorted(tensors.keys() - expected.keys())
    if missing or unexpected:
        raise ValueError(
            f"{path} does not hold a GPT-2 of its config.json: missing {missing or 'none'}, "
            f"unexpected {unexpected or 'none'}"
        )
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise ValueError(
                f"{path}: tensor {name} has shape {tuple(tensors[name].shape)}; config.json implies {shape}"
            )
    return tensors


# --- directories ----------------------------------------------------------------------------------
def load_gpt2(directory: Path, context_length: int | None = None) -> GPTModel:
    """A Hugging Face GPT-2 directory as a GPTModel (QKV bias on, tied head unless the config unties it).

    `context_length` below the checkpoint's n_positions keeps only the first position embeddings: the model
    then computes on sequences of that length exactly what the full checkpoint computes.
    """
    directory = Path(directory)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (directory / name).is_file():
            raise FileNotFoundError(
                f"{directory / name} is missing; a Hugging Face GPT-2 directory holds "
                f"{CONFIG_FILE} and {WEIGHTS_FILE} (as save_pretrained writes them)"
            )
    cfg = model_config(json.loads((directory / CONFIG_FILE).read_text()), directory / CONFIG_FILE)
    ours = from_hf_state_dict(read_hf_tensors(directory / WEIGHTS_FILE, cfg), cfg)
    if context_length is not None:
        if context_length > cfg.context_length:
            raise ValueError(
                f"{directory} has {cfg.context_length} positions (n_positions); "
                f"evaluating at context {context_length} needs at least that many"
            )
        cfg.context_length = context_length
        ours["pos_emb.weight"] = ours["pos_emb.weight"][:context_length]
    model = GPTModel(cfg)
    model.load_state_dict(ours)
    return model.eval()


def save_gpt2(model: GPTModel, directory: Path, metadata: dict[str, str] | None = None) -> Path:
    """Write `model` as a Hugging Face GPT-2 directory (config.json, model.safetensors, tokenizer) and return it.

    `metadata` (strings) goes into the safetensors header beside the `format: pt` that transformers expects.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {
        (name if name == HEAD else BODY_PREFIX + name): tensor.detach().to("cpu", torch.float32).contiguous()
        for name, tensor in to_hf_state_dict(model).items()
    }
    save_file(tensors, str(directory / WEIGHTS_FILE), metadata={**(metadata or {}), "format": "pt"})
    (directory / CONFIG_FILE).write_text(json.dumps(hf_config(model.cfg), indent=2) + "\n")
    save_hf_tokenizer(directory, model.cfg.context_length)  # so that lm-eval and AutoTokenizer load it offline
    return directory
