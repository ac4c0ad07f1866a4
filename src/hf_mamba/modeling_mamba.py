"""Mamba (Gu & Dao 2023, arXiv 2312.00752) as a Transformers model.

Read top to bottom: RMSNorm -> MambaDeltaProjection -> MambaMixer (the selective SSM) -> MambaBlock
-> MambaPreTrainedModel -> MambaModel -> MambaForCausalLM / MambaForSequenceClassification.
Parameter names and shapes are those of Transformers' built-in Mamba, so its checkpoints load as they are.
The kernels live in `hf_mamba.kernels`; `decide_fast_path` below is the one place that picks, once per forward,
the backend and the fused paths, which every module is then handed (`path`).
"""

import itertools
import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import SequenceClassifierOutputWithPast
from transformers.utils import ModelOutput

from .cache import MambaCache
from .compat import CACHE_FIELD
from .configuration_mamba import MambaConfig
from .decode_graphs import DecodeGraphs
from .loss import causal_lm_loss
from .hub import MambaHubMixin
from .kernels import (
    add_rms_norm,
    causal_conv1d,
    causal_conv1d_update,
    mamba_inner_triton,
    resolve_backend,
    rms_norm,
    selective_scan,
    selective_state_update,
    weightless_rms_norm,
)

try:  # Transformers' init helpers skip tensors already loaded from a checkpoint.
    from transformers import initialization as init
except ImportError:  # pragma: no cover - older Transformers
    init = nn.init

BACKEND_ENV_VAR = "HF_MAMBA_BACKEND"


