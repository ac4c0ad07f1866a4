"""Mamba (Gu & Dao 2023, arXiv 2312.00752) as a Transformers model.

Read top to bottom: MambaPreTrainedModel -> MambaModel (embeddings, MambaBlocks, final norm) ->
MambaForCausalLM / MambaForSequenceClassification. The block and the selective SSM are in `block.py`,
the once-per-forward choice of backend and fused paths in `fast_path.py`, CUDA-graph decoding in
`decode_graphs.py`, the recurrent cache in `cache.py`, the kernels in `hf_mamba.kernels`.
Parameter names and shapes are those of Transformers' built-in Mamba, so its checkpoints load as they are.
"""

import contextlib
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutputWithPast
from transformers.utils import ModelOutput
from transformers.utils.deprecation import deprecate_kwarg

from .block import MambaBlock, MambaMixer, MambaRMSNorm, ScaledOutput, norm_output_dtype
from .cache import MambaCache, check_cache
from .compat import CACHE_FIELD
from .configuration_mamba import MambaConfig
from .decode_graphs import DecodeGraphs
from .fast_path import decide_fast_path, plain, scan_backend_for
from .graph_decode import decode_plan, graph_generate
from .hub import MambaHubMixin
from .inputs import (
    check_id_range,
    check_inputs,
    check_labels,
    check_not_assisted,
    check_prompt_length,
    document_ids,
    queue_id_range,
    read_values,
    restarts_of,
)
from .kernels import add_rms_norm
from .kernels._launch import compile_ahead
from .loss import causal_lm_loss

try:  # Transformers' init helpers skip tensors already loaded from a checkpoint.
    from transformers import initialization as init
except ImportError:  # pragma: no cover - older Transformers
    init = nn.init


class MambaPreTrainedModel(MambaHubMixin, PreTrainedModel):
    config_class = MambaConfig
    config: MambaConfig
    base_model_prefix = "backbone"
    main_input_name = "input_ids"
    _no_split_modules = ["MambaBlock"]
    supports_gradient_checkpointing = True
    # The state cannot be rolled back to an earlier token, so generate() refuses assisted decoding.
    _is_stateful = True
    # Under fp16/bf16 loading these stay fp32: A, D and the Δ bias set the decay rates of the state.
    _keep_in_fp32_modules_strict = ["A_log", "mixer.D", "dt_proj.bias"]

    @property
    def is_gradient_checkpointing(self) -> bool:
        """Whether any block is checkpointed. PEFT reads this name, which Transformers 5.25 deprecated (with a
        FutureWarning on every get_peft_model) for is_activation_checkpointing."""
        return any(getattr(module, "gradient_checkpointing", False) for module in self.modules())

    @staticmethod
    def _compiles_ahead_on(device):
        """Whether the first training step or generate() of a kind compiles its kernels ahead on `device`:
        CUDA, outside graph capture (the CPU tests patch it)."""
        return device.type == "cuda" and not torch.cuda.is_current_stream_capturing()

    @torch.no_grad()
    def _init_weights(self, module):
        config = self.config
        if isinstance(module, MambaMixer):
            self._init_mixer(module)
        elif isinstance(module, nn.Linear):
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=config.initializer_range)
        elif isinstance(module, MambaRMSNorm):
            init.ones_(module.weight)

    def _init_mixer(self, mixer):
        """Paper init: S4D-real A, D = 1, Δ log-uniform in [time_step_min, time_step_max] via the dt bias."""
        config = self.config
        A = torch.arange(1, mixer.d_state + 1, dtype=torch.float32).expand(mixer.d_inner, -1)
        init.copy_(mixer.A_log, torch.log(A))
        init.ones_(mixer.D)
        init.kaiming_uniform_(mixer.conv1d.weight, a=math.sqrt(5))
        if mixer.conv1d.bias is not None:
            init.zeros_(mixer.conv1d.bias)
        for linear in (mixer.in_proj, mixer.x_proj, mixer.out_proj):
            init.kaiming_uniform_(linear.weight, a=math.sqrt(5))
            if linear.bias is not None:
                init.zeros_(linear.bias)
        dt_init_std = mixer.dt_rank**-0.5 * config.time_step_scale
        if config.time_step_init_scheme == "constant":
            init.constant_(mixer.dt_proj.weight, dt_init_std)
        else:
            init.uniform_(mixer.dt_proj.weight, -dt_init_std, dt_init_std)
        log_min, log_max = math.log(config.time_step_min), math.log(config.time_step_max)
        dt = torch.exp(torch.rand(mixer.d_inner) * (log_max - log_min) + log_min).clamp(min=config.time_step_floor)
        inverse_softplus_dt = dt + torch.log(-torch.expm1(-dt))  # softplus(bias) == dt
        init.copy_(mixer.dt_proj.bias, inverse_softplus_dt)
        if config.rescale_prenorm_residual:
            # GPT-2 scheme: shrink the residual branch output by 1/sqrt(n_layer) (copy_ skips loaded weights).
            weight = mixer.out_proj.weight
            init.copy_(weight, weight / math.sqrt(config.num_hidden_layers))


