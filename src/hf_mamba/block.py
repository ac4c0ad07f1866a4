"""The Mamba block: RMSNorm -> MambaMixer (the selective SSM), with a residual around it.

MambaMixer: in_proj -> causal depthwise conv -> SiLU -> selective SSM (input-dependent Δ, B, C; ZOH;
A = -exp(A_log); D skip) -> gate by SiLU(z) -> out_proj. Parameter names and shapes are those of
Transformers' built-in Mamba. The kernels it calls live in `hf_mamba.kernels`; which of them run is the
FastPath the model decides once per forward (`fast_path.py`).
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer

from .cache import MambaCache
from .configuration_mamba import MambaConfig
from .fast_path import FastPath, decide_fast_path, fused_weight, plain
from .kernels import (
    causal_conv1d,
    causal_conv1d_update,
    compute_dtype,
    few_rows_linear,
    fp32_or_wider,
    mamba_inner_triton,
    mamba_step_triton,
    rms_norm,
    selective_scan,
    selective_state_update,
    to_fp16_range,
    weightless_rms_norms,
    y_dtype,
)

# The fused decode step (two launches per mixer) against the modules' four to six, H100, bf16, generate()
# tokens/s fused / modules (docs/kernels.md). Each row's programs of its second kernel read dt_proj's tile and
# all the partial sums of x_proj, traffic that grows as batch x d_inner^2 (dt_rank and the number of partial
# sums both grow with d_inner), where cuBLAS reads each weight once: faster at every batch measured up to d_inner
# 2048 (1536: 1.29-1.37 at batch 1, 1.09-1.16 at 16), and above it while batch x d_inner^2 <= 2^27 (4096: 1.23-1.29
# at batch 1, 1.19 at 2, 1.15 at 4, 1.06 at 8, 0.97-0.99 at 16; 8192: 1.09 at batch 1, 1.02 at 2, 0.95 at 4).
FUSED_STEP_MAX_D_INNER = 2048
FUSED_STEP_MAX_BATCH_D_INNER_SQUARED = 2**27


def fused_step_pays(batch, d_inner):
    """Whether the fused decode step beats the modules' at this batch size and width (measured above)."""
    return d_inner <= FUSED_STEP_MAX_D_INNER or batch * d_inner**2 <= FUSED_STEP_MAX_BATCH_D_INNER_SQUARED


# A decode step's in_proj and out_proj as one Triton launch (`few_rows_linear`) instead of cuBLAS's GEMM (with a
# split-K reduction at some shapes), for batches of up to 16 rows and weights of at least 2^22 elements. H100,
# bf16, decode tokens/s with it against cuBLAS, on the step each batch takes: 1.4B (weights of 8.4M and 16.8M
# elements) and Falcon Mamba 7B 1.00-1.02 at batch 1, 4 and 16 (1.04 for 1.4B's fused step at 16); 130M (1.2M
# and 2.4M) 0.96-1.00, so its small weights stay on cuBLAS.
FEW_ROWS_LINEAR_ROWS = range(1, 17)  # up to kernels.few_rows.MAX_ROWS (not imported here: that module needs Triton)
FEW_ROWS_LINEAR_MIN_WEIGHT = 2**22


def project(linear, x, backend=None):
    """linear(x). On the Triton backend, a decode step's few rows go through `few_rows_linear` where that pays
    (a large weight, measured above) and computes what calling the module would: a plain 16-bit nn.Linear, x
    in its dtype, no autocast to apply and no gradient to track."""
    weight = getattr(linear, "weight", None)
    if (
        backend == "triton"
        and x.numel() // max(x.shape[-1], 1) in FEW_ROWS_LINEAR_ROWS
        and plain(linear, nn.Linear)
        and weight.numel() >= FEW_ROWS_LINEAR_MIN_WEIGHT
        and x.dtype == weight.dtype in (torch.bfloat16, torch.float16)
        and not torch.is_autocast_enabled(x.device.type)
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
        and not torch.compiler.is_compiling()
    ):
        return few_rows_linear(x, weight, linear.bias)
    return linear(_linear_input(linear, x))


def _linear_input(linear, x):
    """x as a projection should read it: the channels-last view itself for a plain nn.Linear, or an adapter over
    one (its matmul reads strides), a contiguous copy for anything else (bitsandbytes' CPU 4-bit kernel reads a
    strided input wrong)."""
    return x if type(getattr(linear, "base_layer", linear)) is nn.Linear else x.contiguous()


