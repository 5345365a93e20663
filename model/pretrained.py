"""Load checkpoints from a folder as transformers writes it (config.json + safetensors / bin), or by Hugging Face
model name through the Hugging Face cache (model.hub), mapping OPT and GPT-2 onto our GPT; save / load our own base
model ("slm-gpt")."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .config import GPTConfig
from .gguf import read_gguf
from .gpt import GPT
from .hub import resolve_checkpoint

LLAMA_FAMILY = ("llama", "qwen2", "mistral")
SUPPORTED_MODEL_TYPES = ("opt", "gpt2", *LLAMA_FAMILY, "slm-gpt")
# Weight layouts `from_pretrained` reads, in the order it looks for them.
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
_HF_ACTIVATIONS = {
    "relu": "relu",
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "silu": "silu",
    "swish": "silu",
}
# Where our top-level modules sit in transformers' module tree of each family (for adapter files PEFT reads).
_HF_MODULE_PREFIX = {"opt": "model.decoder.", "llama": "model.", "qwen2": "model.", "mistral": "model."}


def from_pretrained(name_or_path: str | Path, dtype: torch.dtype = torch.float32) -> GPT:
    """A GPT from a checkpoint folder of model_type opt, gpt2, llama, qwen2, mistral or slm-gpt, a GGUF file
    (model.gguf: llama / qwen2, dequantized to float32), a named base (`smollm2-135m`) or a Hugging Face model name
    (`facebook/opt-125m`, see model.hub.resolve_checkpoint). The returned model is in eval mode;
    `model.tokenizer_path` is the folder's tokenizer.json, or None when it has none;
    `model.hf_module_prefix` is where our modules sit in transformers' model ("model.decoder." for OPT: our
    `layers.0.fc1` is transformers' `model.decoder.layers.0.fc1`; "model." for the Llama family), "" otherwise."""
    folder = resolve_checkpoint(name_or_path)
    if folder.suffix == ".gguf" and folder.is_file():  # its tokenizer: data.load_tokenizer(the same file)
        hf, tensors = read_gguf(folder, check=lambda config: config_from_hf(config, str(folder)))
        model = from_hf(hf, tensors, source=str(folder))
        model.tokenizer_path = None
        return model.to(dtype)
    hf = _read_json(folder)
    config_from_hf(hf, str(folder / "config.json"))  # a bad config names its file, before any weight is read
    model = from_hf(hf, _read_tensors(folder), source=str(folder))
    tokenizer = folder / "tokenizer.json"
    model.tokenizer_path = str(tokenizer) if tokenizer.is_file() else None
    return model.to(dtype)


def from_hf(hf_config: dict, tensors: dict[str, torch.Tensor], source: str) -> GPT:
    """A float32 GPT in eval mode from a config dict in transformers' config.json format and tensors under
    transformers' names (`model.layers.0.self_attn.q_proj.weight`), e.g. read from a folder or a GGUF file.
    `source` names where they came from in every error. Checks the config and every tensor's name and shape
    before loading; sets `hf_module_prefix`, not `tokenizer_path`. The model takes float32 tensors over as its
    parameters (no copy), so pass tensors nothing else will change."""
    model_type, config = config_from_hf(hf_config, source)
    if model_type == "opt":
        mapped = _opt_tensors(tensors)
    elif model_type == "gpt2":
        mapped = _gpt2_tensors(tensors, config)
    elif model_type in LLAMA_FAMILY:
        mapped = _llama_tensors(tensors)
    else:
        mapped = dict(tensors)
    with torch.device("meta"):  # no random init of weights that are about to be replaced
        model = GPT(config)
    model.register_tables()
    _load_checked(model, mapped, source=source)
    model.hf_module_prefix = _HF_MODULE_PREFIX.get(model_type, "")  # GPT-2's leaf names differ anyway
    return model.eval()


def read_config(folder: str | Path) -> tuple[str, GPTConfig]:
    """(model_type, our GPTConfig) from a checkpoint folder's config.json, mapped as `from_pretrained` maps it,
    without reading weights. Errors name the file: missing, unreadable, unsupported model_type, missing keys."""
    return config_from_hf(_read_json(Path(folder)), str(Path(folder) / "config.json"))