# Transformers 5.24 renamed the forwards' `cache_params` to `cache`. The forwards take `cache`, and `cache_params`
# is renamed to it without a warning on every release we support (version 5.0 is at or below all of them):
# 5.17's generate() still passes the old name. Both at once is a ValueError.
accepts_cache_params = deprecate_kwarg("cache_params", version="5.0", new_name="cache", raise_if_both_names=True)


def _one_cache(cache_params, cache):
    """The cache passed to prepare_inputs_for_generation under either name: generate() validates its keyword
    arguments against that method's own signature, so both names stay in it (the forwards take `cache`)."""
    if cache is not None and cache_params is not None and cache is not cache_params:
        raise ValueError("Pass the cache as cache_params or as cache, not two different caches")
    return cache_params if cache_params is not None else cache


@dataclass
class MambaOutput(ModelOutput):
    """Output of MambaModel: last hidden state, the cache (when use_cache) and all hidden states (on request).

    The cache field is `cache` on Transformers >= 5.24 and `cache_params` before (CACHE_FIELD), as each
    release's generate() looks for it; `outputs.cache` reads it on both.
    """

    last_hidden_state: torch.FloatTensor | None = None
    if CACHE_FIELD == "cache":
        cache: MambaCache | None = None
    else:
        cache_params: MambaCache | None = None
        cache = property(lambda self: self.cache_params, doc="The cache, by Transformers >= 5.24's name.")
    hidden_states: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class MambaCausalLMOutput(ModelOutput):
    """Output of MambaForCausalLM (cache field named as in MambaOutput)."""

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    if CACHE_FIELD == "cache":
        cache: MambaCache | None = None
    else:
        cache_params: MambaCache | None = None
        cache = property(lambda self: self.cache_params, doc="The cache, by Transformers >= 5.24's name.")
    hidden_states: tuple[torch.FloatTensor, ...] | None = None