def _fp32_or_wider(t):
    """SSM parameters enter the scan in fp32 (fp64 stays fp64, for gradient checks)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _linear_input(linear, x):
    """x as a projection should read it: the channels-last view itself for a plain nn.Linear, or an adapter over
    one (its matmul reads strides), a contiguous copy for anything else (bitsandbytes' CPU 4-bit kernel reads a
    strided input wrong)."""
    return x if type(getattr(linear, "base_layer", linear)) is nn.Linear else x.contiguous()


def _unhooked(module):
    """No forward or backward hooks (the module's or global) and no replaced forward (as accelerate's
    hooks do): a module the fused mixer would not call must have nothing that expects the call."""
    from torch.nn.modules import module as module_globals

    return not (
        module._forward_hooks
        or module._forward_pre_hooks
        or module._backward_hooks
        or module._backward_pre_hooks
        or module_globals._global_forward_hooks
        or module_globals._global_forward_pre_hooks
        or module_globals._global_backward_hooks
        or module_globals._global_backward_pre_hooks
        or "forward" in module.__dict__
    )


def scan_backend_for(config) -> str | None:
    """The backend asked for: $HF_MAMBA_BACKEND, else config.scan_backend, else None (the fastest for the device)."""
    return os.environ.get(BACKEND_ENV_VAR) or getattr(config, "scan_backend", None)


@dataclass(frozen=True)
class FastPath:
    """How one forward runs: decided once at its start (`decide_fast_path`) and passed down to every module.

    backend: the scan and conv implementation for the inputs' device ("reference", "torch" or "triton").
    fused_blocks: the blocks run as MambaModel._blocks_fused_norms runs them (each residual add fused with the
        next RMSNorm in one Triton kernel) rather than as modules.
    training_kernels: Triton's training kernels run where they apply (the fused mixer, the Triton RMSNorm).
    """

    backend: str
    fused_blocks: bool = False
    training_kernels: bool = False


def decide_fast_path(config, device, blocks_plain: bool = False) -> FastPath:
    """The FastPath of a forward on `device`; `blocks_plain`: the blocks and norms are ours, unhooked and not
    checkpointed, so they need not be called as modules."""
    backend = resolve_backend(scan_backend_for(config), device)
    triton = backend == "triton"
    # Without gradients there is nothing to save; under torch.compile the custom ops are traced instead.
    training = triton and torch.is_grad_enabled() and not torch.compiler.is_compiling()
    return FastPath(backend, fused_blocks=triton and blocks_plain, training_kernels=training)


class MambaRMSNorm(nn.Module):
    def __init__(self, hidden_size, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states, path: FastPath | None = None):
        # Normalise in fp32, cast back, then scale: Transformers' Mamba order. In training the Triton norm takes
        # two launches where the ops take about a dozen.
        backend = "triton" if path is not None and path.training_kernels else "torch"
        hidden_fp32 = _fp32_or_wider(hidden_states)
        return rms_norm(hidden_fp32, self.weight, self.variance_epsilon, hidden_states.dtype, backend)

    def extra_repr(self):
        return f"{self.weight.shape[0]}, eps={self.variance_epsilon}"


class MambaDeltaProjection(nn.Linear):
    """dt_proj: a Linear whose forward returns W x *without* its bias.

    The bias is added in fp32 inside the scan, fused with the softplus, so Δ keeps full precision
    under bf16/fp16; calling the module (rather than reading its weight) keeps LoRA and other
    wrappers of dt_proj in the computation.
    """

    def __init__(self, in_features, out_features, device=None):
        super().__init__(in_features, out_features, bias=True, device=device)
        # fp32 whatever the default dtype the model is built under (see MambaMixer's SSM parameters).
        self.bias = nn.Parameter(torch.empty(out_features, dtype=torch.float32, device=device))

    def forward(self, x):
        return F.linear(x, self.weight)


class MambaMixer(nn.Module):
    """in_proj -> causal depthwise conv -> SiLU -> selective SSM (input-dependent Δ, B, C) -> gate -> out_proj."""

    def __init__(self, config: MambaConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.d_inner = config.intermediate_size
        self.d_state = config.state_size
        self.d_conv = config.conv_kernel
        self.dt_rank = int(config.time_step_rank)
        # Falcon Mamba: weight-free RMS norms on the time step (before dt_proj), B and C; None for Mamba.
        self.mixer_rms_eps = config.mixer_rms_eps
        self.activation = config.hidden_act
        self.act = ACT2FN[config.hidden_act]
        # SiLU is fused into the conv and the scan's gate; other activations run here.
        self.fused_silu = config.hidden_act in ("silu", "swish")

        self.in_proj = nn.Linear(config.hidden_size, 2 * self.d_inner, bias=config.use_bias)
        self.conv1d = nn.Conv1d(
            self.d_inner,
            self.d_inner,
            kernel_size=self.d_conv,
            groups=self.d_inner,
            padding=self.d_conv - 1,
            bias=config.use_conv_bias,
        )
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * self.d_state, bias=False)
        self.dt_proj = MambaDeltaProjection(self.dt_rank, self.d_inner)
        # S4D-real: A = -exp(A_log) with A_n = -(n + 1); stored as a log so A stays negative. A, D and the Δ bias
        # set the decay rates of the state: fp32 however the model is built (from_config(dtype=float16) builds
        # under that default dtype; from_pretrained keeps them fp32 by _keep_in_fp32_modules_strict).
        self.A_log = nn.Parameter(torch.empty(self.d_inner, self.d_state, dtype=torch.float32))
        self.D = nn.Parameter(torch.empty(self.d_inner, dtype=torch.float32))
        self.out_proj = nn.Linear(self.d_inner, config.hidden_size, bias=config.use_bias)

    def _conv(self, x, cache_params, continuing, seq_idx=None, backend=None):
        """Causal conv over a whole chunk, continuing from (and refreshing) the cached conv state."""
        weight = self.conv1d.weight.squeeze(1)  # (d_inner, d_conv)
        activation = "silu" if self.fused_silu else None
        # Copy: the cached window is overwritten in place just below.
        previous = cache_params.conv_states[self.layer_idx].clone() if continuing else None
        if cache_params is not None:
            if previous is None:
                window = F.pad(x, (self.d_conv, 0))  # (batch, d_inner, d_conv + seqlen)
            else:
                window = torch.cat([previous.to(x.dtype), x], dim=-1)
            cache_params.update_conv_state(window[:, :, -self.d_conv :], self.layer_idx)
        initial = previous[:, :, 1:] if previous is not None else None  # (batch, d_inner, d_conv - 1)
        out = causal_conv1d(
            x,
            weight,
            self.conv1d.bias,
            activation=activation,
            initial_state=initial,
            seq_idx=seq_idx,
            backend=backend if initial is None else "torch",  # the Triton conv starts from zeros only
            channels_last_out=True,  # x_proj reads it as (batch, seqlen, d_inner) without a copy
        )
        return out if self.fused_silu else self.act(out)

    def _ssm_params(self, x):
        """Δ (before bias), B, C from the conv output x (batch, d_inner, seqlen)."""
        x_dbl = self.x_proj(_linear_input(self.x_proj, x.transpose(1, 2)))  # (batch, seqlen, dt_rank + 2 * d_state)
        dt, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        if self.mixer_rms_eps is not None:  # Falcon Mamba, in the order of Transformers' FalconMambaMixer
            dt, B, C = (weightless_rms_norm(t, self.mixer_rms_eps) for t in (dt, B, C))
        # Channels-last views, no copies: the CPU scan and the Triton forward read them as they are (the
        # Triton backward copies what it needs along time into temporaries).
        dt = self.dt_proj(dt).transpose(1, 2)  # (batch, d_inner, seqlen)
        return dt, B.transpose(1, 2), C.transpose(1, 2)  # B, C: (batch, d_state, seqlen)

    def forward(
        self,
        hidden_states,
        cache_params: MambaCache | None = None,
        attention_mask=None,
        seq_idx=None,
        path: FastPath | None = None,
    ):
        """seq_idx: optional (batch, seqlen) document ids of packed sequences; state and conv restart at each.
        path: the model's FastPath for this forward (decided here when the mixer is called on its own)."""
        batch, seqlen, _ = hidden_states.shape
        path = path or decide_fast_path(self.config, hidden_states.device)
        backend = path.backend
        continuing = cache_params is not None and cache_params.seqlen_offset > 0
        if continuing and seq_idx is not None:
            raise ValueError("Packed sequences (seq_idx / restarting position_ids) cannot continue from a cache")
        if continuing and seqlen == 1:
            return self._step(hidden_states, cache_params, self._A(), backend)

        if self._fused_inner_ok(path, cache_params, attention_mask):
            weights = (
                self.conv1d.weight, self.conv1d.bias, self.x_proj.weight, self.dt_proj.weight,
                self.dt_proj.bias, self.A_log, self.D, self.out_proj.weight, self.out_proj.bias, seq_idx,
            )
            if self._plain_in_proj():  # in_proj inside too
                return mamba_inner_triton(
                    hidden_states, *weights, in_proj_weight=self.in_proj.weight, in_proj_bias=self.in_proj.bias,
                    mixer_rms_eps=self.mixer_rms_eps,
                )
            # e.g. LoRA on in_proj
            return mamba_inner_triton(self.in_proj(hidden_states), *weights, mixer_rms_eps=self.mixer_rms_eps)
        # 1. Gated MLP's linear projection: x for the SSM branch, z for the gate
        xz = self.in_proj(hidden_states)  # (batch, seqlen, 2 * d_inner)
        A = self._A()
        # Channels-last views, no copy: the Triton conv and the scan's forward read them as they are.
        x, z = (t.transpose(1, 2) for t in xz.chunk(2, dim=-1))  # (batch, d_inner, seqlen) each
        mask = attention_mask[:, None, :].to(x.dtype) if attention_mask is not None else None
        if mask is not None:
            x = x * mask  # padded inputs never reach the conv window
        # 2. Causal depthwise convolution (+ SiLU), continuing the cached window
        x = self._conv(x, cache_params, continuing, seq_idx, backend)
        if mask is not None:
            x = x * mask
        # 3. Selective SSM: input-dependent Δ, B, C, then the scan (D skip and SiLU(z) gate inside)
        dt, B, C = self._ssm_params(x)

        dt_bias = _fp32_or_wider(self.dt_proj.bias)
        if mask is not None:
            # Δ = 0 at padding: Ā = 1 and B̄x = 0, so the state passes through padded positions unchanged.
            dt = F.softplus(_fp32_or_wider(dt) + dt_bias[:, None]) * mask
            dt_bias, softplus = None, False
        else:
            softplus = True
        scan = selective_scan(
            x,
            dt,
            A,
            B,
            C,
            D=_fp32_or_wider(self.D),
            z=z if self.fused_silu else None,
            delta_bias=dt_bias,
            delta_softplus=softplus,
            initial_state=cache_params.ssm_states[self.layer_idx] if continuing else None,
            return_final_state=cache_params is not None,
            backend=backend,
            seq_idx=seq_idx,
        )
        if cache_params is not None:
            y, final_state = scan
            cache_params.update_recurrent_state(final_state, self.layer_idx)
        else:
            y = scan
        if not self.fused_silu:
            y = y * self.act(z)
        # 4. Output projection
        return self.out_proj(_linear_input(self.out_proj, y.transpose(1, 2)))  # (batch, seqlen, hidden_size)

    def _A(self):
        return -torch.exp(_fp32_or_wider(self.A_log))  # (d_inner, d_state), negative

    def _fused_inner_ok(self, path, cache_params, attention_mask):
        """Whether training can run the mixer after in_proj (and in_proj too, where it is a plain Linear)
        as one function (`mamba_inner_triton`: less memory, fewer ops), computing what the modules would."""
        if not path.training_kernels or cache_params is not None or attention_mask is not None or not self.fused_silu:
            return False
        modules = ((self.conv1d, nn.Conv1d), (self.x_proj, nn.Linear), (self.dt_proj, MambaDeltaProjection),
                   (self.out_proj, nn.Linear))
        # LoRA and other wrappers replace or hook these modules: then the modules must run.
        return all(type(m) is cls and _unhooked(m) for m, cls in modules)

    def _plain_in_proj(self):
        """in_proj is a plain, unhooked Linear: the fused mixer may run it itself, and autocast's cast of
        its input is all that reads the mixer's input."""
        return type(self.in_proj) is nn.Linear and _unhooked(self.in_proj)

    def _step(self, hidden_states, cache_params, A, backend):
        """One decode step from the cache: O(1) in the number of tokens already seen."""
        xz = self.in_proj(hidden_states[:, 0])  # (batch, 2 * d_inner)
        x, z = xz.chunk(2, dim=-1)  # (batch, d_inner) each
        weight = self.conv1d.weight.squeeze(1)  # (d_inner, d_conv)
        conv_state = cache_params.conv_states[self.layer_idx]
        x = causal_conv1d_update(
            x, conv_state, weight, self.conv1d.bias, "silu" if self.fused_silu else None, backend=backend
        )
        if not self.fused_silu:
            x = self.act(x)
        dt, B, C = self._ssm_params(x[:, :, None])
        y = selective_state_update(
            cache_params.ssm_states[self.layer_idx],
            x,
            dt[:, :, 0],
            A,
            B[:, :, 0],
            C[:, :, 0],
            D=_fp32_or_wider(self.D),
            z=z if self.fused_silu else None,
            dt_bias=_fp32_or_wider(self.dt_proj.bias),
            dt_softplus=True,
            backend=backend,
        )
        if not self.fused_silu:
            y = y * self.act(z)
        return self.out_proj(y)[:, None, :]  # (batch, 1, hidden_size)


