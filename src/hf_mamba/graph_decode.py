"""generate()'s greedy search and sampling on CUDA: the tokens chosen on the GPU, a chunk of them per read of
the device, the same tokens as Transformers' loop.

Transformers' decode loop works per token on the host: a forward (here, one graph replay), the logits
processors, the stopping criteria, the token's append, and a read of the device to decide whether to stop.
For a model the size of Mamba-130M that host work takes longer than the GPU's step, so the GPU idles between
steps and decoding runs at the host's pace. Where every processor and stopping criterion is one whose effect
a graph can reproduce exactly (min_length / min_new_tokens, temperature, top-k, top-p, min-p, max_length /
max_new_tokens, EOS), this loop replays a captured step that selects its token on the GPU
(`decode_graphs.SelectStep`) as `GenerationMixin._sample` does (argmax, or torch.multinomial: a replay draws
from the generator's stream where the eager call would, so a seed gives the same tokens) and leaves it as
the next replay's input; the host queues the replays of a chunk of up to
`MambaForCausalLM.decode_chunk_size` tokens back to back (a graph launch and a copy each) and reads the
device once per chunk.

Everything else runs Transformers' own loop: beam search, other processors or criteria, scores, logits or
hidden states in the output, synced GPUs, a cache passed in, a returned cache while EOS may stop the rows
early (a chunk's steps after the last row finished advance it past the state Transformers leaves), and
models whose graphs are not kept across calls (wrapped modules, e.g. LoRA; each call would capture afresh).
A streamer gets every token, a chunk's tokens at once.
"""

from dataclasses import dataclass

import torch
from transformers.generation.stopping_criteria import EosTokenCriteria, MaxLengthCriteria
from transformers.generation.utils import GenerateDecoderOnlyOutput

from .compat import CACHE_FIELD
from .decode_graphs import SelectStep, select_tokens

# Model inputs generate() passes that the chunked loop reproduces: after the prefill only the cache matters
# (decode steps drop the mask and position_ids, and compute one position's logits).
KNOWN_MODEL_KWARGS = {
    "attention_mask", "position_ids", "logits_to_keep", "use_cache", "inputs_embeds", "cache", "cache_params",
    "past_key_values",
}
_OUTPUT_CACHE_FIELD = "cache" if "cache" in GenerateDecoderOnlyOutput.__dataclass_fields__ else "past_key_values"


@dataclass
class DecodePlan:
    """What the chunked loop needs of generate()'s settings, read once before the prefill."""

    max_length: int
    eos: tuple[int, ...]  # () when no EOS stops the rows
    pad: int
    suppress: list  # [(length, eos ids)]: the ids are at -inf while the sequence is shorter than length
    chunk_size: int  # the most replays queued before a read of the device
    sample: bool  # a draw from the softmax, else the argmax
    warpers: list  # processors of the scores alone, applied in order after the suppression


def decode_plan(model, input_ids, logits_processor, stopping_criteria, generation_config, synced_gpus, model_kwargs):
    """The chunked loop's plan for this generate(), or None where Transformers' loop must run."""
    chunk = model.decode_chunk_size
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"decode_chunk_size must be a positive integer (1: a forward per token), got {chunk!r}")
    if (
        chunk == 1
        or synced_gpus
        or input_ids.shape[0] == 0
        or model_kwargs.get("use_cache") is False
        or not set(model_kwargs) <= KNOWN_MODEL_KWARGS
        or any(model_kwargs.get(name) is not None for name in ("cache", "cache_params", "past_key_values"))
        # Only graphs kept across generate() calls: a capture (a warm-up step and the graph) would cost every call.
        or not model._pools_decode_graphs(input_ids.device)
        or getattr(model.get_output_embeddings(), "out_features", None) != model.config.vocab_size
    ):
        return None
    wants = ("output_scores", "output_logits", "output_attentions", "output_hidden_states")
    if generation_config.return_dict_in_generate and any(getattr(generation_config, name) for name in wants):
        return None
    processors = _processors(logits_processor)
    stops = _stops(stopping_criteria)
    if processors is None or stops is None:
        return None
    suppress, warpers = processors
    max_length, eos = stops
    pad = 0
    if eos:
        if generation_config.return_dict_in_generate:
            return None  # the cache is returned, and EOS may stop the rows inside a chunk
        pad = generation_config._pad_token_tensor
        pad = int(pad) if pad is not None and pad.numel() == 1 else -1
        if not 0 <= pad < model.config.vocab_size:
            return None  # Transformers' loop refuses it at the next forward, by name
    return DecodePlan(max_length, eos, pad, suppress, chunk, bool(generation_config.do_sample), warpers)


