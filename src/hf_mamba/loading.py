"""Checks a local model folder passes before `from_pretrained` does any work, and the tokenizer-fits check.

`MambaForCausalLM.from_pretrained(path)` (and MambaModel, MambaForSequenceClassification, the Auto classes for
hf_mamba folders) calls `check_before_loading` first. When `path` is local (it exists, starts with "/", "./",
"../" or "~", or cannot be a Hub repo id such as "runs/demo/checkpoint-10"), it checks, reading only file
headers and small JSON files:
  - the folder exists: "No such model folder: <path>" (Transformers would read a missing local path as a
    malformed Hub repo id);
  - config.json exists, is JSON, and builds the model's config: an impossible value is a ValueError naming
    config.json and the field (chained to the config class's own error);
  - the weights the load would read: each safetensors file whole (8-byte length, JSON header, tensor table,
    file size exactly header + data) and a shard index naming only shards that exist and tensors they hold;
  - pickle weights (pytorch_model.bin) are refused unless the call passes `use_safetensors=False`:
    unpickling can run code. With it Transformers reads them, with `torch.load(weights_only=True)` (tensors
    only) unless the call also passes `weights_only=False`.
A Hub id ("owner/name", "name") that is not a folder on disk goes to Transformers unchanged.

Failures are `ModelFolderError` (an OSError, like Transformers' own loading errors; `MissingModelFileError`
is also a FileNotFoundError) whose message names the file, or a ValueError for config values.

`check_tokenizer_fits(tokenizer, model)` refuses a tokenizer whose ids run past the model's embedding rows
(those ids index out of range, or into rows no token was trained on), before any data is tokenized.
"""

import json
import math
import os
from pathlib import Path

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
PICKLE_WEIGHTS_NAME = "pytorch_model.bin"
PICKLE_WEIGHTS_INDEX_NAME = "pytorch_model.bin.index.json"
ADAPTER_CONFIG_NAME = "adapter_config.json"
# safetensors refuses a header over 100 MB; a length field past it is a corrupt one, not a short file.
SAFETENSORS_MAX_HEADER = 100_000_000
# Bytes per element of the safetensors dtypes a whole number of bytes wide (F4 and the like are skipped).
SAFETENSORS_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "C64": 8,
    "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip
REPAIR = "the file is truncated or corrupted: save or download it again"


class ModelFolderError(OSError):
    """A local model folder that cannot load as it is; the message names the file at fault."""


class MissingModelFileError(ModelFolderError, FileNotFoundError):
    """A file the load needs (the folder itself, config.json, a shard) does not exist."""


# ---------------------------------------------------------------------------------------------------------------
# Local path or Hub id


def is_local_path(name) -> bool:
    """Whether `from_pretrained(name)` means a folder on disk rather than a Hub repo id.

    True for a path-like object, anything that exists, a name starting with "/", "./", "../" or "~" (or
    containing the OS's own separator where that is not "/"), and a string that cannot be a repo id (more
    than one "/", characters a repo id cannot hold). "owner/name" that does not exist on disk is a Hub id.
    """
    if isinstance(name, os.PathLike):
        return True
    name = str(name)
    if os.path.exists(os.path.expanduser(name)):
        return True
    if name.startswith(("/", "./", "../", "~")) or name in (".", "..") or (os.sep != "/" and os.sep in name):
        return True
    return _repo_id_problem(name) is not None


def _repo_id_problem(name: str) -> str | None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError as error:
        return str(error)
    return None


# ---------------------------------------------------------------------------------------------------------------
# Files


def _variant(name: str, variant: str | None) -> str:
    """Transformers' variant naming: model.safetensors -> model.fp16.safetensors."""
    if not variant:
        return name
    stem, extension = name.rsplit(".", 1)
    return f"{stem}.{variant}.{extension}"


def _safetensors_header(path: Path) -> tuple[dict | None, str | None]:
    """(header, None) for a whole file, (None, why not) otherwise; reads the header only."""
    size = path.stat().st_size
    if size < 8:
        return None, f"is cut short ({size} bytes, less than the 8-byte header length)"
    with open(path, "rb") as f:
        header_size = int.from_bytes(f.read(8), "little")
        if header_size > SAFETENSORS_MAX_HEADER:
            return None, f"has a corrupt header (its length field says {header_size} bytes)"
        if 8 + header_size > size:
            return None, f"is cut short ({size} bytes, its header alone takes {8 + header_size})"
        raw = f.read(header_size)
    try:
        header = json.loads(raw)
    except ValueError as error:  # UnicodeDecodeError is a ValueError too
        return None, f"has a corrupt header (not JSON: {error})"
    if not isinstance(header, dict):
        return None, "has a corrupt header (not a JSON object)"
    spans = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = entry["data_offsets"]
            shape, dtype = list(entry["shape"]), entry["dtype"]
            valid = all(isinstance(n, int) and n >= 0 for n in (begin, end, *shape)) and begin <= end
        except (TypeError, KeyError, ValueError):
            valid = False
        if not valid:
            return None, f"has a corrupt header (tensor {name!r}: {entry!r})"
        if dtype in SAFETENSORS_DTYPE_BYTES and end - begin != math.prod(shape) * SAFETENSORS_DTYPE_BYTES[dtype]:
            return None, f"has a corrupt header (tensor {name!r}: {end - begin} bytes for {dtype} {shape})"
        spans.append((begin, end))
    data_size = 0
    for begin, end in sorted(spans):
        if begin != data_size:  # safetensors packs tensors back to back from offset 0
            return None, "has a corrupt header (tensor data overlaps or leaves gaps)"
        data_size = end
    expected = 8 + header_size + data_size
    if size < expected:
        return None, f"is cut short ({size} of {expected} bytes)"
    if size > expected:
        return None, f"is corrupt ({size - expected} bytes past its last tensor)"
    return header, None