def _in_proj_input_dtype(mixer, norm_weight):
    """The dtype a norm may round its output to for the mixer after it: autocast's where in_proj, a
    plain Linear that only it reads its input through, would cast to that dtype anyway; else None
    (the weight's dtype, as the norm computes it)."""
    device_type = norm_weight.device.type
    if mixer is None or not torch.is_autocast_enabled(device_type) or norm_weight.dtype == torch.float64:
        return None
    if type(mixer) is MambaMixer and _unhooked(mixer) and mixer._plain_in_proj():
        return torch.get_autocast_dtype(device_type)
    return None


class MambaBlock(GradientCheckpointingLayer):
    """Pre-norm residual block: h + mixer(norm(h)), with the residual stream optionally in fp32.

    A GradientCheckpointingLayer: with activation checkpointing on, Transformers recomputes it in the backward.
    """

    def __init__(self, config: MambaConfig, layer_idx: int):
        super().__init__()
        self.residual_in_fp32 = config.residual_in_fp32
        self.norm = MambaRMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.mixer = MambaMixer(config, layer_idx=layer_idx)

    def forward(self, hidden_states, cache_params=None, attention_mask=None, seq_idx=None, path=None):
        residual = self.residual_of(hidden_states)
        hidden_states = self.norm(hidden_states.to(self.norm.weight.dtype), path=path)
        hidden_states = self.mixer(
            hidden_states, cache_params=cache_params, attention_mask=attention_mask, seq_idx=seq_idx, path=path
        )
        return residual + hidden_states

    def residual_of(self, hidden_states):
        """The residual stream this block adds its mixer output to (fp32 with residual_in_fp32)."""
        return _fp32_or_wider(hidden_states) if self.residual_in_fp32 else hidden_states


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


