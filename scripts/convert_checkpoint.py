"""Convert a Mamba-1 checkpoint folder between the layouts in use.

    python scripts/convert_checkpoint.py SRC_DIR DST_DIR                       # -> hf_mamba (default)
    python scripts/convert_checkpoint.py SRC_DIR DST_DIR --to transformers     # Transformers' built-in "mamba"
    python scripts/convert_checkpoint.py SRC_DIR DST_DIR --to falcon_mamba     # Transformers' "falcon_mamba"
    python scripts/convert_checkpoint.py SRC_DIR DST_DIR --to state-spaces     # original mamba_ssm layout
    python scripts/convert_checkpoint.py SRC_DIR DST_DIR --max-shard-size 2GB --dtype bfloat16

The source layout is detected from SRC_DIR/config.json:
    state-spaces   d_model, n_layer, ssm_cfg, ... ; weights pytorch_model.bin (or model.safetensors),
                   `backbone.embedding.weight`, embedding rows padded to pad_vocab_size_multiple
    transformers   model_type "mamba"; safetensors, `backbone.embeddings.weight`
    falcon_mamba   model_type "falcon_mamba": Falcon Mamba (Mamba plus weight-free RMS norms on Δ, B and C,
                   epsilon mixer_rms_eps); the same weights as transformers
    hf_mamba       model_type "hf_mamba"; same weights as transformers, plus remote code and a model card
                   (a Falcon Mamba when its config has mixer_rms_eps)

hf_mamba and Transformers share every parameter name and config field, so between them only the config's
model_type (and hf_mamba's remote code) changes; state-spaces renames the embedding and its config fields.
A Falcon Mamba converts between falcon_mamba and hf_mamba only: the transformers and state-spaces layouts have
no place for its norms (the converter refuses rather than drop them).
Weights are copied tensor by tensor in their stored dtype unless --dtype is given. The tokenizer files of
SRC_DIR (tokenizer.json, tokenizer_config.json, special_tokens_map.json, vocab/merges files, ...) are copied
beside them, so the converted folder trains and generates as it is (state-spaces folders usually have none:
save one there, e.g. `AutoTokenizer.from_pretrained("EleutherAI/gpt-neox-20b").save_pretrained(DST_DIR)`).
After writing, the converted folder is loaded back and its logits compared with the source's on a random
batch (--no-verify skips it); the script prints a short table and exits non-zero if they differ.
"""

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

from hf_mamba.loading import read_config_json, read_shard_index

LAYOUTS = ("hf_mamba", "transformers", "falcon_mamba", "state-spaces")
FALCON_FIELDS = ("mixer_rms_eps",)  # besides HF_FIELDS, what makes a Falcon Mamba
FALCON_LAYOUTS = ("hf_mamba", "falcon_mamba")  # the layouts that can hold a Falcon Mamba

# Config fields shared by hf_mamba's and Transformers' MambaConfig (everything else is dropped on conversion).
HF_FIELDS = (
    "vocab_size",
    "hidden_size",
    "state_size",
    "num_hidden_layers",
    "expand",
    "conv_kernel",
    "time_step_rank",
    "time_step_min",
    "time_step_max",
    "time_step_init_scheme",
    "time_step_floor",
    "time_step_scale",
    "use_bias",
    "use_conv_bias",
    "hidden_act",
    "layer_norm_epsilon",
    "residual_in_fp32",
    "initializer_range",
    "rescale_prenorm_residual",
    "tie_word_embeddings",
    "use_cache",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
)

# state-spaces ssm_cfg key -> Transformers config field, with mamba_ssm's defaults.
SSM_CFG_FIELDS = {
    "d_state": ("state_size", 16),
    "d_conv": ("conv_kernel", 4),
    "expand": ("expand", 2),
    "dt_rank": ("time_step_rank", "auto"),
    "dt_min": ("time_step_min", 0.001),
    "dt_max": ("time_step_max", 0.1),
    "dt_init": ("time_step_init_scheme", "random"),
    "dt_scale": ("time_step_scale", 1.0),
    "dt_init_floor": ("time_step_floor", 1e-4),
    "conv_bias": ("use_conv_bias", True),
    "bias": ("use_bias", False),
}

KEEP_FP32 = ("A_log", "mixer.D", "dt_proj.bias")

# What AutoTokenizer.from_pretrained reads from a folder, for the tokenizer kinds Mamba checkpoints come with
# (fast tokenizers, GPT-2/BPE vocab + merges, WordPiece, SentencePiece) and the chat template.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "tokenizer.model",
    "spiece.model",
    "chat_template.jinja",
    "chat_template.json",
)
SS_EMBEDDING, HF_EMBEDDING = "backbone.embedding.weight", "backbone.embeddings.weight"