class MambaModel(MambaPreTrainedModel):
    def __init__(self, config: MambaConfig):
        super().__init__(config)
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([MambaBlock(config, layer_idx=i) for i in range(config.num_hidden_layers)])
        self.norm_f = MambaRMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self._register_load_state_dict_pre_hook(self._rename_state_spaces_embedding)
        self.post_init()

    @staticmethod
    def _rename_state_spaces_embedding(state_dict, prefix, *args):
        """state-spaces checkpoints call the embedding `embedding`; ours is `embeddings`."""
        old, new = prefix + "embedding.weight", prefix + "embeddings.weight"
        if old in state_dict and new not in state_dict:
            state_dict[new] = state_dict.pop(old)

    def get_input_embeddings(self):
        return self.embeddings

    def set_input_embeddings(self, new_embeddings):
        self.embeddings = new_embeddings

    def _checkpointing(self):
        return self.training and any(block.gradient_checkpointing for block in self.layers)

    def _run_blocks(self, hidden_states, cache_params, attention_mask, seq_idx, path, all_hidden=None):
        """The blocks and norm_f on the embeddings, the way `path` says; appends each block's output to
        all_hidden if given; returns norm_f's output."""
        if path.fused_blocks:
            return self._blocks_fused_norms(hidden_states, cache_params, attention_mask, seq_idx, path, all_hidden)
        for block in self.layers:
            # hidden_states positional: reentrant checkpointing passes gradients through positional tensors only.
            hidden_states = block(
                hidden_states, cache_params=cache_params, attention_mask=attention_mask, seq_idx=seq_idx, path=path
            )
            if all_hidden is not None:
                all_hidden.append(hidden_states)
        return self.norm_f(hidden_states, path=path, dtype=self.norm_f.weight.dtype)

    def _plain_blocks_and_norms(self):
        """At least one block, and blocks and norms as defined here, without hooks and not checkpointed: then the
        blocks may run as `_blocks_fused_norms` runs them, without calling the blocks and norms themselves."""
        norms = [block.norm for block in self.layers] + [self.norm_f]
        return (
            len(self.layers) > 0
            and not self._checkpointing()
            and all(plain(block, MambaBlock) for block in self.layers)
            and all(plain(norm, MambaRMSNorm) for norm in norms)
        )

    def _blocks_fused_norms(
        self, hidden_states, cache_params, attention_mask, seq_idx, path, all_hidden=None, layers=None
    ):
        """What the blocks (`layers`, default all) and the final norm compute (MambaBlock.forward), with each
        residual add fused with the norm after it (`add_rms_norm`: one launch forward and one backward where
        the ops take about five more per layer, which a host-bound training step and a CUDA-graph decode step
        pay for). Appends each block's output to all_hidden if given; returns norm_f's output."""
        if layers is None:
            layers = self.layers
            if cache_params is None:
                self._compile_training_ahead(hidden_states, attention_mask, seq_idx, path)
        normed = layers[0].norm(hidden_states, path=path, dtype=layers[0].norm.weight.dtype)
        for block, next_block in zip(layers, [*layers[1:], None], strict=True):
            # An fp16 mixer may leave its output's scale to the add (`ScaledOutput`); a hooked one returns a tensor.
            delta = block.mixer(
                normed, cache_params=cache_params, attention_mask=attention_mask, seq_idx=seq_idx, path=path,
                defer_scale=plain(block.mixer, MambaMixer),
            )
            delta, delta_scale = delta if isinstance(delta, ScaledOutput) else (delta, None)
            next_norm = next_block.norm if next_block is not None else self.norm_f
            next_mixer = next_block.mixer if next_block is not None else None
            hidden_states, normed = add_rms_norm(
                block.residual_of(hidden_states), delta, next_norm.weight, next_norm.variance_epsilon, path.backend,
                out_dtype=norm_output_dtype(next_mixer, next_norm.weight), delta_scale=delta_scale,
            )
            if all_hidden is not None:
                all_hidden.append(hidden_states)
        return normed

    def _compile_training_ahead(self, hidden_states, attention_mask, seq_idx, path):
        """On a training call (gradients wanted) of a kind not seen before, on CUDA, compile every kernel the
        step's blocks and norms launch side by side (`kernels.compile_ahead`) before running them: a dry
        forward and backward of the first two blocks and the final norm, which launch each kernel variant the
        whole model does (the first block's norm, the add + norm between blocks and the last one, the
        mixer's forward and backward). The mixer compiles its own kernels ahead (`mamba_inner`); the norms'
        six kernels and launchers, compiled as they launched, took a second or more of a first step."""
        if torch.compiler.is_compiling() or not torch.is_grad_enabled():
            return
        if not self._compiles_ahead_on(hidden_states.device):
            return
        key = (
            hidden_states.device, hidden_states.dtype, tuple(hidden_states.shape), hidden_states.requires_grad,
            torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else None,
            attention_mask is not None, seq_idx is not None, path,
        )
        seen = self.__dict__.setdefault("_training_compiled_ahead", set())
        if key in seen:  # every later step of the kind stops here
            return
        dry_layers = self.layers[:2]
        params = [p for p in dry_layers.parameters() if p.requires_grad] + [
            p for p in self.norm_f.parameters() if p.requires_grad
        ]
        if not (hidden_states.requires_grad or params):
            return  # nothing to differentiate: not seen yet, so parameters unfrozen later still get the pass
        seen.add(key)

        def first_blocks_forward_and_backward():
            # Random draws (dropout in adapters) are put back: the real step draws what it would have drawn.
            cuda = [hidden_states.device] if hidden_states.device.type == "cuda" else []
            with torch.random.fork_rng(cuda), torch.enable_grad():
                inputs = hidden_states.detach().requires_grad_(hidden_states.requires_grad)
                out = self._blocks_fused_norms(inputs, None, attention_mask, seq_idx, path, layers=dry_layers)
                wrt = [inputs] * inputs.requires_grad + params
                # On this thread: autograd runs a CUDA backward on a thread of its own, where the pass's
                # context (every launch compiling only, in the pass's pool) is not set.
                with torch.autograd.set_multithreading_enabled(False):
                    torch.autograd.grad(out, wrt, torch.empty_like(out), allow_unused=True)  # no .grad touched

        compile_ahead(first_blocks_forward_and_backward)

    @accepts_cache_params
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        cache: MambaCache | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        new_cache: Callable[..., MambaCache] | None = None,
        **kwargs,
    ) -> tuple | MambaOutput:
        """
        Args:
            input_ids: (batch, seqlen) token ids, or inputs_embeds (batch, seqlen, hidden_size).
            cache: a MambaCache to continue from and update in place (also taken as `cache_params`, its name
                before Transformers 5.24).
            use_cache: create (if needed) and return a cache; defaults to config.use_cache outside training.
            attention_mask: (batch, seqlen), 1 for tokens and 0 for padding; padding leaves the state unchanged.
            position_ids: (batch, seqlen); Mamba needs no positions, but where they restart at 0 inside a row
                (packed documents, as DataCollatorWithFlattening makes) the state and conv restart there.
            new_cache: makes the cache of a new sequence from (batch, dtype, device); default a fresh MambaCache.
                MambaForCausalLM passes one that reuses the states of its pooled decode graphs.
        """
        batch, seqlen = check_inputs(input_ids, inputs_embeds, attention_mask, self.config.hidden_size)
        check_cache(cache, kwargs.get("past_key_values"), self.config)
        restarts = restarts_of(position_ids, (batch, seqlen))
        # Before the embedding reads the ids.
        padded, restarting = read_values(input_ids, self.config.vocab_size, attention_mask, restarts)
        if not padded:
            attention_mask = None  # all ones: the unmasked path
        seq_idx = document_ids(restarts) if restarts is not None and restarting else None
        cache_params = cache
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        use_cache = use_cache if use_cache is not None else (self.config.use_cache and not self.training)
        if self._checkpointing():
            use_cache = False  # recomputation would advance the cache twice
        if inputs_embeds is None:
            inputs_embeds = self.embeddings(input_ids)
        if use_cache and cache_params is None:
            args = (batch, inputs_embeds.dtype, inputs_embeds.device)
            cache_params = new_cache(*args) if new_cache is not None else MambaCache(self.config, *args)
        if not use_cache:
            cache_params = None
        if cache_params is not None and cache_params.batch_size != batch:
            raise ValueError(f"cache_params holds {cache_params.batch_size} sequences but the input has {batch}")

        # As Transformers' Mamba: each block's output, then norm_f's (the embeddings are not included).
        all_hidden_states = [] if output_hidden_states else None
        path = decide_fast_path(self.config, inputs_embeds.device, self._plain_blocks_and_norms())
        hidden_states = self._run_blocks(inputs_embeds, cache_params, attention_mask, seq_idx, path, all_hidden_states)
        if output_hidden_states:
            all_hidden_states = (*all_hidden_states, hidden_states)
        if cache_params is not None:
            cache_params.seqlen_offset += seqlen
            if torch.is_grad_enabled():
                # The in-place state updates of a decode step recorded autograd history on the states; the cache
                # keeps values only (so it can be copied, and holds no graph), as generate()'s no-grad steps do.
                for state in cache_params.conv_states + cache_params.ssm_states:
                    state.detach_()

        if not return_dict:
            return tuple(v for v in (hidden_states, cache_params, all_hidden_states) if v is not None)
        return MambaOutput(
            last_hidden_state=hidden_states, hidden_states=all_hidden_states, **{CACHE_FIELD: cache_params}
        )