def config_from_hf(hf: dict, source: str) -> tuple[str, GPTConfig]:
    """(model_type, our GPTConfig) from a config dict in transformers' config.json format. Errors name `source`:
    an unsupported model_type (listing the supported), a missing key, a value our GPT refuses."""
    model_type = hf.get("model_type") if isinstance(hf, dict) else None
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"{source}: model_type {model_type!r} is not supported; supported types: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    try:
        if model_type == "opt":
            return model_type, _opt_config(hf)
        if model_type == "gpt2":
            return model_type, _gpt2_config(hf)
        if model_type in LLAMA_FAMILY:
            return model_type, _llama_config(hf, model_type)
        return model_type, GPTConfig.from_dict({k: v for k, v in hf.items() if k != "model_type"})
    except KeyError as e:
        raise ValueError(f"{source} lacks the key {e} that a {model_type} config has") from None
    except (TypeError, ValueError) as e:  # GPTConfig's own checks, or a value of the wrong type
        raise ValueError(f"{source}: {e}") from None


def has_weights(folder: str | Path) -> bool:
    """Whether the folder holds weights in one of the layouts `from_pretrained` reads (WEIGHT_FILES)."""
    return any((Path(folder) / name).is_file() for name in WEIGHT_FILES)


def save_pretrained(model: GPT, path: str | Path) -> None:
    """Write config.json (our GPTConfig, model_type "slm-gpt") + model.safetensors with the base model's tensors
    (LoRA tensors, if injected, are not written: save them with lora.save_adapter). A tied head is stored once
    (safetensors refuses shared tensors) and re-tied on load. Copies the model's tokenizer.json along if set."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        base_keys = list(GPT(model.config).state_dict())
    state = model.state_dict()
    missing = [k for k in base_keys if k not in state]
    if missing:
        raise ValueError(f"model has no tensors {missing}; is it a GPT built from its own config?")
    skip = {"lm_head.weight"} if model.config.tie_embeddings else set()
    save_file(
        {k: state[k].detach().contiguous().cpu() for k in base_keys if k not in skip}, str(folder / "model.safetensors")
    )
    (folder / "config.json").write_text(
        json.dumps({"model_type": "slm-gpt", **model.config.to_dict()}, indent=2) + "\n"
    )
    if model.tokenizer_path and Path(model.tokenizer_path).resolve() != (folder / "tokenizer.json").resolve():
        shutil.copyfile(model.tokenizer_path, folder / "tokenizer.json")


# ---------------------------------------------------------------------- reading files


def _read_json(folder: Path) -> dict | object:
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{folder} has no config.json; expected a folder written by save_pretrained")
    try:
        hf = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{config_file} cannot be read as JSON: {e}") from None
    return hf  # not a dict: config_from_hf names the file and the supported model types


def _read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of the folder: model.safetensors, sharded safetensors (index), or pytorch_model.bin (+ index),
    the latter only through torch.load(weights_only=True), which refuses arbitrary pickled code."""
    for index_name, single, load in (
        ("model.safetensors.index.json", "model.safetensors", lambda f: load_file(str(f))),
        (
            "pytorch_model.bin.index.json",
            "pytorch_model.bin",
            lambda f: torch.load(f, map_location="cpu", weights_only=True),
        ),
    ):
        if (folder / single).is_file():
            return load(folder / single)
        if (folder / index_name).is_file():
            shards = sorted(set(json.loads((folder / index_name).read_text())["weight_map"].values()))
            tensors: dict[str, torch.Tensor] = {}
            for shard in shards:
                tensors.update(load(folder / shard))
            return tensors
    raise FileNotFoundError(
        f"{folder} has no weights: looked for {', '.join(WEIGHT_FILES)}; "
        f"found {sorted(p.name for p in folder.iterdir())}"
    )