def detect_layout(config: dict) -> str:
    """Name the layout a config.json belongs to."""
    model_type = config.get("model_type")
    if model_type == "hf_mamba":
        return "hf_mamba"
    if model_type == "mamba":
        return "transformers"
    if model_type == "falcon_mamba":
        return "falcon_mamba"
    if "d_model" in config and "n_layer" in config:
        return "state-spaces"
    raise ValueError(
        f"cannot tell the checkpoint layout: model_type={model_type!r} and no state-spaces fields (d_model, n_layer)"
    )


# ---------------------------------------------------------------------------------------------------------------
# Reading and writing weights


def load_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder: (sharded) safetensors first, then (sharded) pytorch_model.bin.

    pytorch_model.bin (the state-spaces format) is read with torch.load(weights_only=True): tensors only,
    never arbitrary pickled objects.
    """
    from safetensors.torch import load_file

    for index_name, single_name, loader in (
        ("model.safetensors.index.json", "model.safetensors", load_file),
        ("pytorch_model.bin.index.json", "pytorch_model.bin", _load_bin),
    ):
        if (folder / index_name).exists():
            state_dict = {}
            for shard in read_shard_index(folder / index_name):  # every shard checked to exist first
                state_dict.update(_read(loader, shard))
            return state_dict
        if (folder / single_name).exists():
            return _read(loader, folder / single_name)
    raise FileNotFoundError(f"no model.safetensors or pytorch_model.bin (or their index) in {folder}")


def _read(loader, path: Path) -> dict[str, torch.Tensor]:
    """loader(path), with the file named when it cannot be read (safetensors' own errors name none)."""
    try:
        return loader(path)
    except Exception as error:  # SafetensorError, pickle and zip errors: all mean an unreadable file
        raise ValueError(f"{path} cannot be read, truncated or corrupt? ({error})") from None


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


def save_safetensors(state_dict: dict[str, torch.Tensor], folder: Path, max_shard_size) -> None:
    """Write safetensors the way save_pretrained does (sharded with an index when over max_shard_size)."""
    from huggingface_hub import save_torch_state_dict

    state_dict = {name: tensor.contiguous() for name, tensor in state_dict.items()}
    save_torch_state_dict(state_dict, folder, max_shard_size=max_shard_size, metadata={"format": "pt"})


# ---------------------------------------------------------------------------------------------------------------
# Layout <-> canonical form (Transformers' config fields and parameter names)


def state_spaces_to_canonical(config: dict, state_dict: dict) -> tuple[dict, dict]:
    """mamba_ssm's MambaConfig + MambaLMHeadModel weights -> Transformers fields and names."""
    ssm_cfg = dict(config.get("ssm_cfg") or {})
    layer = ssm_cfg.pop("layer", "Mamba1")
    if layer != "Mamba1":
        raise ValueError(f"only Mamba-1 checkpoints convert, got ssm_cfg.layer={layer!r}")
    if not config.get("rms_norm", True):
        raise ValueError("rms_norm=False (LayerNorm) checkpoints have no Transformers/hf_mamba equivalent")
    if config.get("attn_layer_idx") or config.get("d_intermediate", 0):
        raise ValueError(
            f"hybrid checkpoints (attn_layer_idx={config.get('attn_layer_idx')}, "
            f"d_intermediate={config.get('d_intermediate')}) are not Mamba-1"
        )
    fields = {
        "hidden_size": config["d_model"],
        "num_hidden_layers": config["n_layer"],
        # The embedding is stored padded to pad_vocab_size_multiple; the converted vocab is the padded one.
        "vocab_size": state_dict[SS_EMBEDDING].shape[0],
        "residual_in_fp32": config.get("residual_in_fp32", True),
        "layer_norm_epsilon": config.get("norm_epsilon", 1e-5),
        "tie_word_embeddings": config.get("tie_embeddings", True),
    }
    for key, (field, default) in SSM_CFG_FIELDS.items():
        fields[field] = ssm_cfg.get(key, default)
    state_dict = {(HF_EMBEDDING if name == SS_EMBEDDING else name): t for name, t in state_dict.items()}
    if fields["tie_word_embeddings"]:
        state_dict.pop("lm_head.weight", None)  # tied: the same tensor as the embedding
    return fields, state_dict


def canonical_to_state_spaces(fields: dict, state_dict: dict) -> tuple[dict, dict]:
    """Transformers fields and names -> mamba_ssm's config.json and MambaLMHeadModel weights."""
    if fields.get("hidden_act", "silu") not in ("silu", "swish"):
        raise ValueError(f"mamba_ssm only runs hidden_act='silu', got {fields['hidden_act']!r}")
    ssm_cfg = {"layer": "Mamba1"}
    for key, (field, _) in SSM_CFG_FIELDS.items():
        if field in fields:
            ssm_cfg[key] = fields[field]
    vocab_size = fields["vocab_size"]
    config = {
        "d_model": fields["hidden_size"],
        "d_intermediate": 0,
        "n_layer": fields["num_hidden_layers"],
        "vocab_size": vocab_size,
        "ssm_cfg": ssm_cfg,
        "attn_layer_idx": [],
        "attn_cfg": {},
        "rms_norm": True,
        "residual_in_fp32": fields.get("residual_in_fp32", True),
        "fused_add_norm": True,
        # mamba_ssm pads the vocab up to this multiple; pick one that leaves the stored rows unchanged.
        "pad_vocab_size_multiple": 8 if vocab_size % 8 == 0 else 1,
        "tie_embeddings": fields.get("tie_word_embeddings", True),
        "norm_epsilon": fields.get("layer_norm_epsilon", 1e-5),
    }
    state_dict = {(SS_EMBEDDING if name == HF_EMBEDDING else name): t for name, t in state_dict.items()}
    if config["tie_embeddings"]:
        state_dict["lm_head.weight"] = state_dict[SS_EMBEDDING]  # mamba_ssm stores both names
    return config, state_dict


def hf_to_canonical(config: dict, state_dict: dict) -> tuple[dict, dict]:
    fields = {name: config[name] for name in HF_FIELDS if name in config}
    if config.get("model_type") == "falcon_mamba":
        fields["mixer_rms_eps"] = config.get("mixer_rms_eps", 1e-6)  # FalconMambaConfig's default
    elif config.get("mixer_rms_eps") is not None:
        fields["mixer_rms_eps"] = config["mixer_rms_eps"]
    if fields.get("tie_word_embeddings", True):
        state_dict = {name: t for name, t in state_dict.items() if name != "lm_head.weight"}
    return fields, state_dict


# ---------------------------------------------------------------------------------------------------------------
# Writing a target folder


def hf_config_class(layout: str):
    if layout == "hf_mamba":
        from hf_mamba import MambaConfig
    elif layout == "falcon_mamba":
        from transformers import FalconMambaConfig as MambaConfig
    else:
        from transformers import MambaConfig
    return MambaConfig


def write_hf_folder(layout: str, fields: dict, state_dict: dict, dst: Path, max_shard_size) -> None:
    """config.json + safetensors (+ remote code and a model card for hf_mamba)."""
    dtypes = {t.dtype for name, t in state_dict.items() if t.is_floating_point() and not name.endswith(KEEP_FP32)}
    config = hf_config_class(layout)(**fields)
    config.architectures = ["FalconMambaForCausalLM" if layout == "falcon_mamba" else "MambaForCausalLM"]
    if len(dtypes) == 1:
        config.dtype = next(iter(dtypes))
    dst.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(dst)
    save_safetensors(state_dict, dst, max_shard_size)
    if layout == "hf_mamba":
        from hf_mamba.hub import write_model_card, write_remote_code

        write_remote_code(dst)
        write_model_card(dst, config)


def write_state_spaces_folder(fields: dict, state_dict: dict, dst: Path) -> None:
    """config.json + pytorch_model.bin, what mamba_ssm's MambaLMHeadModel.from_pretrained reads."""
    config, state_dict = canonical_to_state_spaces(fields, state_dict)
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    torch.save(state_dict, dst / "pytorch_model.bin")


def read_folder(folder: Path) -> tuple[str, dict, dict]:
    """(layout, canonical fields, canonical state dict) of a checkpoint folder."""
    config = read_config_json(folder / "config.json")
    layout = detect_layout(config)
    state_dict = load_state_dict(folder)
    if layout == "state-spaces":
        fields, state_dict = state_spaces_to_canonical(config, state_dict)
    else:
        fields, state_dict = hf_to_canonical(config, state_dict)
    return layout, fields, state_dict


def copy_tokenizer_files(src: Path, dst: Path) -> list[str]:
    """Copy the tokenizer files `src` has into `dst`; returns their names."""
    copied = [name for name in TOKENIZER_FILES if (src / name).is_file()]
    for name in copied:
        shutil.copyfile(src / name, dst / name)
    return copied


def convert(src, dst, to: str = "hf_mamba", dtype: torch.dtype | None = None, max_shard_size="5GB") -> str:
    """Convert the checkpoint folder `src` into `dst` in layout `to`; returns the source layout."""
    if to not in LAYOUTS:
        raise ValueError(f"--to must be one of {LAYOUTS}, got {to!r}")
    src, dst = Path(src), Path(dst)
    layout, fields, state_dict = read_folder(src)
    falcon = fields.get("mixer_rms_eps") is not None
    if falcon and to not in FALCON_LAYOUTS:
        raise ValueError(
            f"{src} is a Falcon Mamba (mixer_rms_eps={fields['mixer_rms_eps']}); the {to} layout has no place for "
            f"its norms: convert to one of {FALCON_LAYOUTS}"
        )
    if to == "falcon_mamba" and not falcon:
        raise ValueError(f"{src} is a plain Mamba (no mixer_rms_eps); it has no Falcon Mamba norms to write")
    if dtype is not None:
        # A, D and the Δ bias set the state's decay rates: they stay fp32 like the model keeps them.
        state_dict = {
            name: t.to(dtype) if t.is_floating_point() and not name.endswith(KEEP_FP32) else t
            for name, t in state_dict.items()
        }
    if to == "state-spaces":
        write_state_spaces_folder(fields, state_dict, dst)
    else:
        write_hf_folder(to, fields, state_dict, dst, max_shard_size)
    copy_tokenizer_files(src, dst)
    return layout


# ---------------------------------------------------------------------------------------------------------------
# Verification: load both folders as models and compare logits


def load_model(folder) -> torch.nn.Module:
    """A causal-LM model for a folder of any layout (state-spaces runs through Transformers' Mamba)."""
    folder = Path(folder)
    layout, fields, state_dict = read_folder(folder)
    if layout == "hf_mamba":
        from hf_mamba import MambaForCausalLM
    elif layout == "falcon_mamba":
        from transformers import FalconMambaForCausalLM as MambaForCausalLM
    else:
        from transformers import MambaForCausalLM
    config = hf_config_class(layout if layout in FALCON_LAYOUTS else "transformers")(**fields)
    model = MambaForCausalLM(config)
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    missing = [name for name in missing if not (name == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise ValueError(f"{folder}: missing keys {missing}, unexpected keys {unexpected}")
    return model.float().eval()


@torch.no_grad()
def max_logit_difference(src, dst, batch: int = 2, seqlen: int = 16, seed: int = 0) -> float:
    """Largest absolute difference between the two folders' fp32 logits on one random batch."""
    src_model, dst_model = load_model(src), load_model(dst)
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(src_model.config.vocab_size, (batch, seqlen), generator=generator)
    src_logits = src_model(input_ids).logits
    dst_logits = dst_model(input_ids).logits
    if src_logits.shape != dst_logits.shape:
        raise ValueError(f"logits shapes differ: {tuple(src_logits.shape)} vs {tuple(dst_logits.shape)}")
    return (src_logits - dst_logits).abs().max().item()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "src", type=Path, help="checkpoint folder (state-spaces, transformers, falcon_mamba or hf_mamba)"
    )
    parser.add_argument("dst", type=Path, help="output folder")
    parser.add_argument("--to", choices=LAYOUTS, default="hf_mamba", help="target layout (default: hf_mamba)")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), help="cast floating weights")
    parser.add_argument("--max-shard-size", default="5GB", help="safetensors shard size (hf targets)")
    parser.add_argument("--no-verify", action="store_true", help="skip the logits comparison")
    parser.add_argument("--atol", type=float, default=1e-5, help="largest logit difference accepted in fp32")
    args = parser.parse_args(argv)
    if not args.src.is_dir():
        parser.error(f"src {args.src}: no such folder")

    dtype = getattr(torch, args.dtype) if args.dtype else None
    try:
        layout = convert(args.src, args.dst, to=args.to, dtype=dtype, max_shard_size=args.max_shard_size)
    except (OSError, ValueError) as error:  # a bad source folder: one line, not a traceback
        parser.exit(1, f"error: {error}\n")
    tokenizer_files = [name for name in TOKENIZER_FILES if (args.dst / name).is_file()]
    rows = [
        ("source", f"{args.src} ({layout})"),
        ("target", f"{args.dst} ({args.to})"),
        ("tokenizer", ", ".join(tokenizer_files) if tokenizer_files else f"none in {args.src}: save one beside it"),
    ]
    ok = True
    if not args.no_verify:
        difference = max_logit_difference(args.src, args.dst)
        # A dtype cast changes the logits by design; only an unchanged dtype must match to atol.
        ok = dtype is not None or difference <= args.atol
        rows.append(("max |logits diff|", f"{difference:.3e} ({'ok' if ok else f'> atol {args.atol:g}'})"))
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