class ScaledOutput(NamedTuple):
    """A mixer's output as out * scale, not yet multiplied: out is out_proj's fp16 result, scale (..., 1) fp32
    powers of two, one per token (`MambaMixer._out_proj`)."""

    out: torch.Tensor
    scale: torch.Tensor


class MambaRMSNorm(nn.Module):
    def __init__(self, hidden_size, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states, path: FastPath | None = None, dtype: torch.dtype | None = None):
        # Normalise in fp32, round to `dtype` (by default the input's), then scale: Transformers' Mamba order.
        # The blocks pass the residual stream as it is (fp32 with residual_in_fp32) and the weight's dtype:
        # cast to fp16 first, a residual above 65504 would be inf and the normalised row NaN. On the Triton
        # backend the norm is one launch forward (the first block's norm of a decode step, where the ops take
        # seven) and one backward, where the ops take about a dozen in training.
        backend = "triton" if path is not None and path.backend == "triton" else "torch"
        hidden_fp32 = fp32_or_wider(hidden_states)
        return rms_norm(hidden_fp32, self.weight, self.variance_epsilon, dtype or hidden_states.dtype, backend)

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
        # fp16: the mixer's output stays fp32 where the residual stream it is added to is fp32 (`_fp16_result`)
        self.residual_in_fp32 = config.residual_in_fp32

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
        previous = cache_params.conv_states[self.layer_idx] if continuing else None
        initial = previous[:, :, 1:] if previous is not None else None  # (batch, d_inner, d_conv - 1)
        out = causal_conv1d(
            x,
            weight,
            self.conv1d.bias,
            activation=activation,
            initial_state=initial,
            seq_idx=seq_idx,
            backend=backend,
            channels_last_out=True,  # x_proj reads it as (batch, seqlen, d_inner) without a copy
        )
        if cache_params is not None:  # the new window, after the conv read the old: the last d_conv inputs
            tail = x[:, :, -self.d_conv :]
            if previous is None:  # zeros before the first input (a chunk shorter than the window)
                window = F.pad(tail, (self.d_conv - tail.shape[-1], 0)) if tail.shape[-1] < self.d_conv else tail
            else:  # a new tensor (cat) before the copy into the old window's storage
                window = torch.cat([previous.to(x.dtype), tail], dim=-1)[:, :, -self.d_conv :]
            cache_params.update_conv_state(window, self.layer_idx)
        return out if self.fused_silu else self.act(out)

    def _ssm_params(self, x, backend):
        """Δ (before bias), B, C from the conv output x (batch, d_inner, seqlen)."""
        x_dbl = self.x_proj(_linear_input(self.x_proj, x.transpose(1, 2)))  # (batch, seqlen, dt_rank + 2 * d_state)
        sizes = [self.dt_rank, self.d_state, self.d_state]
        if self.mixer_rms_eps is not None:  # Falcon Mamba, in the order of Transformers' FalconMambaMixer
            dt, B, C = weightless_rms_norms(x_dbl, sizes, self.mixer_rms_eps, backend=backend)
        else:
            dt, B, C = torch.split(x_dbl, sizes, dim=-1)
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
        defer_scale: bool = False,
    ):
        """seq_idx: optional (batch, seqlen) document ids of packed sequences; state and conv restart at each.
        path: the model's FastPath for this forward (decided here when the mixer is called on its own).
        defer_scale: where out_proj multiplies a y scaled into fp16's range (`_out_proj`) without gradients,
        return a `ScaledOutput` and leave the multiply by the scale to the caller (the model's residual add, one
        launch fewer per layer)."""
        batch, seqlen, _ = hidden_states.shape
        path = path or decide_fast_path(self.config, hidden_states.device)
        backend = path.backend
        if cache_params is not None:
            cache_params.place_layer(self.layer_idx, hidden_states.device)
        continuing = cache_params is not None and cache_params.seqlen_offset > 0
        if continuing and seq_idx is not None:
            raise ValueError("Packed sequences (seq_idx / restarting position_ids) cannot continue from a cache")
        if continuing and seqlen == 1:
            return self._step(hidden_states, cache_params, backend, defer_scale)

        ssm_weights = self._fused_ssm_weights(path, cache_params)
        if ssm_weights is not None:
            return self._fused_inner(hidden_states, *ssm_weights, seq_idx, attention_mask, defer_scale)
        # 1. Gated MLP's linear projection: x for the SSM branch, z for the gate
        xz = self.in_proj(hidden_states)  # (batch, seqlen, 2 * d_inner)
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
        dt, B, C = self._ssm_params(x, backend)

        dt_bias = fp32_or_wider(self.dt_proj.bias)
        if mask is not None:
            # Δ = 0 at padding: Ā = 1 and B̄x = 0, so the state passes through padded positions unchanged.
            dt = F.softplus(fp32_or_wider(dt) + dt_bias[:, None]) * mask
            dt_bias, softplus = None, False
        else:
            softplus = True
        y_out_dtype = y_dtype(x.dtype)
        scan = selective_scan(
            x,
            dt,
            fp32_or_wider(self.A_log),  # A = -exp(A_log): in the kernels where nothing needs gradients
            B,
            C,
            D=fp32_or_wider(self.D),
            z=z if self.fused_silu else None,
            delta_bias=dt_bias,
            delta_softplus=softplus,
            initial_state=cache_params.ssm_states[self.layer_idx] if continuing else None,
            return_final_state=cache_params is not None,
            backend=backend,
            seq_idx=seq_idx,
            A_is_log=True,
            out_dtype=y_out_dtype,
        )
        if cache_params is not None:
            y, final_state = scan
            cache_params.update_recurrent_state(final_state, self.layer_idx)
        else:
            y = scan
        if not self.fused_silu:
            y = y * self.act(z)
        # 4. Output projection
        return self._out_proj(y.transpose(1, 2), y_out_dtype is not None, defer_scale)  # (batch, seqlen, hidden)

    def _fused_ssm_weights(self, path, cache_params):
        """x_proj's and dt_proj's weights where training may run the mixer as one function
        (`mamba_inner_triton`: less memory, fewer ops), computing what the modules would (a padding mask
        included: it masks as the code below does); None where the modules must run.

        The weights are the modules' own, or what a 4-bit base or a LoRA adapter over one multiplies by
        (`fused_weight`: a QLoRA model runs fused too, its adapters' gradients through the merged weight;
        merging is cheap for these two small projections). in_proj and out_proj run inside where they are
        plain Linears, else as modules around it."""
        if not path.training_kernels or cache_params is not None or not self.fused_silu:
            return None
        if not plain(self.conv1d, nn.Conv1d):
            return None
        x_proj_weight = fused_weight(self.x_proj, nn.Linear)
        dt_proj_weight = fused_weight(self.dt_proj, MambaDeltaProjection)
        if x_proj_weight is None or dt_proj_weight is None:
            return None
        return x_proj_weight, dt_proj_weight

    def _fused_inner(self, hidden_states, x_proj_weight, dt_proj_weight, seq_idx, attention_mask, defer_scale):
        """The mixer through `mamba_inner_triton`, in_proj and out_proj inside where they are plain Linears."""
        # A plain in_proj inside: autocast's cast of the mixer's input is then all that reads that input.
        in_proj_inside = plain(self.in_proj, nn.Linear)
        out_proj_inside = plain(self.out_proj, nn.Linear)
        x_in = hidden_states if in_proj_inside else self.in_proj(hidden_states)  # e.g. LoRA on in_proj: outside
        out = mamba_inner_triton(
            x_in,
            self.conv1d.weight, self.conv1d.bias, x_proj_weight, dt_proj_weight, self.dt_proj.bias, self.A_log,
            self.D, self.out_proj.weight if out_proj_inside else None,
            self.out_proj.bias if out_proj_inside else None, seq_idx,
            in_proj_weight=self.in_proj.weight if in_proj_inside else None,
            in_proj_bias=self.in_proj.bias if in_proj_inside else None,
            mixer_rms_eps=self.mixer_rms_eps, attention_mask=attention_mask,
        )
        # in fp16, out is fp32 (`mamba_inner_triton`): out_proj's scaled result, or y
        fp16 = y_dtype(compute_dtype(x_in)) is not None
        if not out_proj_inside:
            return self._out_proj(out, fp16, defer_scale)
        return self._fp16_result(out) if fp16 else out

    def _out_proj(self, y, in_fp16_range, defer_scale=False, backend=None):
        """out_proj (any module: an adapter, a 4-bit base) of y (..., d_inner). With in_fp16_range (y in fp32 where
        the matmuls run in fp16, `y_dtype`) y goes in as y / s in fp16, s a power of two per token
        (`to_fp16_range`), and the result comes out in fp32 times s (out_proj's bias, where it has one, taken
        out first and added back), or with defer_scale, where nothing needs gradients and out_proj has no bias,
        as the ScaledOutput (out_proj's fp16 result, s). `backend`: a decode step's (`project`)."""
        if not in_fp16_range:
            return project(self.out_proj, y, backend)
        y_in_range, scale = to_fp16_range(y)
        out = project(self.out_proj, y_in_range, backend)
        bias = getattr(self.out_proj, "bias", None)
        if bias is None:
            if defer_scale and not (torch.is_grad_enabled() and out.requires_grad):
                return ScaledOutput(out, scale)
            return self._fp16_result(out * scale)  # fp16 times fp32 (not 0-dim): fp32
        return self._fp16_result((out.float() - bias.float()) * scale + bias.float())

    def _fp16_result(self, out):
        """The mixer's output computed in fp32 from a y scaled into fp16's range: kept in fp32 where the residual
        stream it is added to is fp32 (no rounding in between), else rounded to fp16, as out_proj's own output
        would be, so that the stream keeps its dtype."""
        return out if self.residual_in_fp32 else out.half()

    def _plain_ssm_modules(self):
        """conv1d, x_proj and dt_proj are plain, unhooked modules and the activation is SiLU: a fused kernel may
        read their weights itself. LoRA and other wrappers replace or hook modules: then the modules must run."""
        modules = ((self.conv1d, nn.Conv1d), (self.x_proj, nn.Linear), (self.dt_proj, MambaDeltaProjection))
        return self.fused_silu and all(plain(m, cls) for m, cls in modules)

    def _step(self, hidden_states, cache_params, backend, defer_scale=False):
        """One decode step from the cache: O(1) in the number of tokens already seen."""
        xz = project(self.in_proj, hidden_states[:, 0], backend)  # (batch, 2 * d_inner)
        weight = self.conv1d.weight.squeeze(1)  # (d_inner, d_conv)
        conv_state = cache_params.conv_states[self.layer_idx]
        fused = backend == "triton" and xz.dtype != torch.float64 and not torch.compiler.is_compiling()
        y_out_dtype = y_dtype(xz.dtype)
        if fused and fused_step_pays(xz.shape[0], self.d_inner) and self._plain_ssm_modules():
            # conv, x_proj, dt_proj and the state update in two launches instead of four (a decode step is
            # bound by its launches); torch.compile traces the modules' custom ops instead
            y = mamba_step_triton(
                xz, conv_state, weight, self.conv1d.bias, self.x_proj.weight, self.dt_proj.weight,
                self.dt_proj.bias, self.A_log, self.D, cache_params.ssm_states[self.layer_idx],
                mixer_rms_eps=self.mixer_rms_eps, out_dtype=y_out_dtype,
            )
            return self._out_proj(y[:, None, :], y_out_dtype is not None, defer_scale, backend)  # (batch, 1, hidden)
        x, z = xz.chunk(2, dim=-1)  # (batch, d_inner) each
        x = causal_conv1d_update(
            x, conv_state, weight, self.conv1d.bias, "silu" if self.fused_silu else None, backend=backend
        )
        if not self.fused_silu:
            x = self.act(x)
        dt, B, C = self._ssm_params(x[:, :, None], backend)
        y = selective_state_update(
            cache_params.ssm_states[self.layer_idx],
            x,
            dt[:, :, 0],
            fp32_or_wider(self.A_log),  # A = -exp(A_log) inside: no exp and negation launches per layer
            B[:, :, 0],
            C[:, :, 0],
            D=fp32_or_wider(self.D),
            z=z if self.fused_silu else None,
            dt_bias=fp32_or_wider(self.dt_proj.bias),
            dt_softplus=True,
            backend=backend,
            A_is_log=True,
            out_dtype=y_out_dtype,
        )
        if not self.fused_silu:
            y = y * self.act(z)
        return self._out_proj(y[:, None, :], y_out_dtype is not None, defer_scale, backend)  # (batch, 1, hidden)


def norm_output_dtype(mixer, norm_weight):
    """The dtype a norm may round its output to for the mixer after it: autocast's where in_proj, a
    plain Linear that only it reads its input through, would cast to that dtype anyway; else None
    (the weight's dtype, as the norm computes it)."""
    device_type = norm_weight.device.type
    if mixer is None or not torch.is_autocast_enabled(device_type) or norm_weight.dtype == torch.float64:
        return None
    if plain(mixer, MambaMixer) and plain(mixer.in_proj, nn.Linear):
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
        hidden_states = self.norm(hidden_states, path=path, dtype=self.norm.weight.dtype)
        hidden_states = self.mixer(
            hidden_states, cache_params=cache_params, attention_mask=attention_mask, seq_idx=seq_idx, path=path
        )
        return residual + hidden_states

    def residual_of(self, hidden_states):
        """The residual stream this block adds its mixer output to (fp32 with residual_in_fp32)."""
        return fp32_or_wider(hidden_states) if self.residual_in_fp32 else hidden_states
