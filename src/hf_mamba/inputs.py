"""Input checks of the models' forwards: shapes and dtypes (no device work), and the one host read of the
inputs' values per forward (ids within the vocabulary, padding, packed documents); a graph-replayed decode
step reads its ids' range without waiting before the replay (`queue_id_range`, `check_id_range`)."""

import torch
import torch.nn.functional as F


def check_prompt_length(seqlen):
    if seqlen == 0:
        raise ValueError("The input sequence is empty (seqlen 0); pass at least one token")


# generate() arguments that turn on assisted decoding, which drafts tokens and then rolls the cache back past
# the rejected ones. Transformers refuses it for a cache it cannot crop, but only after the prompt's forward and,
# for a model that makes its cache in its forward, with "Assisted decoding requires a cache".
ASSISTED_DECODING_ARGS = ("assistant_model", "prompt_lookup_num_tokens", "assistant_early_exit")


def check_not_assisted(generate_kwargs, generation_config):
    """ValueError naming the argument where generate() was asked for assisted decoding (in its keyword
    arguments or in the generation config it will use)."""
    for name in ASSISTED_DECODING_ARGS:
        value = generate_kwargs.get(name)
        if value is None:
            value = getattr(generate_kwargs.get("generation_config") or generation_config, name, None)
        if value is not None:
            raise ValueError(
                f"{name}: assisted decoding rolls the cache back past rejected draft tokens, and an hf_mamba cache "
                f"is a recurrent state that cannot go back; generate without {name}"
            )


def check_inputs(input_ids, inputs_embeds, attention_mask, hidden_size=None) -> tuple[int, int]:
    """(batch, seqlen) of the inputs; ValueError naming the argument for anything the forward cannot use
    (shapes and dtypes: the values of input_ids are checked by `read_values`); inputs_embeds' width is
    checked against hidden_size where given."""
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("Pass exactly one of input_ids or inputs_embeds, not both and not neither")
    if input_ids is not None:
        if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
            raise ValueError(f"input_ids must be an integer tensor, got dtype {input_ids.dtype}")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape (batch, seqlen), got {tuple(input_ids.shape)}")
        shape = tuple(input_ids.shape)
    else:
        if inputs_embeds.dim() != 3:
            raise ValueError(
                f"inputs_embeds must have shape (batch, seqlen, hidden_size), got {tuple(inputs_embeds.shape)}"
            )
        if hidden_size is not None and inputs_embeds.shape[-1] != hidden_size:
            raise ValueError(
                f"inputs_embeds must have shape (batch, seqlen, hidden_size={hidden_size}), "
                f"got {tuple(inputs_embeds.shape)}"
            )
        shape = tuple(inputs_embeds.shape[:2])
    check_prompt_length(shape[1])
    if attention_mask is not None and tuple(attention_mask.shape) != shape:
        raise ValueError(
            f"attention_mask must have shape (batch, seqlen) = {shape}, got {tuple(attention_mask.shape)}"
        )
    return shape


def check_labels(labels, shape) -> None:
    """ValueError naming labels where they cannot be the targets of logits of (batch, seqlen) = shape."""
    if not torch.is_tensor(labels) or labels.dtype.is_floating_point or labels.dtype.is_complex:
        kind = labels.dtype if torch.is_tensor(labels) else type(labels).__name__
        raise ValueError(f"labels must be an integer tensor of token ids (-100 to ignore), got {kind}")
    if tuple(labels.shape) != tuple(shape):
        raise ValueError(
            f"labels must have the shape of the logits' (batch, seqlen) = {tuple(shape)}, got {tuple(labels.shape)}"
            " (labels = input_ids works: they are shifted inside)"
        )


