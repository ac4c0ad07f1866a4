"""The training text of scripts/train.py: the built-in demo text, loading and checking datasets (Hub, local files
or the demo), the tokenizer (the demo's byte-level BPE, or the model's) and tokenizing, packing or truncating
the text into training sequences. Problems stop the script with a one-line error (`fail`)."""

from __future__ import annotations

import math
import os
from pathlib import Path

import transformers
from transformers import AutoTokenizer

try:
    import datasets
except ImportError:  # the `train` extra; the tokenizer and checkpoint helpers work without it
    datasets = None

# Built-in text for the offline default: a few paragraphs about state space models, repeated.
DEMO_TEXT = [
    "A state space model maps an input sequence to an output sequence through a hidden state.",
    "Mamba makes the state space parameters depend on the input, so the model can select what to remember.",
    "The selective scan runs in time linear in the sequence length and needs no attention cache.",
    "During generation each new token is one recurrent step with a state of fixed size.",
    "The discretisation uses a zero order hold: the state decays by exp(delta A) at every step.",
    "A short causal convolution before the scan mixes neighbouring tokens.",
    "Gating with the SiLU of a second projection controls what leaves the block.",
    "Residual blocks with RMS normalisation stack the mixers into a deep network.",
]


def fail(message: str):
    """Stop with a one-line error (exit status 1): for problems found in the data, files or checkpoints."""
    raise SystemExit(f"error: {message}")


def _data_source(args, split: str) -> str:
    """How the user named a split's data, for error messages."""
    if args.dataset:
        return f"--dataset {args.dataset}"
    if args.train_file:
        files = args.validation_file if split == "validation" and args.validation_file else args.train_file
        flag = "--validation-file" if files is args.validation_file else "--train-file"
        return f"{flag} {' '.join(files)}"
    return "the built-in demo text"