def _one_cache(cache_params, cache):
    """The cache passed under either name (`cache_params` or Transformers 5.24's `cache`)."""
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


def _check_inputs(input_ids, inputs_embeds, attention_mask, vocab_size):
    """Raise ValueError with the offending argument for anything the forward cannot use."""
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("Pass exactly one of input_ids or inputs_embeds, not both and not neither")
    if input_ids is not None:
        if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
            raise ValueError(f"input_ids must be an integer tensor, got dtype {input_ids.dtype}")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape (batch, seqlen), got {tuple(input_ids.shape)}")
        shape = tuple(input_ids.shape)
        # The value check reads the ids back to the host: impossible while compiling or capturing a graph.
        tracing = torch.compiler.is_compiling() or (input_ids.is_cuda and torch.cuda.is_current_stream_capturing())
        if input_ids.numel() and not tracing:
            # One reduction and one read-back (a decode step pays this per token, outside its graph).
            lowest, highest = torch.aminmax(input_ids)
            lowest, highest = torch.stack((lowest, highest)).tolist()
            if lowest < 0 or highest >= vocab_size:
                bad = lowest if lowest < 0 else highest
                raise ValueError(f"input_ids must lie in [0, vocab_size={vocab_size}), found {bad}")
    else:
        if inputs_embeds.dim() != 3:
            raise ValueError(
                f"inputs_embeds must have shape (batch, seqlen, hidden_size), got {tuple(inputs_embeds.shape)}"
            )
        shape = tuple(inputs_embeds.shape[:2])
    if shape[1] == 0:
        raise ValueError("The input sequence is empty (seqlen 0); pass at least one token")
    if attention_mask is not None and tuple(attention_mask.shape) != shape:
        raise ValueError(
            f"attention_mask must have shape (batch, seqlen) = {shape}, got {tuple(attention_mask.shape)}"
        )