_PACKAGE = __name__.rpartition(".")[0]  # hf_mamba, or the folder's package when run as remote code


def _fingerprint_sees(module, own):
    """Whether a module's forward depends only on what _decode_graph_fingerprint covers: ours, torch.nn's
    and Transformers' activations, its own weights (`own`) plain tensors, not subclasses (quantized,
    DTensor) that may have no single data_ptr. Wrappers (PEFT's LoRA, quantized linears) also keep Python
    state that a graph bakes in (merged, adapters disabled), which no fingerprint sees."""
    return _type_seen(type(module)) and all(type(t) in (torch.Tensor, nn.Parameter) for t in own)


@functools.cache
def _type_seen(module_type):
    return module_type.__module__.startswith((f"{_PACKAGE}.", "torch.nn.", "transformers.activations"))


class MambaForCausalLM(MambaPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "backbone.embeddings.weight"}
    # generate() on CUDA (greedy or sampled) chooses its tokens on the GPU and reads the device once per this
    # many (`graph_decode.py`); a streamer then gets them a chunk at a time. 1: Transformers' own loop, a
    # graph replay per token.
    decode_chunk_size = 16

    def __init__(self, config: MambaConfig):
        super().__init__(config)
        self.backbone = MambaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self._decode_graphs = DecodeGraphs()
        self.post_init()

    def get_input_embeddings(self):
        return self.backbone.get_input_embeddings()

    def set_input_embeddings(self, new_embeddings):
        return self.backbone.set_input_embeddings(new_embeddings)

    @property
    def loss_function(self):
        """Transformers' causal-LM loss, computed without an fp32 copy of the logits (`hf_mamba.loss`);
        a function set on the model (`model.loss_function = ...`) wins, as in Transformers."""
        return getattr(self, "_loss_function", causal_lm_loss)

    @loss_function.setter
    def loss_function(self, value):
        self._loss_function = value

    def generate(self, inputs=None, *args, **kwargs):
        """`GenerationMixin.generate`. Refused first, with errors naming the argument: an empty prompt (Transformers'
        own preparation of a batch of empty prompts fails with an IndexError) and assisted decoding (which
        Transformers refuses only after the prompt's forward, and then as "requires a cache")."""
        prompt = kwargs.get("inputs_embeds")
        if prompt is None:
            prompt = inputs if inputs is not None else kwargs.get("input_ids")
        if torch.is_tensor(prompt) and prompt.dim() >= 2:
            check_prompt_length(prompt.shape[1])
        check_not_assisted(kwargs, self.generation_config)
        passed = _one_cache(kwargs.get("cache_params"), kwargs.get("cache"))
        check_cache(passed, kwargs.get("past_key_values"), self.config)
        with self._module_tree_walked_once():
            if passed is None:
                self._compile_generate_ahead(prompt, kwargs.get("attention_mask"))
            return super().generate(inputs, *args, **kwargs)

    @contextlib.contextmanager
    def _module_tree_walked_once(self):
        """Within it (one generate() call) the walk of the module tree behind the decode graphs' checks
        (`_tree_walk`) runs once, not at each use: the prompt's prefill graph, the new cache and the decode
        step's graph each ask, with the GPU idle (a walk of a 24-layer model takes 0.4-0.6 ms on the CI
        machine's CPU). Between those uses only generate()'s own code, the logits processors, stopping criteria
        and streamer run, none of which moves a weight or adds a module or hook."""
        outer = self.__dict__.get("_tree_walk_memo")
        self.__dict__["_tree_walk_memo"] = {}
        try:
            yield
        finally:
            if outer is None:
                del self.__dict__["_tree_walk_memo"]
            else:
                self.__dict__["_tree_walk_memo"] = outer

    def _compile_generate_ahead(self, prompt, attention_mask):
        """On the first generate() of a kind (device, dtype, batch) on CUDA, compile the Triton kernels of its
        prefill and of a decode step side by side (`kernels.compile_ahead`: a dry pass that compiles at each
        launch and runs no kernel) before generate() runs them. One after another, those compiles are most of
        a first generate() on an empty Triton cache, the prefill's scan the longest of them."""
        if not (torch.is_tensor(prompt) and prompt.dim() == 2 and prompt.shape[1] > 0) or prompt.is_floating_point():
            return
        if not self._compiles_ahead_on(prompt.device) or torch.compiler.is_compiling():
            return
        key = (prompt.device, self.get_input_embeddings().weight.dtype, prompt.shape[0])
        seen = self.__dict__.setdefault("_generate_compiled_ahead", set())
        if key in seen:
            return
        seen.add(key)

        def scratch_cache(batch, dtype, device):  # never the decode-graph pool's: its states are for real runs
            return MambaCache(self.config, batch, dtype=dtype, device=device)

        def prefill_and_step():
            if self._use_prefill_graph(prompt, None, True, 1, ()):  # the graph's kernels: the masked ones
                ids, mask = self._bucketed(prompt, attention_mask)
                cache = scratch_cache(prompt.shape[0], self.get_input_embeddings().weight.dtype, prompt.device)
                self._prefill_logits(ids, mask, cache)
                cache.seqlen_offset = prompt.shape[1]
            else:
                out = self.backbone(prompt, attention_mask=attention_mask, use_cache=True, new_cache=scratch_cache)
                self.lm_head(out.last_hidden_state[:, -1:].to(self.lm_head.weight.dtype))
                cache = out[CACHE_FIELD]
            self._decode_step_logits(prompt[:, -1:], cache)

        compile_ahead(prefill_and_step)

    def _sample(self, input_ids, logits_processor, stopping_criteria, generation_config, synced_gpus=False,
                streamer=None, **model_kwargs):
        """Greedy search or sampling with the tokens chosen on the GPU where that gives Transformers' tokens
        (`graph_decode.py`), else GenerationMixin._sample."""
        plan = decode_plan(
            self, input_ids, logits_processor, stopping_criteria, generation_config, synced_gpus, model_kwargs
        )
        if plan is None:
            return super()._sample(input_ids, logits_processor, stopping_criteria, generation_config,
                                   synced_gpus=synced_gpus, streamer=streamer, **model_kwargs)
        return graph_generate(self, input_ids, plan, logits_processor, stopping_criteria, generation_config,
                               streamer, model_kwargs)

    def _select_graph(self, cache, input_ids, kind):
        """The graph of a decode step on `cache` that selects its token (`graph_decode.py`), captured at its
        first use."""
        return self._decode_graphs.select_graph(
            self._decode_step_logits, self._decode_graph_fingerprint, cache, input_ids, kind
        )

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # generate() must not build a DynamicCache: the forward creates a MambaCache

    def prepare_inputs_for_generation(
        self,
        input_ids,
        inputs_embeds=None,
        cache_params=None,
        attention_mask=None,
        use_cache=None,
        cache=None,
        next_sequence_length=None,
        is_first_iteration=None,  # not needed: the cache's length tells what is new
        position_ids=None,  # dropped: generate() makes them from the mask, where left padding reads as restarts
        **kwargs,
    ):
        """The inputs of one forward in generate(): what the cache has not seen yet, plus every other model kwarg
        (output_hidden_states, logits_to_keep, your own), forwarded unchanged as GenerationMixin's default does."""
        cache_params = _one_cache(cache_params, cache)
        seen = cache_params.seqlen_offset if cache_params is not None else 0
        # Generation from inputs_embeds: input_ids holds only the tokens generated since (none at first). The
        # embeddings are read while the cache has not seen them all (no cache: at every step).
        if inputs_embeds is not None and seen < inputs_embeds.shape[1]:
            if seen == 0 and input_ids.shape[1] > 0:  # no cache: the whole sequence, generated tokens embedded
                inputs_embeds = torch.cat([inputs_embeds, self.get_input_embeddings()(input_ids)], dim=1)
            n_new = next_sequence_length if next_sequence_length is not None else inputs_embeds.shape[1] - seen
            model_inputs = {"inputs_embeds": inputs_embeds[:, inputs_embeds.shape[1] - n_new :]}
        else:
            if inputs_embeds is None and 0 < input_ids.shape[1] <= seen:
                # Not after a prefill from inputs_embeds (then input_ids holds only generated tokens): the cache
                # has seen every token, and the next token's logits need a forward of the last one.
                raise ValueError(
                    f"The cache has already seen all {input_ids.shape[1]} tokens of input_ids; generate() needs at "
                    "least the last prompt token unseen (prefill all but the last token, as "
                    "hf_mamba.generate_after_prefill does)"
                )
            if next_sequence_length is not None:
                n_new = next_sequence_length
            elif seen > 0:
                # Only what the cache has not seen; at least the newest token (after a prefill from inputs_embeds,
                # input_ids holds only generated tokens, so the count can come out < 1).
                n_new = max(input_ids.shape[1] - seen, 1)
            else:
                n_new = input_ids.shape[1]
            model_inputs = {"input_ids": input_ids[:, input_ids.shape[1] - n_new :]}
        if seen > 0:
            attention_mask = None  # tokens after the cache are never padding
        model_inputs.update({CACHE_FIELD: cache_params}, use_cache=use_cache, attention_mask=attention_mask)
        for key, value in kwargs.items():
            if key not in model_inputs and key != "labels":
                model_inputs[key] = value
        return model_inputs

    # A new sequence's prefill of at most this many tokens (batch x the prompt's bucket length) replays a CUDA
    # graph (`_use_prefill_graph`): below it a forward's host work (about 0.6 ms a layer) outlasts its GPU
    # time, above it the GPU's share dominates. It also bounds what each graph's memory holds: the
    # activations of one forward of that many tokens.
    PREFILL_GRAPH_MAX = 2048

    def _prefill_logits(self, input_ids, attention_mask, cache_params):
        """Logits (batch, 1, vocab) of the last position of a new sequence's prefill, masked as the forward masks
        padding; fills the fresh cache's states, not its offset. What a prefill graph captures."""
        backbone = self.backbone
        hidden_states = backbone.embeddings(input_ids.clamp(0, self.config.vocab_size - 1))
        path = decide_fast_path(self.config, hidden_states.device, backbone._plain_blocks_and_norms())
        hidden_states = backbone._run_blocks(hidden_states, cache_params, attention_mask, None, path)
        return self.lm_head(hidden_states[:, -1:].to(self.lm_head.weight.dtype))

    def _use_prefill_graph(self, input_ids, cache_params, use_cache, logits_to_keep, other_inputs):
        """A graph replays generate()'s prefill of a short prompt for a new sequence: input ids, a new cache (the
        pool's, whose states the graph is captured on), the last position's logits only, nothing else asked."""
        return (
            input_ids is not None
            and input_ids.dim() == 2
            and input_ids.shape[1] > 1
            and input_ids.shape[0] * _prefill_bucket(input_ids.shape[1]) <= self.PREFILL_GRAPH_MAX
            and cache_params is None
            and use_cache is True
            and isinstance(logits_to_keep, int)
            and logits_to_keep == 1
            and not torch.is_grad_enabled()
            and not torch.compiler.is_compiling()
            and all(value is None or value is False for value in other_inputs)
            and self._pools_decode_graphs(input_ids.device)
        )

    def _replay_prefill(self, input_ids, attention_mask):
        """(logits, cache) of a new sequence's prefill by a graph of the prompt's bucket length (a power of two,
        at least 64): the prompt left-padded to it with the padding masked, which leaves the states as the
        prompt alone makes them (padding steps carry the state unchanged) and the last position's logits."""
        batch, seqlen = check_inputs(input_ids, None, attention_mask, self.config.hidden_size)
        read_values(input_ids, self.config.vocab_size, attention_mask, None)  # ids and mask checked, by name
        input_ids, mask = self._bucketed(input_ids, attention_mask)
        cache = self._new_cache(batch, self.get_input_embeddings().weight.dtype, input_ids.device)
        logits = self._decode_graphs.prefill(
            self._prefill_logits, self._decode_graph_fingerprint, cache, input_ids, mask
        )
        cache.seqlen_offset = seqlen
        return logits, cache

    @staticmethod
    def _bucketed(input_ids, attention_mask):
        """(ids, mask) left-padded to the prompt's bucket length, the padding masked: a prefill graph's inputs."""
        mask = attention_mask.to(input_ids.dtype) if attention_mask is not None else torch.ones_like(input_ids)
        padding = _prefill_bucket(input_ids.shape[1]) - input_ids.shape[1]
        return nn.functional.pad(input_ids, (padding, 0)), nn.functional.pad(mask, (padding, 0))

    def _decode_step_logits(self, input_ids, cache_params):
        """Logits (batch, 1, vocab) of one token on top of the cache; advances the states, not the offset."""
        backbone = self.backbone
        # Clamped: the forward checks the ids only after launching the step (their values are the same otherwise).
        hidden_states = backbone.embeddings(input_ids.clamp(0, self.config.vocab_size - 1))
        path = decide_fast_path(self.config, hidden_states.device, backbone._plain_blocks_and_norms())
        hidden_states = backbone._run_blocks(hidden_states, cache_params, None, None, path)
        return self.lm_head(hidden_states.to(self.lm_head.weight.dtype))

    def _cuda_graphs_on(self, device):
        """Whether decode steps on `device` may replay CUDA graphs (the CPU tests patch it, with a fake graph).
        Not for a model Accelerate dispatched over several devices or with offloading (`device_map`): its hooks
        move tensors at every call, and a replay runs none of them."""
        # Read from __dict__, where from_pretrained sets it: a missing attribute costs nn.Module.__getattr__ an
        # exception, microseconds of every decode step before its replay.
        device_map = self.__dict__.get("hf_device_map")
        dispatched = device_map is not None and (
            len(set(device_map.values())) > 1 or not set(device_map.values()).isdisjoint({"cpu", "disk"})
        )
        return self.config.use_cuda_graph and device.type == "cuda" and not dispatched

    def _use_decode_graph(self, input_ids, cache_params, use_cache, other_inputs):
        """CUDA-graph replay serves plain inference decode steps: one token id per row on a warm cache."""
        return (
            input_ids is not None
            and self._cuda_graphs_on(input_ids.device)
            and input_ids.dim() == 2
            and input_ids.shape[1] == 1
            and cache_params is not None
            and cache_params.seqlen_offset > 0
            and use_cache is not False
            and not torch.is_grad_enabled()
            and not torch.compiler.is_compiling()
            and all(value is None or value is False for value in other_inputs)
        )

    def _new_cache(self, batch, dtype, device):
        """The cache MambaModel creates for a new sequence: from the decode-graph pool where graphs are pooled."""
        if self._pools_decode_graphs(device):
            return self._decode_graphs.new_cache(self.config, batch, dtype, device)
        return MambaCache(self.config, batch, dtype=dtype, device=device)

    def _pools_decode_graphs(self, device):
        """Whether decode steps on `device` replay graphs kept across generate() calls: where they replay
        graphs at all and the pool's fingerprint sees everything they depend on."""
        return (
            self._cuda_graphs_on(device)
            and not torch.is_grad_enabled()
            and not torch.compiler.is_compiling()
            and self._fingerprint_sees_all()
        )

    def _fingerprint_sees_all(self):
        """`_tree_walk()[0]`; outside generate() (no walk shared by the call) from a walk that stops at the first
        module the fingerprint cannot see, building no fingerprint: an eager forward making a new cache needs
        only this."""
        if "_tree_walk_memo" in self.__dict__:
            return self._tree_walk()[0]
        return all(_fingerprint_sees(module, own) for module, own in self._modules_and_weights())

    def _tree_walk(self):
        """(whether the fingerprint sees every module (`_fingerprint_sees`); the module tree's part of the
        fingerprint), from one walk of the tree; once per generate() call (`_module_tree_walked_once`)."""
        memo = self.__dict__.get("_tree_walk_memo")
        if memo is not None and "walk" in memo:
            return memo["walk"]
        sees_all, weights, modules = True, [], []
        for module, own in self._modules_and_weights():  # a tied weight comes twice: the same every time
            sees_all = sees_all and _fingerprint_sees(module, own)
            weights += [(t.data_ptr(), t.dtype, t.shape, t.stride()) for t in own]
            modules.append((type(module), tuple(module._forward_pre_hooks), tuple(module._forward_hooks),
                            module.__dict__.get("forward")))
        walk = sees_all, (tuple(weights), tuple(modules), self.backbone._plain_blocks_and_norms())
        if memo is not None:
            memo["walk"] = walk
        return walk

    def _modules_and_weights(self):
        """Each module with its own parameters and buffers, in one walk of the module tree in modules()' order
        (parameters() and buffers() take one walk each; modules() builds every module's name: 0.32 against 0.21
        ms for 24 layers on the CI CPU). A module shared by two parents comes twice."""
        stack = [self]
        while stack:
            module = stack.pop()
            yield module, [t for t in (*module._parameters.values(), *module._buffers.values()) if t is not None]
            stack += reversed([child for child in module._modules.values() if child is not None])

    def _decode_graph_fingerprint(self):
        """What a captured decode step reads besides its cache, unchanged since the capture for a replay to be
        right: each weight's address and layout (`to()`, `load_state_dict(assign=True)` move them), each
        module's type, hooks and replaced forward (a replay runs none), the fused body's and the scan
        backend's choice, autocast."""
        from torch.nn.modules import module as module_globals

        global_hooks = (tuple(module_globals._global_forward_pre_hooks), tuple(module_globals._global_forward_hooks))
        autocast = (torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"))
        return self._tree_walk()[1], global_hooks, scan_backend_for(self.config), autocast

    @accepts_cache_params
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        cache: MambaCache | None = None,
        labels: torch.LongTensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        position_ids: torch.LongTensor | None = None,
        **kwargs,
    ) -> tuple | MambaCausalLMOutput:
        """
        Args:
            labels: (batch, seqlen) targets, shifted inside (labels = input_ids works); -100 is ignored.
            logits_to_keep: compute logits for the last N positions only (0 = all), or for the given indices.
            Others: see MambaModel.forward.
        """
        cache_params = cache
        check_cache(cache_params, kwargs.get("past_key_values"))
        if self._use_prefill_graph(
            input_ids,
            cache_params,
            use_cache,
            logits_to_keep,
            (inputs_embeds, labels, output_hidden_states, position_ids),
        ):
            logits, cache_params = self._replay_prefill(input_ids, attention_mask)
            return_dict = return_dict if return_dict is not None else self.config.return_dict
            return (
                MambaCausalLMOutput(logits=logits, **{CACHE_FIELD: cache_params})
                if return_dict
                else (logits, cache_params)
            )
        if self._use_decode_graph(
            input_ids,
            cache_params,
            use_cache,
            (attention_mask, inputs_embeds, labels, output_hidden_states, position_ids),
        ):
            check_inputs(input_ids, None, None)
            # The id check waits for the ids' range only after the replay is launched: the GPU does not idle
            # through the read (the step clamps the ids, so a bad one cannot make the embedding read out of bounds).
            id_range = queue_id_range(input_ids)
            logits = self._decode_graphs.decode(
                self._decode_step_logits, self._decode_graph_fingerprint, cache_params, input_ids
            )
            check_id_range(id_range, self.config.vocab_size)
            cache_params.seqlen_offset += 1
            # Read after the replay's launch, which the GPU waits for (each config read costs microseconds).
            return_dict = return_dict if return_dict is not None else self.config.return_dict
            return (
                MambaCausalLMOutput(logits=logits, **{CACHE_FIELD: cache_params})
                if return_dict
                else (logits, cache_params)
            )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.backbone(
            input_ids,
            inputs_embeds=inputs_embeds,
            cache=cache_params,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            return_dict=True,
            attention_mask=attention_mask,
            position_ids=position_ids,
            new_cache=self._new_cache,
        )
        hidden_states = outputs.last_hidden_state
        cache_params = outputs.get(CACHE_FIELD)
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        # Logits stay in lm_head's dtype (bf16 under autocast), as in Transformers' Llama and in mamba_ssm;
        # the loss function upcasts. An fp32 copy of (batch, seqlen, vocab) would be the largest tensor of
        # a training step (785 MiB at 4 x 1024 tokens and vocab 50280).
        logits = self.lm_head(hidden_states[:, keep].to(self.lm_head.weight.dtype))
        loss = None
        if labels is not None:
            check_labels(labels, logits.shape[:2])
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        if not return_dict:
            output = tuple(v for v in (logits, cache_params, outputs.hidden_states) if v is not None)
            return (loss, *output) if loss is not None else output
        return MambaCausalLMOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, **{CACHE_FIELD: cache_params}
        )


