"""Long prompts through the recurrent cache: prefill in chunks, memory independent of the prompt's length.

A forward over the whole prompt keeps activations of every position alive inside each layer (the
in_proj output, the conv output, Δ, the scan output: a few (seqlen, d_inner) tensors), so its peak
memory grows linearly with the prompt. Mamba's state after a prefix is a fixed-size cache, and the
model's forward continues exactly from a cache with several new tokens; feeding the prompt a chunk at a
time therefore gives the same states and logits with peak memory set by the chunk, not the prompt.

    cache = MambaCache(model.config, batch_size=input_ids.shape[0], dtype=model.dtype, device=model.device)
    prefill_in_chunks(model, input_ids[:, :-1], chunk_size=16384, cache=cache)
    generated = model.generate(input_ids, cache=cache, max_new_tokens=64)

`generate()` given a cache feeds only the tokens the cache has not seen (at least one, the newest: it
needs that token's logits from a forward of its own), so prefill all but the last prompt token and
pass the whole prompt; `generate_after_prefill` does both.
"""

import torch

from .compat import CACHE_FIELD

DEFAULT_CHUNK_SIZE = 16384


def _check_prefill_args(model, input_ids, chunk_size, attention_mask, logits_to_keep):
    if not callable(model):
        raise ValueError(f"model must be an hf_mamba model (MambaForCausalLM or MambaModel), got {type(model)}")
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids must be a (batch, seqlen) tensor of token ids, got {shape}")
    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
        raise ValueError(f"input_ids must be an integer tensor, got dtype {input_ids.dtype}")
    if input_ids.shape[1] == 0:
        raise ValueError("input_ids is empty (seqlen 0); pass at least one token")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    if isinstance(logits_to_keep, bool) or not isinstance(logits_to_keep, int) or logits_to_keep < 0:
        raise ValueError(f"logits_to_keep must be a non-negative integer (0 = all), got {logits_to_keep!r}")
    if attention_mask is not None and (
        not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != tuple(input_ids.shape)
    ):
        shape = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask)
        raise ValueError(f"attention_mask must have input_ids' shape {tuple(input_ids.shape)}, got {shape}")


def _has_lm_head(model):
    get_head = getattr(model, "get_output_embeddings", None)
    return get_head is not None and get_head() is not None


@torch.no_grad()
def prefill_in_chunks(
    model,
    input_ids,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    attention_mask=None,
    cache=None,
    logits_to_keep: int = 1,
):
    """Run `input_ids` through `model` `chunk_size` tokens at a time, continuing one cache.

    Args:
        model: an hf_mamba MambaForCausalLM or MambaModel (also wrapped, e.g. by PEFT), in eval mode or at
            least without activation checkpointing (which turns the cache off in training).
        input_ids: (batch, seqlen) token ids.
        chunk_size: tokens per forward. Peak memory is that of a forward over chunk_size tokens, whatever
            seqlen is; larger chunks run faster on a GPU until the scan is saturated.
        attention_mask: optional (batch, seqlen), 0 at (left) padding; padding leaves the state unchanged.
        cache: optional MambaCache to continue from (the prompt then follows what it has seen).
        logits_to_keep: logits of the last N positions of the last chunk (0: the whole last chunk). The
            other chunks compute logits of their last position only.

    Returns:
        The model output of the last chunk: `logits` (causal LM) or `last_hidden_state` of that chunk, and
        the cache, which has seen the whole prompt: `cache` if one was passed (updated in place), else a new
        one in the output (`output.cache` on Transformers >= 5.24, `output.cache_params` before).

    Runs under torch.no_grad(): a prefill with autograd would keep every chunk's graph alive through
    the cache, and memory would grow with the prompt again.
    """
    _check_prefill_args(model, input_ids, chunk_size, attention_mask, logits_to_keep)
    seqlen = input_ids.shape[1]
    head = _has_lm_head(model)
    output = None
    for start in range(0, seqlen, chunk_size):
        stop = min(start + chunk_size, seqlen)
        kwargs = {}
        if head:
            kwargs["logits_to_keep"] = logits_to_keep if stop == seqlen else 1
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask[:, start:stop]
        output = None  # drop the previous chunk's logits before the next forward allocates its own
        output = model(input_ids=input_ids[:, start:stop], cache=cache, use_cache=True, **kwargs)
        cache = output[CACHE_FIELD] if CACHE_FIELD in output else None
        if cache is None:
            raise ValueError(
                "The model returned no cache: activation checkpointing in training mode turns it off; "
                "call model.eval() before prefilling"
            )
    return output


def generate_after_prefill(model, input_ids, chunk_size: int = DEFAULT_CHUNK_SIZE, attention_mask=None, **kwargs):
    """`model.generate(input_ids, **kwargs)` with the prompt (all but its last token) prefilled in chunks first.

    Same tokens as generate() on the whole prompt; peak memory is that of a chunk_size forward plus the
    generated sequences. kwargs go to generate() (max_new_tokens, do_sample, ...); a `cache` among them
    is refused, since the prefill makes the cache.
    """
    if "cache" in kwargs or "cache_params" in kwargs or "past_key_values" in kwargs:
        raise ValueError("generate_after_prefill makes the cache itself; do not pass cache / cache_params")
    _check_prefill_args(model, input_ids, chunk_size, attention_mask, 1)
    if input_ids.shape[1] > 1:
        mask = attention_mask[:, :-1] if attention_mask is not None else None
        prefilled = prefill_in_chunks(model, input_ids[:, :-1], chunk_size, attention_mask=mask)
        kwargs["cache"] = prefilled[CACHE_FIELD]  # hf_mamba's forward takes `cache` on every release
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
    return model.generate(input_ids, **kwargs)


__all__ = ["DEFAULT_CHUNK_SIZE", "generate_after_prefill", "prefill_in_chunks"]