def _document_ids(position_ids, shape):
    """Document ids (batch, seqlen) of packed sequences, from position_ids that restart at 0 for each
    document (Transformers' DataCollatorWithFlattening); None when no row restarts."""
    if position_ids is None:
        return None
    if tuple(position_ids.shape) != shape:
        raise ValueError(f"position_ids must have shape (batch, seqlen) = {shape}, got {tuple(position_ids.shape)}")
    restarts = position_ids[:, 1:] == 0
    if not torch.compiler.is_compiling() and not bool(restarts.any()):
        return None
    return F.pad(restarts.cumsum(-1), (1, 0)).to(torch.int32)


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
        return self.norm_f(hidden_states.to(self.norm_f.weight.dtype), path=path)

    def _plain_blocks_and_norms(self):
        """At least one block, and blocks and norms as defined here, without hooks and not checkpointed: then the
        blocks may run as `_blocks_fused_norms` runs them, without calling the blocks and norms themselves."""
        norms = [block.norm for block in self.layers] + [self.norm_f]
        return (
            len(self.layers) > 0
            and not self._checkpointing()
            and all(type(block) is MambaBlock and _unhooked(block) for block in self.layers)
            and all(type(norm) is MambaRMSNorm and _unhooked(norm) for norm in norms)
        )

    def _blocks_fused_norms(self, hidden_states, cache_params, attention_mask, seq_idx, path, all_hidden=None):
        """What the blocks and the final norm compute (MambaBlock.forward), with each residual add fused
        with the norm after it (`add_rms_norm`: one launch forward and one backward where the ops take
        about five more per layer, which a host-bound training step and a CUDA-graph decode step pay
        for). Appends each block's output to all_hidden if given; returns norm_f's output."""
        layers = self.layers
        normed = layers[0].norm(hidden_states.to(layers[0].norm.weight.dtype), path=path)
        for block, next_block in zip(layers, [*layers[1:], None], strict=True):
            delta = block.mixer(
                normed, cache_params=cache_params, attention_mask=attention_mask, seq_idx=seq_idx, path=path
            )
            next_norm = next_block.norm if next_block is not None else self.norm_f
            next_mixer = next_block.mixer if next_block is not None else None
            hidden_states, normed = add_rms_norm(
                block.residual_of(hidden_states), delta, next_norm.weight, next_norm.variance_epsilon, path.backend,
                out_dtype=_in_proj_input_dtype(next_mixer, next_norm.weight),
            )
            if all_hidden is not None:
                all_hidden.append(hidden_states)
        return normed

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        cache_params: MambaCache | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: MambaCache | None = None,
        new_cache: Callable[..., MambaCache] | None = None,
        **kwargs,
    ) -> tuple | MambaOutput:
        """
        Args:
            input_ids: (batch, seqlen) token ids, or inputs_embeds (batch, seqlen, hidden_size).
            cache_params: a MambaCache to continue from and update in place (`cache` is the same argument
                under Transformers 5.24's name).
            use_cache: create (if needed) and return a cache; defaults to config.use_cache outside training.
            attention_mask: (batch, seqlen), 1 for tokens and 0 for padding; padding leaves the state unchanged.
            position_ids: (batch, seqlen); Mamba needs no positions, but where they restart at 0 inside a row
                (packed documents, as DataCollatorWithFlattening makes) the state and conv restart there.
            new_cache: makes the cache of a new sequence from (batch, dtype, device); default a fresh MambaCache.
                MambaForCausalLM passes one that reuses the states of its pooled decode graphs.
        """
        _check_inputs(input_ids, inputs_embeds, attention_mask, self.config.vocab_size)
        cache_params = _one_cache(cache_params, cache)
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        use_cache = use_cache if use_cache is not None else (self.config.use_cache and not self.training)
        if self._checkpointing():
            use_cache = False  # recomputation would advance the cache twice
        if inputs_embeds is None:
            inputs_embeds = self.embeddings(input_ids)
        batch, seqlen = inputs_embeds.shape[:2]
        if use_cache and cache_params is None:
            args = (batch, inputs_embeds.dtype, inputs_embeds.device)
            cache_params = new_cache(*args) if new_cache is not None else MambaCache(self.config, *args)
        if not use_cache:
            cache_params = None
        if cache_params is not None and cache_params.batch_size != batch:
            raise ValueError(f"cache_params holds {cache_params.batch_size} sequences but the input has {batch}")
        if attention_mask is not None and not torch.compiler.is_compiling() and bool(attention_mask.all()):
            attention_mask = None  # no padding: take the fused path
        seq_idx = _document_ids(position_ids, (batch, seqlen))

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