def _processors(logits_processor):
    """([(length, eos ids)] of the min_length / min_new_tokens processors, [warpers]): the warpers are
    processors of the scores alone (temperature, top-k, top-p, min-p) with plain-number settings (they key
    the step's graph, `SelectStep`), after every min-length one, as Transformers orders them. None if any
    other processor is there, or another order."""
    from transformers.generation import logits_process as lp

    warper_types = (lp.TemperatureLogitsWarper, lp.TopKLogitsWarper, lp.TopPLogitsWarper, lp.MinPLogitsWarper)
    suppress, warpers = [], []
    for processor in logits_processor:
        if type(processor) in warper_types:
            if not all(type(value) in (int, float, bool) for value in vars(processor).values()):
                return None  # settings that are not plain numbers could not key the step's graph
            warpers.append(processor)
            continue
        if warpers:
            return None  # a min-length processor after a warper: not the order the step applies them in
        if type(processor) is lp.MinLengthLogitsProcessor:
            length = processor.min_length
        elif type(processor) is lp.MinNewTokensLengthLogitsProcessor:
            length = processor.prompt_length_to_skip + processor.min_new_tokens
        else:
            return None
        suppress.append((length, tuple(processor.eos_token_id.reshape(-1).tolist())))
    return suppress, warpers


def _stops(stopping_criteria):
    """(max_length, eos ids) of max-length and EOS criteria; None if any other criterion is there."""
    max_lengths, eos = [], []
    for criterion in stopping_criteria:
        if type(criterion) is MaxLengthCriteria:
            max_lengths.append(criterion.max_length)
        elif type(criterion) is EosTokenCriteria:
            eos += criterion.eos_token_id.reshape(-1).tolist()
        else:
            return None
    if not max_lengths:
        return None  # generate() always sets one; without it the loop could not size its chunks
    return min(max_lengths), tuple(sorted(set(eos)))


def graph_generate(
    model, input_ids, plan, logits_processor, stopping_criteria, generation_config, streamer, model_kwargs
):
    """GenerationMixin._sample's result (sequences, or the output object), decoding in chunks of replays."""
    outputs = model._prefill(input_ids, generation_config, model_kwargs)
    model_kwargs = model._update_model_kwargs_for_generation(outputs, model_kwargs)
    cache = outputs[CACHE_FIELD]
    # The prefill's token, as Transformers' loop selects it.
    unfinished = torch.ones(input_ids.shape[0], dtype=torch.long, device=input_ids.device)
    logits = outputs.logits[:, -1].to(copy=True, dtype=torch.float32, device=input_ids.device)
    del outputs
    next_ids = select_tokens(logits_processor(input_ids, logits), plan.sample)
    if plan.eos:
        next_ids = next_ids * unfinished + plan.pad * (1 - unfinished)
    input_ids = torch.cat([input_ids, next_ids[:, None]], dim=-1)
    unfinished = unfinished & ~stopping_criteria(input_ids, None)
    if streamer is not None:
        streamer.put(next_ids.cpu())
    finished = bool(unfinished.max() == 0)
    graph = None
    masks = {}  # the suppressed mask of each set of active min-length processors
    while not finished and input_ids.shape[1] < plan.max_length:
        steps, active = _next_chunk(plan, input_ids.shape[1])
        if active not in masks:
            masks[active] = _suppressed_mask(plan, active, model.config.vocab_size, input_ids.device)
        if graph is None:  # captured at its first use only: a one-token generate() needs none
            kind = SelectStep(model.config.vocab_size, plan.eos, plan.pad, plan.sample, tuple(plan.warpers))
            graph = model._select_graph(cache, next_ids[:, None], kind)
            graph.start(next_ids[:, None], unfinished)
        out = graph.run_steps(steps, masks[active])
        cache.seqlen_offset += steps
        done_after = (~out[:, 1].bool().any(0)).cpu()  # the one read of the device per chunk
        finished = bool(done_after.any())
        keep = int(done_after.to(torch.uint8).argmax()) + 1 if finished else steps  # up to the step all finished
        tokens = out[:, 0, :keep]
        input_ids = torch.cat([input_ids, tokens], dim=-1)
        if streamer is not None:
            for token in tokens.cpu().unbind(1):
                streamer.put(token)
    if streamer is not None:
        streamer.end()
    if generation_config.return_dict_in_generate:
        return GenerateDecoderOnlyOutput(sequences=input_ids, **{_OUTPUT_CACHE_FIELD: model_kwargs.get(CACHE_FIELD)})
    return input_ids


def _next_chunk(plan, length):
    """(steps, active): the next chunk's length (at most plan.chunk_size) for a sequence of `length` tokens,
    and the min-length processors suppressing EOS through it (a chunk never crosses max_length or where one
    stops)."""
    steps = min(plan.chunk_size, plan.max_length - length)
    active = tuple(i for i, (until, _) in enumerate(plan.suppress) if length < until)
    if active:
        steps = min(steps, *(plan.suppress[i][0] - length for i in active))
    return steps, active


def _suppressed_mask(plan, active, vocab_size, device):
    """(vocab,) bool: the EOS ids of the `active` min-length processors (ids outside the vocabulary ignored,
    as Transformers' isin over the vocabulary does)."""
    ids = sorted({token for i in active for token in plan.suppress[i][1] if 0 <= token < vocab_size})
    mask = torch.zeros(vocab_size, dtype=torch.bool)
    mask[ids] = True
    return mask.to(device)


__all__ = ["graph_generate", "decode_plan"]