def read_values(input_ids, vocab_size, attention_mask=None, restarts=None):
    """What the forward must know of its inputs' values, read to the host in one transfer (each read waits
    for the device: one per forward, a decode step's included): raises ValueError for ids outside
    [0, vocab_size) (on a GPU the embedding would fail with an opaque device-side assert) and for an
    attention_mask holding anything but 0 and 1 (the paths would read other values differently); returns
    (whether attention_mask has padding, whether position_ids restart inside a row), True where not read.

    Nothing is read while compiling or capturing a CUDA graph: the checks are skipped and both answers are
    True (the masked and packed paths compute the unmasked, unpacked case exactly too)."""
    some = next((t for t in (input_ids, attention_mask, restarts) if t is not None), None)
    tracing = torch.compiler.is_compiling() or (
        some is not None and some.is_cuda and torch.cuda.is_current_stream_capturing()
    )
    if some is None or tracing:
        return True, True
    facts = []
    if input_ids is not None and input_ids.numel():
        facts += torch.aminmax(input_ids)
    if attention_mask is not None:
        facts += (~attention_mask.bool().all(), ((attention_mask != 0) & (attention_mask != 1)).any())
    if restarts is not None:
        facts.append(restarts.any())
    values = torch.stack([fact.to(torch.int64) for fact in facts]).tolist() if facts else []
    if input_ids is not None and input_ids.numel():
        lowest, highest, *values = values
        _check_id_extremes(lowest, highest, vocab_size)
    padded = True
    if attention_mask is not None:
        padded, not_binary, *values = values
        if not_binary:
            raise ValueError("attention_mask must hold 1 for tokens and 0 for padding, found other values")
        padded = bool(padded)
    restarting = bool(values.pop(0)) if restarts is not None else True
    return padded, restarting


def queue_id_range(input_ids):
    """Start reading input_ids' (lowest, highest) to the host without waiting for it, for `check_id_range`;
    None for an empty batch. A decode step launches its graph replay in between (the replay reads the ids
    clamped into range), so the GPU runs the step while the host waits for the two values, which the read
    queued ahead of the step delivers first."""
    if input_ids.numel() == 0:
        return None
    extremes = torch.stack(torch.aminmax(input_ids))
    if not extremes.is_cuda:
        return extremes, None
    on_host = torch.empty(2, dtype=extremes.dtype, pin_memory=True)
    on_host.copy_(extremes, non_blocking=True)
    copied = torch.cuda.Event()
    copied.record(torch.cuda.current_stream(extremes.device))
    return on_host, copied


def check_id_range(queued, vocab_size):
    """ValueError for ids outside [0, vocab_size) read by `queue_id_range`, as `read_values` raises it; says that
    the decode step ran nevertheless (with the id clamped), so the cache it advanced no longer fits the sequence."""
    if queued is None:
        return
    extremes, copied = queued
    if copied is not None:
        copied.synchronize()  # the copy, queued before the step: not the step itself
    lowest, highest = extremes.tolist()
    _check_id_extremes(
        lowest, highest, vocab_size,
        " (this decode step already ran with the id clamped into range, so the cache's states no longer follow"
        " the sequence)",
    )


def _check_id_extremes(lowest, highest, vocab_size, note=""):
    """ValueError naming the first id outside [0, vocab_size), given the ids' lowest and highest values."""
    if lowest < 0 or highest >= vocab_size:
        bad = lowest if lowest < 0 else highest
        raise ValueError(f"input_ids must lie in [0, vocab_size={vocab_size}), found {bad}{note}")


def document_ids(restarts):
    """Document ids (batch, seqlen) of packed sequences from `restarts` (batch, seqlen - 1): where
    position_ids restart at 0 inside a row (Transformers' DataCollatorWithFlattening)."""
    return F.pad(restarts.cumsum(-1), (1, 0)).to(torch.int32)


def restarts_of(position_ids, shape):
    """Where position_ids restart at 0 after the first position (batch, seqlen - 1), None without them."""
    if position_ids is None:
        return None
    if tuple(position_ids.shape) != shape:
        raise ValueError(f"position_ids must have shape (batch, seqlen) = {shape}, got {tuple(position_ids.shape)}")
    return position_ids[:, 1:] == 0