def safetensors_problem(path) -> str | None:
    """Why a .safetensors file cannot load ("is cut short (100 of 2104 bytes)", "has a corrupt header (...)"),
    from its header alone; None when it is whole. The phrase follows the file's name: f"{path.name} {problem}"."""
    return _safetensors_header(Path(path))[1]


def read_safetensors_header(path) -> dict:
    """The JSON header of a whole .safetensors file ({tensor name: {dtype, shape, data_offsets}, ...});
    ModelFolderError naming the file when it is cut short or corrupt. Reads no tensor data."""
    path = Path(path)
    if not path.is_file():
        raise MissingModelFileError(f"{path} does not exist")
    header, problem = _safetensors_header(path)
    if problem is not None:
        raise ModelFolderError(f"{path} {problem}; {REPAIR}")
    return header


def read_shard_index(index_path) -> dict[Path, list[str]]:
    """{shard path: tensor names} of a sharded checkpoint's index (model.safetensors.index.json or
    pytorch_model.bin.index.json); ModelFolderError naming the index when it is not one, and
    MissingModelFileError naming the index and the shards when any shard file is missing."""
    index_path = Path(index_path)
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise TypeError("weight_map is not a {tensor: file} mapping")
    except FileNotFoundError:
        raise MissingModelFileError(f"{index_path} does not exist") from None
    except (ValueError, KeyError, TypeError) as error:
        raise ModelFolderError(f"{index_path} is not a shard index ({type(error).__name__}: {error})") from None
    shards: dict[Path, list[str]] = {}
    for tensor, shard in weight_map.items():
        shards.setdefault(index_path.parent / shard, []).append(tensor)
    missing = [path.name for path in shards if not path.is_file()]
    if missing:
        raise MissingModelFileError(f"{index_path} lists shards that are missing: {', '.join(missing)}")
    return shards


def read_config_json(path) -> dict:
    """The parsed config.json; MissingModelFileError / ModelFolderError naming the file."""
    path = Path(path)
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise MissingModelFileError(f"{path} does not exist") from None
    except ValueError as error:
        raise ModelFolderError(f"{path} is not valid JSON ({error})") from None
    if not isinstance(config, dict):
        raise ModelFolderError(f"{path} is not valid JSON (a {type(config).__name__}, not an object)")
    return config


def check_config_values(config_path, config_class) -> None:
    """Build `config_class` from the folder of `config_path`: an impossible value raises a ValueError naming
    config.json and the field (chained to the config class's error)."""
    config_path = Path(config_path)
    try:
        config_class.from_pretrained(str(config_path.parent))
    except (ValueError, TypeError) as error:
        raise ValueError(f"{config_path}: {error}") from error


def _weight_files(folder: Path, use_safetensors: bool | None, variant: str | None, explicit: str | None):
    """The weight files Transformers' loader would read from `folder` (its choice, same order), each
    with the tensors an index assigns it (None without an index); refuses pickle-only folders."""
    if explicit:  # config.json's `transformers_weights`
        path = folder / explicit
        return read_shard_index(path) if explicit.endswith(".index.json") else {path: None}
    safe, safe_index, pickle, pickle_index = (
        folder / _variant(name, variant)
        for name in (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, PICKLE_WEIGHTS_NAME, PICKLE_WEIGHTS_INDEX_NAME)
    )
    if use_safetensors is not False:
        if safe.is_file():
            return {safe: None}
        if safe_index.is_file():
            return read_shard_index(safe_index)
        found = [path.name for path in (pickle, pickle_index) if path.is_file()]
        if found:
            raise ModelFolderError(
                f"{folder} holds pickle weights only ({', '.join(found)}), which are not loaded unless asked for "
                "(unpickling can run code): pass use_safetensors=False to load them (Transformers reads them with "
                "torch.load(weights_only=True)); save_pretrained then writes them as safetensors"
            )
        return {}  # no weights: Transformers' own error names what it looked for
    if pickle.is_file():
        return {pickle: None}
    if pickle_index.is_file():
        return read_shard_index(pickle_index)
    return {}