def check_text_column(dataset: datasets.Dataset, column: str, source: str) -> None:
    """Every row holds a string in `column` (datasets fills a field a JSON row lacks with None)."""
    if len(dataset) == 0:
        fail(f"{source} has no rows")
    if column not in dataset.column_names:
        fail(f"--text-column {column!r} is not a field of {source}; its fields: {', '.join(dataset.column_names)}")
    feature = dataset.features[column]
    if not (isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")):
        for row, value in enumerate(dataset[column]):
            if not isinstance(value, str):
                fail(f"row {row} of {source} (counting from 0): {column!r} holds {value!r:.40}, not text")
    values = dataset.with_format("arrow")[column]  # the arrow column: no copy into Python objects
    if values.null_count:
        row = values.is_null().to_pylist().index(True)
        fail(f"row {row} of {source} (counting from 0) has no {column!r} field (or it is null)")


def load_raw_datasets(args) -> datasets.DatasetDict:
    """{"train", "validation"} text datasets from the Hub, local files, or the built-in demo text."""
    if datasets is None:
        fail("scripts/train.py needs the datasets package to load its text: pip install 'hf_mamba[train]'")
    if args.dataset:
        if os.path.isdir(args.dataset) and (Path(args.dataset) / "dataset_dict.json").exists():
            raw = datasets.load_from_disk(args.dataset)
        else:
            raw = datasets.load_dataset(args.dataset, args.dataset_config)
    elif args.train_file:
        files = {"train": args.train_file}
        if args.validation_file:
            files["validation"] = args.validation_file
        extension = Path(args.train_file[0]).suffix.lstrip(".")
        builder = {"txt": "text", "jsonl": "json", "json": "json", "parquet": "parquet", "csv": "csv"}.get(extension)
        if builder is None:
            fail(f"--train-file must be .txt, .json, .jsonl, .parquet or .csv, got {args.train_file[0]}")
        raw = datasets.load_dataset(builder, data_files=files)
    else:
        train = [line for _ in range(40) for line in DEMO_TEXT]
        raw = datasets.DatasetDict(
            train=datasets.Dataset.from_dict({args.text_column: train}),
            validation=datasets.Dataset.from_dict({args.text_column: DEMO_TEXT * 4}),
        )
    if "train" not in raw:
        fail(f"{_data_source(args, 'train')} has no 'train' split; its splits: {', '.join(raw)}")
    for split in ("train", "validation"):
        if split in raw:  # checked before the split below, so row numbers are those of the files
            check_text_column(raw[split], args.text_column, _data_source(args, split))
    if "validation" not in raw:
        rows, percentage = len(raw["train"]), args.validation_split_percentage
        if rows - math.ceil(rows * percentage / 100) < 1:
            fail(
                f"{_data_source(args, 'train')} has {rows} row(s): too few to hold out "
                f"--validation-split-percentage {percentage:g} for evaluation; add rows or give --validation-file"
            )
        split = raw["train"].train_test_split(test_size=percentage / 100, seed=args.seed)
        raw = datasets.DatasetDict(train=split["train"], validation=split["test"])
    return raw


def sample_texts(dataset: datasets.Dataset, column: str, count: int = 256) -> list[str]:
    """The first `count` texts that are not blank (wikitext, for one, has many empty rows)."""
    texts = []
    for batch in dataset.select_columns([column]).iter(batch_size=1024):
        texts += [text for text in batch[column] if text.strip()]
        if len(texts) >= count:
            break
    return texts[:count]


def check_tokenizer(tokenizer, raw: datasets.DatasetDict, args) -> None:
    """Refuse a tokenizer that turns the training text into nothing but special tokens.

    A model folder without tokenizer files gets Transformers' fallback tokenizer for the model type, which
    has no vocabulary and encodes every text as []; training then "succeeds" on end-of-text tokens alone.
    """
    source = f"--tokenizer {args.tokenizer}" if args.tokenizer else f"--model {args.model}'s tokenizer"
    texts = sample_texts(raw["train"], args.text_column)
    if not texts:
        fail(f"{_data_source(args, 'train')} holds no text (every {args.text_column!r} is blank)")
    special = set(tokenizer.all_special_ids)
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    if not any(token not in special for row in ids for token in row):
        fail(
            f"{source} ({len(tokenizer)} tokens, {type(tokenizer).__name__}) encodes the training text as no tokens "
            "but special ones; the model folder probably lacks tokenizer files: name a tokenizer with --tokenizer "
            "(for state-spaces models: --tokenizer EleutherAI/gpt-neox-20b)"
        )


def tokenize(raw: datasets.DatasetDict, tokenizer, args, training_args) -> datasets.DatasetDict:
    """Token ids, packed into block_size chunks (each text followed by EOS) or truncated one per text."""
    column = args.text_column
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []

    def encode(batch):
        ids = tokenizer(batch[column], add_special_tokens=False)["input_ids"]
        return {"input_ids": [row + eos for row in ids]}

    def pack(batch):
        # Concatenate the batch and cut it into block_size pieces; the remainder of each map batch is dropped.
        stream = [token for row in batch["input_ids"] for token in row]
        usable = len(stream) // args.block_size * args.block_size
        blocks = [stream[i : i + args.block_size] for i in range(0, usable, args.block_size)]
        return {"input_ids": blocks, "labels": [list(block) for block in blocks]}

    def truncate(batch):
        return {"input_ids": [row[: args.block_size] for row in batch["input_ids"]]}

    with training_args.main_process_first(desc="tokenizing"):
        tokenized = raw.map(encode, batched=True, remove_columns=raw["train"].column_names, desc="tokenizing")
        if args.no_packing:
            tokenized = tokenized.map(truncate, batched=True, desc="truncating")
        else:
            encoded = tokenized
            tokenized = encoded.map(pack, batched=True, batch_size=1000, desc=f"packing to {args.block_size}")
    for split, limit in (("train", args.max_train_samples), ("validation", args.max_eval_samples)):
        if limit is not None:
            tokenized[split] = tokenized[split].select(range(min(limit, len(tokenized[split]))))
    for split in ("train", "validation"):
        if len(tokenized[split]) == 0:  # only packing drops data: a text gives at least its EOS otherwise
            tokens = sum(len(row) for row in encoded[split]["input_ids"])
            fail(
                f"{_data_source(args, split)} makes no {split} sequence of --block-size {args.block_size} tokens "
                f"({tokens} tokens in all): lower --block-size or add data"
            )
    return tokenized


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer


def train_demo_tokenizer(texts, vocab_size: int):
    """A byte-level BPE trained on `texts`: enough for the offline demo and the tests."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|endoftext|>", bos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )


def load_tokenizer(args, raw):
    if args.tokenizer or args.model:
        tokenizer = AutoTokenizer.from_pretrained(
            args.tokenizer or args.model, trust_remote_code=args.trust_remote_code
        )
    else:
        tokenizer = train_demo_tokenizer(raw["train"][args.text_column], args.vocab_size)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # GPT-NeoX-style tokenizers of the Mamba checkpoints have none
    return tokenizer