def _load_checked(model: GPT, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Load with errors that name the tensor: missing, unexpected, or shape mismatch (both shapes). A tied head
    is not needed; a file may still hold its copy (older transformers wrote one), which is ignored."""
    expected = model.state_dict()
    tied = model.config.tie_embeddings
    needed = [k for k in expected if not (tied and k == "lm_head.weight")]
    missing = [k for k in needed if k not in tensors]
    if missing:
        raise ValueError(f"{source}: checkpoint lacks tensors {missing} (names after mapping onto our GPT)")
    unexpected = sorted(k for k in tensors if k not in expected)
    if unexpected:
        raise ValueError(f"{source}: checkpoint has tensors the model has no place for: {unexpected}")
    for k in needed:
        if tuple(tensors[k].shape) != tuple(expected[k].shape):
            raise ValueError(
                f"{source}: tensor {k} has shape {tuple(tensors[k].shape)} in the checkpoint but "
                f"{tuple(expected[k].shape)} in the model built from config.json"
            )
    state = {k: tensors[k].to(torch.float32) for k in needed}
    if tied:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if tied:  # assign made two Parameters of the one tensor: one Parameter again, as GPT.__init__ ties them
        model.lm_head.weight = model.embed_tokens.weight


# ---------------------------------------------------------------------- OPT


def _activation(hf: dict, default: str, key: str = "activation_function") -> str:
    """Our activation for transformers' `key` (the Llama family calls it hidden_act); `default` is what
    transformers' config class assumes when config.json has none (OPT: relu, GPT-2: gelu_new, Llama: silu)."""
    name = hf.get(key, default)
    if name not in _HF_ACTIVATIONS:
        raise ValueError(f"{key} {name!r} is not supported; supported: {sorted(_HF_ACTIVATIONS)}")
    return _HF_ACTIVATIONS[name]


def _opt_config(hf: dict) -> GPTConfig:
    if not hf.get("layer_norm_elementwise_affine", True):
        raise ValueError("OPT with layer_norm_elementwise_affine=false is not supported (our LayerNorms are affine)")
    d, proj = hf["hidden_size"], hf.get("word_embed_proj_dim")  # absent or equal to d: no projections
    pre_norm = hf.get("do_layer_norm_before", True)
    return GPTConfig(
        vocab_size=hf["vocab_size"],
        n_layer=hf["num_hidden_layers"],
        n_head=hf["num_attention_heads"],
        d_model=d,
        d_ff=hf["ffn_dim"],
        max_position_embeddings=hf["max_position_embeddings"],
        position_embedding="learned",
        dropout=hf.get("dropout", 0.1),
        attention_dropout=hf.get("attention_dropout", 0.0),
        bias=hf.get("enable_bias", True),
        activation=_activation(hf, "relu"),
        tie_embeddings=hf.get("tie_word_embeddings", True),
        pre_norm=pre_norm,
        final_norm=pre_norm and not hf.get("_remove_final_layer_norm", False),
        layer_norm_eps=1e-5,
        position_offset=2,
        word_embed_proj_dim=proj if proj != d else None,
    )


def _opt_tensors(raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """OPTForCausalLM / OPTModel keys (with or without `model.`) -> ours. Names inside blocks are the same;
    OPT scales q by head_dim^-0.5 after q_proj and then attends unscaled, which equals SDPA's default scale,
    so q_proj is copied as is (and a LoRA adapter on it means the same thing in both models)."""
    out = {}
    for key, t in raw.items():
        k = key.removeprefix("model.").removeprefix("decoder.")
        k = k.replace(".self_attn_layer_norm.", ".attn_norm.").replace(".final_layer_norm.", ".mlp_norm.")
        if k.startswith("final_layer_norm."):
            k = "final_norm." + k.removeprefix("final_layer_norm.")
        out[k] = t
    return out


# ---------------------------------------------------------------------- GPT-2


def _gpt2_config(hf: dict) -> GPTConfig:
    if hf.get("scale_attn_by_inverse_layer_idx", False) or not hf.get("scale_attn_weights", True):
        raise ValueError("GPT-2 with scale_attn_by_inverse_layer_idx=true or scale_attn_weights=false is not supported")
    d = hf.get("n_embd", hf.get("hidden_size"))
    return GPTConfig(
        vocab_size=hf["vocab_size"],
        n_layer=hf.get("n_layer", hf.get("num_hidden_layers")),
        n_head=hf.get("n_head", hf.get("num_attention_heads")),
        d_model=d,
        d_ff=hf.get("n_inner") or 4 * d,
        max_position_embeddings=hf.get("n_positions", hf.get("max_position_embeddings")),
        position_embedding="learned",
        dropout=hf.get("resid_pdrop", 0.1),
        attention_dropout=hf.get("attn_pdrop", 0.1),
        bias=True,
        activation=_activation(hf, "gelu_new"),
        tie_embeddings=hf.get("tie_word_embeddings", True),
        layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5),
    )


def _gpt2_tensors(raw: dict[str, torch.Tensor], config: GPTConfig) -> dict[str, torch.Tensor]:
    """GPT2LMHeadModel / GPT2Model keys (with or without `transformer.`) -> ours. Conv1D stores (in, out), so
    weights are transposed; the fused c_attn (d, 3d) splits into q, k, v."""
    names = {
        "wte.weight": "embed_tokens.weight",
        "wpe.weight": "embed_positions.weight",
        "ln_f.weight": "final_norm.weight",
        "ln_f.bias": "final_norm.bias",
        "lm_head.weight": "lm_head.weight",
    }
    block = {
        "ln_1": "attn_norm",
        "ln_2": "mlp_norm",
        "attn.c_proj": "self_attn.out_proj",
        "mlp.c_fc": "fc1",
        "mlp.c_proj": "fc2",
    }
    out = {}
    for key, t in raw.items():
        k = key.removeprefix("transformer.")
        if k in names:
            out[names[k]] = t
            continue
        if not k.startswith("h."):
            out[k] = t  # unknown: reported as unexpected by _load_checked
            continue
        _, i, rest = k.split(".", 2)
        module, param = rest.rsplit(".", 1)
        if module == "attn" and param in ("bias", "masked_bias"):
            continue  # old checkpoints' causal-mask buffers, not weights
        conv = module in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj") and param == "weight"
        t = t.t().contiguous() if conv else t  # Conv1D (in, out) -> Linear (out, in)
        if module == "attn.c_attn":
            for name, part in zip(("q_proj", "k_proj", "v_proj"), t.split(config.d_model, dim=0)):
                out[f"layers.{i}.self_attn.{name}.{param}"] = part.contiguous()
        elif module in block:
            out[f"layers.{i}.{block[module]}.{param}"] = t
        else:
            out[k] = t
    return out


# ---------------------------------------------------------------------- Llama, Qwen2, Mistral


def _rope(hf: dict) -> tuple[float, dict | None, float]:
    """(rope_theta, our rope_scaling, rotary fraction) from either transformers >= 5's `rope_parameters` or the
    older `rope_theta` + `rope_scaling` keys. "default" is plain RoPE; other types are refused by GPTConfig."""
    params = hf.get("rope_parameters")
    if params is None:
        params = {**(hf.get("rope_scaling") or {}), "rope_theta": hf.get("rope_theta", 10000.0)}
    if not isinstance(params, dict) or not isinstance(params.get("rope_theta", 10000.0), (int, float)):
        raise ValueError(f"rope_parameters must be one dict with a numeric rope_theta, got {params!r}")
    kind = params.get("rope_type", params.get("type", "default"))
    fraction = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    theta = float(params.get("rope_theta", 10000.0))
    if kind == "default":
        return theta, None, fraction
    scaling = {k: v for k, v in params.items() if k not in ("rope_theta", "type", "partial_rotary_factor")}
    return theta, {**scaling, "rope_type": kind}, fraction


def _llama_config(hf: dict, model_type: str) -> GPTConfig:
    """LlamaConfig / Qwen2Config / MistralConfig keys -> ours; absent optional keys take those classes' defaults.
    Llama: `attention_bias` on q/k/v/o, `mlp_bias`; Qwen2: q/k/v biases, none elsewhere; Mistral: none."""
    d, n_head = hf["hidden_size"], hf["num_attention_heads"]
    if model_type == "qwen2" and (hf.get("use_sliding_window") or "sliding_attention" in (hf.get("layer_types") or [])):
        raise ValueError("Qwen2 with use_sliding_window=true is not supported (its window covers only some layers)")
    theta, scaling, fraction = _rope(hf)
    attention_bias = bool(hf.get("attention_bias", False)) if model_type == "llama" else False
    # an absent key is the config class's default (Qwen2Config 32, MistralConfig 8); null (and LlamaConfig's
    # default) means one key/value head per query head
    n_kv_head = hf.get("num_key_value_heads", {"qwen2": 32, "mistral": 8}.get(model_type)) or n_head
    return GPTConfig(
        vocab_size=hf["vocab_size"],
        n_layer=hf["num_hidden_layers"],
        n_head=n_head,
        d_model=d,
        d_ff=hf["intermediate_size"],
        max_position_embeddings=hf["max_position_embeddings"],
        position_embedding="rope",
        dropout=0.0,
        attention_dropout=hf.get("attention_dropout", 0.0),
        bias=False,
        attn_bias=model_type == "qwen2" or attention_bias,
        o_bias=attention_bias,
        mlp_bias=bool(hf.get("mlp_bias", False)) if model_type == "llama" else False,
        activation=_activation(hf, "silu", key="hidden_act"),
        tie_embeddings=hf.get("tie_word_embeddings", False),
        layer_norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_base=theta,
        rotary_fraction=fraction,
        norm="rmsnorm",
        mlp="gated",
        n_kv_head=n_kv_head,
        head_dim=hf.get("head_dim") or d // n_head,
        rope_scaling=scaling,
        sliding_window=hf.get("sliding_window", 4096) if model_type == "mistral" else None,  # MistralConfig's default
    )


def _llama_tensors(raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """LlamaForCausalLM-style keys (`model.layers.0.input_layernorm.weight`, with or without `model.`) -> ours.
    Names inside attention and MLP are the same; older checkpoints' rotary_emb.inv_freq buffers are derived
    tables, not weights, and are dropped."""
    out = {}
    for key, t in raw.items():
        if key.endswith("rotary_emb.inv_freq"):
            continue
        k = key.removeprefix("model.")
        k = k.replace(".input_layernorm.", ".attn_norm.").replace(".post_attention_layernorm.", ".mlp_norm.")
        if k.startswith("norm."):
            k = "final_norm." + k.removeprefix("norm.")
        out[k] = t
    return out