def _graph_fingerprint_sees(module):
    """Whether a module's forward depends only on what _decode_graph_fingerprint covers: ours, torch.nn's
    and Transformers' activations. Wrappers (PEFT's LoRA, quantized linears) also keep Python state that a
    graph bakes in (merged, adapters disabled), which no fingerprint sees."""
    origin = type(module).__module__
    return origin == __name__ or origin.startswith(("torch.nn.", "transformers.activations"))


class MambaForCausalLM(MambaPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "backbone.embeddings.weight"}

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

    def _decode_step_logits(self, input_ids, cache_params):
        """Logits (batch, 1, vocab) of one token on top of the cache; advances the states, not the offset."""
        backbone = self.backbone
        hidden_states = backbone.embeddings(input_ids)
        path = decide_fast_path(self.config, hidden_states.device, backbone._plain_blocks_and_norms())
        hidden_states = backbone._run_blocks(hidden_states, cache_params, None, None, path)
        return self.lm_head(hidden_states.to(self.lm_head.weight.dtype))

    def _cuda_graphs_on(self, device):
        """Whether decode steps on `device` may replay CUDA graphs (the CPU tests patch it, with a fake graph)."""
        return self.config.use_cuda_graph and device.type == "cuda"

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
        """The cache MambaModel creates for a new sequence: from the decode-graph pool when its decode steps
        will replay graphs and the pool's fingerprint sees everything they depend on."""
        if (
            self._cuda_graphs_on(device)
            and not torch.is_grad_enabled()
            and not torch.compiler.is_compiling()
            and all(_graph_fingerprint_sees(module) for module in self.modules())
            # Tensor subclasses (quantized, DTensor) may have no single data_ptr for the fingerprint.
            and all(type(t) in (torch.Tensor, nn.Parameter) for t in self._weights())
        ):
            return self._decode_graphs.new_cache(self.config, batch, dtype, device)
        return MambaCache(self.config, batch, dtype=dtype, device=device)

    def _weights(self):
        return itertools.chain(self.parameters(), self.buffers())

    def _decode_graph_fingerprint(self):
        """What a captured decode step reads besides its cache, unchanged since the capture for a replay to be
        right: each weight's address and layout (`to()`, `load_state_dict(assign=True)` move them), each
        module's type, hooks and replaced forward (a replay runs none), the fused body's and the scan
        backend's choice, autocast."""
        from torch.nn.modules import module as module_globals

        weights = tuple((t.data_ptr(), t.dtype, t.shape, t.stride()) for t in self._weights())
        modules = tuple(
            (type(m), tuple(m._forward_pre_hooks), tuple(m._forward_hooks), m.__dict__.get("forward"))
            for m in self.modules()
        )
        global_hooks = (tuple(module_globals._global_forward_pre_hooks), tuple(module_globals._global_forward_hooks))
        autocast = (torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"))
        plain = self.backbone._plain_blocks_and_norms()
        return weights, modules, global_hooks, plain, scan_backend_for(self.config), autocast

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        cache_params: MambaCache | None = None,
        labels: torch.LongTensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        position_ids: torch.LongTensor | None = None,
        cache: MambaCache | None = None,
        **kwargs,
    ) -> tuple | MambaCausalLMOutput:
        """
        Args:
            labels: (batch, seqlen) targets, shifted inside (labels = input_ids works); -100 is ignored.
            logits_to_keep: compute logits for the last N positions only (0 = all), or for the given indices.
            Others: see MambaModel.forward.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        cache_params = _one_cache(cache_params, cache)
        if self._use_decode_graph(
            input_ids,
            cache_params,
            use_cache,
            (attention_mask, inputs_embeds, labels, output_hidden_states, position_ids),
        ):
            _check_inputs(input_ids, None, None, self.config.vocab_size)
            logits = self._decode_graphs.decode(
                self._decode_step_logits, self._decode_graph_fingerprint, cache_params, input_ids
            )
            cache_params.seqlen_offset += 1
            return (
                MambaCausalLMOutput(logits=logits, **{CACHE_FIELD: cache_params})
                if return_dict
                else (logits, cache_params)
            )
        outputs = self.backbone(
            input_ids,
            inputs_embeds=inputs_embeds,
            cache_params=cache_params,
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


__all__ = [
    "MambaCausalLMOutput",
    "MambaForCausalLM",
    "MambaForSequenceClassification",
    "MambaModel",
    "MambaOutput",
    "MambaPreTrainedModel",
]