class MambaForSequenceClassification(MambaPreTrainedModel):
    """Mamba with a linear head on the last non-padding token (regression, single- or multi-label)."""

    def __init__(self, config: MambaConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.backbone = MambaModel(config)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.backbone.get_input_embeddings()

    def set_input_embeddings(self, new_embeddings):
        return self.backbone.set_input_embeddings(new_embeddings)

    def _last_token_index(self, input_ids, attention_mask, seqlen, device):
        """Index of the last real token per row; works for left and right padding."""
        if attention_mask is not None:
            real = attention_mask.to(device).bool()
        elif input_ids is not None and self.config.pad_token_id is not None:
            real = input_ids != self.config.pad_token_id
        else:
            return torch.full((1,), seqlen - 1, device=device)
        positions = torch.arange(seqlen, device=device)
        return torch.where(real, positions, -1).amax(dim=-1).clamp(min=0)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> tuple | SequenceClassifierOutputWithPast:
        """labels: (batch,) class ids (single label), (batch, num_labels) floats (multi-label),
        or (batch,) values (regression)."""
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.backbone(
            input_ids,
            inputs_embeds=inputs_embeds,
            use_cache=False,
            output_hidden_states=output_hidden_states,
            return_dict=True,
            attention_mask=attention_mask,
        )
        logits = self.score(outputs.last_hidden_state.to(self.score.weight.dtype))  # (batch, seqlen, num_labels)
        batch, seqlen = logits.shape[:2]
        last = self._last_token_index(input_ids, attention_mask, seqlen, logits.device)
        pooled_logits = logits[torch.arange(batch, device=logits.device), last]  # (batch, num_labels)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, pooled_logits=pooled_logits, config=self.config)
        if not return_dict:
            output = tuple(v for v in (pooled_logits, outputs.hidden_states) if v is not None)
            return (loss, *output) if loss is not None else output
        return SequenceClassifierOutputWithPast(loss=loss, logits=pooled_logits, hidden_states=outputs.hidden_states)


def _prefill_bucket(seqlen):
    """The length a prompt of `seqlen` tokens is left-padded to for a prefill graph: a power of two, at least 64
    (few graphs, and at most twice the prompt's work)."""
    return max(64, 1 << (seqlen - 1).bit_length())


__all__ = [
    "MambaCausalLMOutput",
    "MambaForCausalLM",
    "MambaForSequenceClassification",
    "MambaModel",
    "MambaOutput",
    "MambaPreTrainedModel",
]