def check_weights(files: dict) -> None:
    """Every safetensors file in `files` ({path: tensor names an index assigns it, or None}) is whole and holds
    those tensors; pickle files are only checked to exist."""
    for path, tensors in files.items():
        if not path.is_file():
            raise MissingModelFileError(f"{path} does not exist")
        if path.suffix != ".safetensors":
            continue
        header = read_safetensors_header(path)
        absent = [name for name in tensors or () if name not in header]
        if absent:
            raise ModelFolderError(
                f"{path} lacks {len(absent)} tensor(s) its index assigns it (e.g. {absent[0]}); {REPAIR}"
            )


def check_model_folder(folder, *, config_class=None, config=None, use_safetensors=None, variant=None) -> None:
    """Check a local model folder before loading it; raises naming the file at fault.

    config_class: the model's config class; config.json's values are checked by building it. config: what
    the caller passes to from_pretrained as `config` (a config object or another path: config.json of this
    folder is then not needed). use_safetensors, variant: as from_pretrained's.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise MissingModelFileError(f"No such model folder: {folder}")
    config_path = folder / "config.json"
    if (folder / ADAPTER_CONFIG_NAME).is_file() and not config_path.is_file():
        # A PEFT adapter: Transformers loads the base model it names, then the adapter.
        check_weights({path: None for path in folder.glob("adapter_model*.safetensors")})
        return
    explicit = getattr(config, "transformers_weights", None)
    if config is None:
        explicit = read_config_json(config_path).get("transformers_weights")
        if config_class is not None:
            check_config_values(config_path, config_class)
    check_weights(_weight_files(folder, use_safetensors, variant, explicit))


def check_before_loading(pretrained_model_name_or_path, *, config_class=None, **from_pretrained_kwargs):
    """What `from_pretrained` runs first: a local path (see `is_local_path`) is checked with
    `check_model_folder`; a Hub id passes unchecked. Returns the name to hand to Transformers ("~" expanded,
    which Transformers would otherwise read as part of a repo id)."""
    name = pretrained_model_name_or_path
    if name is None or not is_local_path(name):
        return name
    expanded = os.path.expanduser(os.fspath(name))
    path = Path(expanded)
    subfolder = from_pretrained_kwargs.get("subfolder") or ""
    use_safetensors = from_pretrained_kwargs.get("use_safetensors")
    if path.is_file():  # a weights file named directly: Transformers loads it with the config it is given
        if path.suffix == ".safetensors":
            read_safetensors_header(path)
        elif use_safetensors is not False:
            raise ModelFolderError(
                f"{path} is not a safetensors file; pickle weights are not loaded unless asked for, since "
                "unpickling can run code: pass use_safetensors=False to load it"
            )
        return expanded
    if not path.exists():
        message = f"No such model folder: {name}"
        if not isinstance(name, os.PathLike) and not str(name).startswith(("/", ".", "~")):
            message += " (nor a Hub repo id, which is 'name' or 'owner/name' of letters, digits, '-', '_', '.')"
        raise MissingModelFileError(message)
    if from_pretrained_kwargs.get("gguf_file"):
        return expanded  # config and weights come from the GGUF file
    check_model_folder(
        path / subfolder,
        config_class=config_class,
        config=from_pretrained_kwargs.get("config"),
        use_safetensors=use_safetensors,
        variant=from_pretrained_kwargs.get("variant"),
    )
    return expanded


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer


def check_tokenizer_fits(tokenizer, model, *, tokenizer_name="the tokenizer", model_name="the model") -> None:
    """Refuse a tokenizer with more tokens than the model has embedding rows.

    model: a model (its input embedding's rows count) or a config (its vocab_size), so the check can run
    before the weights load. tokenizer_name / model_name: how the message names them (e.g. the flag that chose
    them). Fewer tokens than rows is fine (checkpoints pad their vocabulary to a multiple of 8 or more).
    """
    if hasattr(model, "get_input_embeddings"):
        rows = model.get_input_embeddings().num_embeddings
    else:
        rows = model.vocab_size
    tokens = len(tokenizer)
    if tokens > rows:
        raise ValueError(
            f"{tokenizer_name} has {tokens} tokens but {model_name} embeds only {rows} (vocab_size): ids {rows} "
            f"to {tokens - 1} have no embedding; use the model's own tokenizer, or resize the model "
            "(model.resize_token_embeddings(len(tokenizer))) and save it first"
        )


__all__ = [
    "MissingModelFileError",
    "ModelFolderError",
    "check_before_loading",
    "check_config_values",
    "check_model_folder",
    "check_tokenizer_fits",
    "check_weights",
    "is_local_path",
    "read_config_json",
    "read_safetensors_header",
    "read_shard_index",
    "safetensors_problem",
]
