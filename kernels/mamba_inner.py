"""The Mamba mixer (from in_proj's output, or with in_proj) as one autograd function for training on
the Triton kernels.

    out = out_proj( scan( u = SiLU(conv(x)), Δ = dt_proj(dt), B, C, z ) ),   (dt, B, C) = x_proj(u),
    with (x, z) = xz = in_proj(hidden), (batch, seqlen, 2 * d_inner).

Why one function instead of the modules one after another: it keeps less for the backward and
launches fewer host ops. Composed from modules, autograd keeps the conv output u (for x_proj and the
scan), Δ (for the scan) and the scan output y (for out_proj's weight gradient): 3 x (batch, seqlen,
d_inner) per layer. Here the forward keeps only xz, the small x_proj output and the weights in the
matmul dtype (under autocast, bf16 copies of three small weights); the backward recomputes
u with the conv kernel and Δ with one matmul (both cheap), and y comes out of the scan's backward
kernel, which recomputes it for dz anyway. mamba_ssm's mamba_inner_fn recomputes u and Δ the same
way, but keeps y. The backward also produces u, Δ and dy time-contiguous, the layout the scan's
backward reads, instead of transposing them.

With in_proj inside too (the model passes its weight where in_proj is a plain Linear), its autocast
cast joins the other weights' one copy, its weight gradient comes out of one matmul in fp32, and the
five autograd nodes of an autocast Linear (cast, matmul, transpose and two views) are not made: the
training step is host-bound, and each node and launch costs host time.

Falcon Mamba (mixer_rms_eps given): weight-free RMS norms on x_proj's three outputs, the time step (before
dt_proj), B and C, as the modules compute them. The forward keeps the normalised copy beside x_proj's output
(rows x (dt_rank + 2 d_state), small), so the backward reads it instead of relaunching the norms, and passes
the gradients through them exactly from x_proj's output (mamba_ssm's fused function normalises Δ after dt_proj
instead and passes no gradient through its norms).

Padding (attention_mask, 0 at padding) as the modules compute it: x * mask before the conv, the conv
output * mask, and Δ = 0 at padding, so that Ā = 1 and B̄x = 0 carry the state through padded steps
unchanged (left or right padding, holes). The conv kernels read the mask (no elementwise passes), and Δ
gets -inf before its softplus at padding: softplus(-inf) = 0 exactly and its derivative sigmoid(-inf)
= 0, so the scan kernels run unchanged. That -inf is one in-place add of a per-step vector (0 or -inf)
to Δ in the forward, and the bias of the matmul that recomputes Δ in the backward. z is not masked;
at padding y = 0 anyway (C = 0 and u = 0 there), so the output there is out_proj's bias, as the
modules give. Combined with seq_idx (packed documents, padded rows) both apply, as in the modules.

In fp16 the gated scan output y is kept in fp32 and scaled into fp16's range for out_proj by a power of two
(`fp16_range_scale`): where training takes y past 65504, the modules' fp16 y would be inf on every batch,
which no loss scale avoids (docs/reliability.md). bf16 and fp32 run as described above.

The model uses this only where it computes exactly what the modules would: a plain Conv1d, and x_proj and
dt_proj weights it can read (the modules' own, a 4-bit base's dequantized, or with vanilla LoRA adapters merged
in: `hf_mamba.fast_path.fused_weight`); in_proj and out_proj run inside where they are plain Linears, else as
modules around it (with out_proj_weight None this returns out_proj's input). No cache, not under torch.compile.
"""

import weakref

import torch
import torch.nn.functional as F

from ._launch import compile_ahead, device_guard
from .fp16_range import fp16_range_scale, y_dtype
from .rms_norm import _one_launch, weightless_rms_norms, weightless_rms_norms_backward_
from .selective_scan.reference import fp32_or_wider

# The inputs of `_MambaInner`, in order: its backward returns their gradients by these names.
_INPUTS = (
    "x_in", "in_proj_weight", "in_proj_bias", "conv_weight", "conv_bias", "x_proj_weight", "dt_proj_weight",
    "dt_proj_bias", "A_log", "D", "out_proj_weight", "out_proj_bias", "seq_idx", "attention_mask", "mixer_rms_eps",
)
# The calls (`_call_key`) whose kernels have been compiled ahead. A new shape gets a dry pass too; where
# its kernels are built already, that costs the host and GPU work of one layer's step, nothing compiles.
_compiled_ahead = set()


def _mm_fp32(a, b):
    """a @ b as fp32 (the weight gradients): on CUDA one cuBLAS call with an fp32 result for 16-bit
    inputs (torch >= 2.8), elsewhere the product of fp32 copies."""
    if a.dtype == torch.float32:
        return torch.mm(a, b)
    if a.is_cuda and _MM_OUT_DTYPE:
        return torch.mm(a, b, out_dtype=torch.float32)
    return torch.mm(a.float(), b.float())


_MM_OUT_DTYPE = hasattr(torch.ops.aten.mm, "dtype")  # the mm overload with an output dtype (CUDA only)


def _cast_all(weights, dtype):
    """The weights in dtype. Where any needs a cast, all are copied into one allocation by one
    multi-tensor copy (one kernel on CUDA where separate casts take one each)."""
    if all(w.dtype == dtype for w in weights):
        return weights
    flat = torch.empty(sum(w.numel() for w in weights), dtype=dtype, device=weights[0].device)
    views = [chunk.view(w.shape) for chunk, w in zip(flat.split([w.numel() for w in weights]), weights, strict=True)]
    torch._foreach_copy_(views, list(weights))
    return views


def _in_proj_grads(ctx, needs, dxz, hidden, w_in):
    """in_proj's input, weight and bias gradients from dxz and its input hidden, both (rows, features) in
    the matmul dtype: the weight's in fp32 (one matmul), skipped where frozen."""
    in_dtype, w_dtype = ctx.in_dtypes
    dhidden = torch.mm(dxz, w_in).to(in_dtype) if needs["x_in"] else None  # (rows, hidden)
    dw_in = _mm_fp32(dxz.t(), hidden).to(w_dtype) if needs["in_proj_weight"] else None
    db_in = dxz.sum(0, dtype=torch.float32).to(ctx.bias_dtypes[0]) if needs["in_proj_bias"] else None
    return dhidden, dw_in, db_in


def _rms_normed(x_dbl, sizes, eps):
    """Falcon Mamba's norms: x_proj's output with each of its parts (dt, B, C) normalised over its last dim, as
    one tensor (one launch)."""
    if _one_launch("triton", sizes, x_dbl):
        from .rms_norm.triton_rms_norm import weightless_rms_norms_triton

        return weightless_rms_norms_triton(x_dbl, sizes, eps)
    return torch.cat(weightless_rms_norms(x_dbl, sizes, eps, backend="torch"), -1)


def _rows(t):
    """(batch, d_inner, seqlen) as the (d_inner, batch * seqlen) matrix: a view where t is laid out
    (d_inner, batch, seqlen), as the backward allocates it, else a copy."""
    return t.transpose(0, 1).reshape(t.shape[1], -1)


def _by_channel(m, batch):
    """A (d_inner, batch * seqlen) matrix as the (batch, d_inner, seqlen) view `_rows` inverts."""
    return m.view(m.shape[0], batch, -1).transpose(0, 1)


def _dtype(t):
    return t.dtype if t is not None else None


def _as(grad, dtype):
    return grad.to(dtype) if grad is not None else None


def _padding_bias(attention_mask, dtype):
    """Per step (batch * seqlen,): 0 at tokens, -inf at padding (attention_mask 0), in dtype; None
    without a mask. Added to Δ before its softplus, it makes Δ exactly 0 at padding.

    Every layer of a forward asks for the same mask's bias: the last one is kept (the mask by weak
    reference, with its version counter, so a mask changed in place or a new mask gets its own), which
    saves each further layer three launches of host time."""
    if attention_mask is None:
        return None
    key = (attention_mask._version, dtype)
    last_mask, last_key, last_bias = _last_padding_bias
    if last_mask is not None and last_mask() is attention_mask and last_key == key:
        return last_bias
    pad = attention_mask.reshape(-1) == 0
    bias = torch.zeros(pad.shape, dtype=dtype, device=pad.device).masked_fill_(pad, float("-inf"))
    _last_padding_bias[:] = [weakref.ref(attention_mask), key, bias]
    return bias


_last_padding_bias = [None, None, None]  # [weakref to the mask, (its version, dtype), the bias]


def compute_dtype(xz):
    """The matmul dtype: autocast's when it is on for xz's device (as nn.Linear would run), else xz's."""
    device_type = xz.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return xz.dtype


class _MambaInner(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, x_in, in_proj_weight, in_proj_bias, conv_weight, conv_bias, x_proj_weight, dt_proj_weight,
        dt_proj_bias, A_log, D, out_proj_weight, out_proj_bias, seq_idx, attention_mask, mixer_rms_eps,
    ):
        # x_in: in_proj's input (batch, seqlen, hidden) where in_proj_weight is given, else its output xz.
        from .causal_conv1d.triton_conv import conv_fwd
        from .selective_scan.triton_scan import scan_fwd

        dtype = compute_dtype(x_in)
        ctx.in_dtypes = (x_in.dtype, _dtype(in_proj_weight))
        d_inner = conv_weight.shape[0]
        dt_rank, d_state = dt_proj_weight.shape[1], A_log.shape[1]
        with torch.autocast(x_in.device.type, enabled=False), device_guard(x_in):
            # The weights in the matmul dtype, kept for the backward (casting again there would cost
            # more kernels per layer; under autocast these copies are what autocast would make).
            given = [w for w in (in_proj_weight, x_proj_weight, dt_proj_weight, out_proj_weight) if w is not None]
            cast = iter(_cast_all(given, dtype))
            w_in, w_x, w_dt, w_out = (next(cast) if w is not None else None for w in
                                      (in_proj_weight, x_proj_weight, dt_proj_weight, out_proj_weight))
            x_in = x_in.to(dtype)
            if w_in is not None:
                b_in = in_proj_bias.to(dtype) if in_proj_bias is not None else None
                xz = F.linear(x_in, w_in, b_in)  # (batch, seqlen, 2 * d_inner)
            else:
                xz = x_in
            x, z = xz[..., :d_inner].transpose(1, 2), xz[..., d_inner:].transpose(1, 2)  # (batch, d_inner, seqlen)
            conv_w = conv_weight.reshape(d_inner, -1)
            # channels-last, for x_proj; zero at padding, where x counts as zero too
            u = conv_fwd(x, conv_w, conv_bias, seq_idx, True, True, pad_mask=attention_mask)
            x_dbl = F.linear(u.transpose(1, 2), w_x)  # (batch, seqlen, dt_rank + 2 d_state)
            sizes = (dt_rank, d_state, d_state)
            # Falcon Mamba: kept for the backward too (small), which then needs no launch to recompute it
            x_normed = _rms_normed(x_dbl, sizes, mixer_rms_eps) if mixer_rms_eps is not None else None
            dt, B, C = torch.split(x_normed if x_normed is not None else x_dbl, sizes, dim=-1)
            delta = F.linear(dt, w_dt)  # (batch, seqlen, d_inner); bias: in the scan, fp32
            pad_bias = _padding_bias(attention_mask, dtype)
            if pad_bias is not None:
                delta += pad_bias.view(*delta.shape[:2], 1)  # -inf at padding: Δ = softplus(-inf) = 0
            delta = delta.transpose(1, 2)  # (batch, d_inner, seqlen)
            A_log_f = fp32_or_wider(A_log)  # A = -exp(A_log), computed by the scan's kernels
            y_out_dtype = y_dtype(dtype)  # fp16: y in fp32, scaled into fp16's range for out_proj
            y, _, chunk_states = scan_fwd(
                u, delta, A_log_f, B.transpose(1, 2), C.transpose(1, 2), fp32_or_wider(D), z,
                fp32_or_wider(dt_proj_bias), True, None, True, seq_idx, A_is_log=True,
                out_dtype=y_out_dtype,
            )
            y_scale = fp16_range_scale(y) if y_out_dtype is not None and w_out is not None else None
            if w_out is None:  # out_proj runs outside (in fp16 on the fp32 y: `MambaMixer._out_proj`)
                out = y.transpose(1, 2)  # (batch, seqlen, d_inner)
            elif y_scale is not None:  # (batch, seqlen, hidden) in fp32
                y_in_range = y.div_(y_scale).transpose(1, 2).flatten(0, 1).to(dtype)  # y itself is not kept
                out = _mm_fp32(y_in_range, w_out.t()).mul_(y_scale).view(*x_in.shape[:2], -1)
                if out_proj_bias is not None:
                    out += out_proj_bias.float()
            else:
                bias = out_proj_bias.to(dtype) if out_proj_bias is not None else None
                out = F.linear(y.transpose(1, 2), w_out, bias)  # (batch, seqlen, hidden)
        ctx.bias_dtypes = (_dtype(in_proj_bias), _dtype(out_proj_bias))
        ctx.weight_dtypes = (x_proj_weight.dtype, dt_proj_weight.dtype, _dtype(out_proj_weight), A_log.dtype)
        ctx.mixer_rms_eps = mixer_rms_eps
        hidden = x_in if w_in is not None else None  # for in_proj's weight gradient
        ctx.save_for_backward(
            xz, x_dbl, conv_weight, conv_bias, w_x, w_dt, dt_proj_bias, A_log_f, D, w_out, chunk_states, seq_idx,
            hidden, w_in, attention_mask, pad_bias, x_normed, y_scale,
        )
        return out

    @staticmethod
    def backward(ctx, dout):
        from .causal_conv1d.triton_conv import conv_bwd, conv_fwd
        from .selective_scan.triton_scan import scan_bwd

        (xz, x_dbl, conv_weight, conv_bias, w_x, w_dt, dt_proj_bias, A_log, D, w_out, chunk_states, seq_idx,
         hidden, w_in, attention_mask, pad_bias, x_normed, y_scale) = ctx.saved_tensors
        x_proj_dtype, dt_proj_dtype, out_proj_dtype, A_log_dtype = ctx.weight_dtypes
        dtype = xz.dtype
        batch, seqlen = xz.shape[:2]
        rows = batch * seqlen
        d_inner = xz.shape[-1] // 2
        dt_rank, d_state = w_dt.shape[1], A_log.shape[1]
        dout = dout.to(dtype).reshape(rows, -1)  # (rows, hidden), or dy (rows, d_inner) where out_proj ran outside
        with device_guard(xz):
            x, z = xz[..., :d_inner].transpose(1, 2), xz[..., d_inner:].transpose(1, 2)
            conv_w = conv_weight.reshape(d_inner, -1)
            # u, Δ, dy and the scan's gradients live as (d_inner, batch, seqlen): time-contiguous (the
            # layout the scan backward reads) and (d_inner, rows) matrices, so that every weight
            # gradient below is one matmul over all rows (`_rows`) instead of a batched one and a sum.
            u = _by_channel(xz.new_empty(d_inner, rows), batch)
            conv_fwd(x, conv_w, conv_bias, seq_idx, True, False, out=u, pad_mask=attention_mask)
            sizes = (dt_rank, d_state, d_state)
            # x_proj's outputs as the scan read them (Falcon Mamba's normalised ones as the forward kept them)
            dt, B, C = (x_normed if x_normed is not None else x_dbl).view(rows, -1).split(sizes, -1)
            B, C = B.view(batch, seqlen, d_state), C.view(batch, seqlen, d_state)
            # Δ as the forward had it, -inf at padding (the matmul's bias: no pass of its own)
            delta = torch.mm(w_dt, dt.t()) if pad_bias is None else torch.addmm(pad_bias, w_dt, dt.t())
            delta = _by_channel(delta, batch)
            dy = _by_channel(torch.mm(w_out.t(), dout.t()) if w_out is not None else dout.t().contiguous(), batch)
            needs = dict(zip(_INPUTS, ctx.needs_input_grad, strict=True))
            # the forward's output, recomputed by the scan backward, for out_proj's weight gradient (fp32 where
            # the forward scaled it)
            y_out_dtype = torch.float32 if y_scale is not None else None
            y = torch.empty_like(u, dtype=y_out_dtype) if needs["out_proj_weight"] else None
            # x_proj's output gradient [dΔ_low-rank | dB | dC]; the scan backward writes dB, dC into it.
            dx_dbl = x_dbl.new_empty(rows, dt_rank + 2 * d_state)
            dxz = torch.empty_like(xz)
            # y, dB, dC and dz go straight where they are needed: y for out_proj's weight gradient,
            # dB and dC into x_proj's output gradient, dz into in_proj's.
            scan = scan_bwd(
                u, delta, A_log, B.transpose(1, 2), C.transpose(1, 2), fp32_or_wider(D), z,
                fp32_or_wider(dt_proj_bias), True, chunk_states, dy, None, seq_idx, y_out=y, need_dinitial=False,
                dBC_out=dx_dbl[:, dt_rank:].view(batch, seqlen, 2, d_state),
                dz_out=dxz[..., d_inner:].transpose(1, 2),
                A_is_log=True,
            )
            ddelta = _rows(scan.ddelta)
            torch.mm(ddelta.t(), w_dt, out=dx_dbl[:, :dt_rank])
            if ctx.mixer_rms_eps is not None:  # through the norms, to x_proj's output
                weightless_rms_norms_backward_(dx_dbl, x_dbl.view(rows, -1), sizes, ctx.mixer_rms_eps, "triton")
            # out_proj, dt_proj and x_proj weight gradients, skipped for frozen weights (e.g. LoRA on
            # in_proj only).
            if not needs["out_proj_weight"]:
                dw_out = None
            elif y_scale is None:
                dw_out = _mm_fp32(dout.t(), _rows(y).t())
            else:  # y in fp32, divided by the forward's scale into fp16's range, the product multiplied back
                dw_out = _mm_fp32(dout.t(), _rows(y.div_(y_scale)).t().to(dtype)).mul_(y_scale)
            db_out = dout.sum(0, dtype=torch.float32) if needs["out_proj_bias"] else None
            dw_dt = _mm_fp32(ddelta, dt) if needs["dt_proj_weight"] else None
            dw_x = _mm_fp32(dx_dbl.t(), _rows(u).t()) if needs["x_proj_weight"] else None
            du = _rows(scan.du)
            du.addmm_(w_x.t(), dx_dbl.t())  # + x_proj's input gradient
            _, dconv_w, dconv_b = conv_bwd(
                x, conv_w, conv_bias, seq_idx, True, _by_channel(du, batch), dx=dxz[..., :d_inner].transpose(1, 2),
                pad_mask=attention_mask,
            )
        grads = dict(
            x_in=dxz,  # in_proj's output gradient where in_proj runs outside
            conv_weight=dconv_w.view_as(conv_weight),
            conv_bias=dconv_b if conv_bias is not None else None,
            x_proj_weight=_as(dw_x, x_proj_dtype),
            dt_proj_weight=_as(dw_dt, dt_proj_dtype),
            dt_proj_bias=scan.ddelta_bias.to(dt_proj_bias.dtype),
            A_log=scan.dA.to(A_log_dtype),
            D=scan.dD.to(D.dtype),
            out_proj_weight=_as(dw_out, out_proj_dtype),
            out_proj_bias=db_out.to(ctx.bias_dtypes[1]) if db_out is not None else None,
        )
        if w_in is not None:
            dhidden, grads["in_proj_weight"], grads["in_proj_bias"] = _in_proj_grads(
                ctx, needs, dxz.view(rows, -1), hidden.reshape(rows, -1), w_in
            )
            grads["x_in"] = dhidden.view(hidden.shape) if dhidden is not None else None
        # seq_idx (integer document ids), attention_mask (which steps are padding), mixer_rms_eps (a number)
        # and, without in_proj inside, its weight and bias get none.
        return tuple(grads.get(name) for name in _INPUTS)


def mamba_inner_triton(
    xz, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_proj_bias, A_log, D, out_proj_weight,
    out_proj_bias=None, seq_idx=None, in_proj_weight=None, in_proj_bias=None, mixer_rms_eps=None, attention_mask=None,
):
    """The mixer from in_proj's output xz (batch, seqlen, 2 * d_inner) to out_proj's (batch, seqlen, hidden);
    with in_proj_weight (2 d_inner, hidden) (and optionally in_proj_bias), xz is in_proj's input
    (batch, seqlen, hidden) instead, and in_proj runs inside.

    Parameters as the modules hold them: conv_weight (d_inner, 1, d_conv), x_proj_weight
    (dt_rank + 2 d_state, d_inner), dt_proj_weight (d_inner, dt_rank), dt_proj_bias and D (d_inner,),
    A_log (d_inner, d_state), out_proj_weight (hidden, d_inner); out_proj_weight None: out_proj runs outside
    (e.g. an adapter on it), and the result is its input, the gated scan output (batch, seqlen, d_inner).
    SiLU activation, softplus on Δ + bias.
    Under autocast the matmuls run in autocast's dtype, as the modules would. mixer_rms_eps: Falcon Mamba's
    weight-free RMS norms on the time step, B and C (None: plain Mamba). attention_mask: (batch, seqlen), 0 at
    padding (any other value: a token; bool, integer or float), computed as the model's modules do (x and the
    conv output zero there, Δ = 0 so the state passes padded steps unchanged); no gradient. seq_idx:
    (batch, seqlen) document ids of packed sequences (state and conv restart at each); no gradient.
    """
    d_inner = conv_weight.shape[0]
    if in_proj_weight is not None:
        if in_proj_weight.dim() != 2 or in_proj_weight.shape[0] != 2 * d_inner:
            raise ValueError(f"in_proj_weight must have shape (2 * d_inner={2 * d_inner}, hidden), got "
                             f"{tuple(in_proj_weight.shape)}")
        if xz.dim() != 3 or xz.shape[-1] != in_proj_weight.shape[1]:
            raise ValueError(f"with in_proj_weight, xz is in_proj's input and must have shape (batch, seqlen, "
                             f"{in_proj_weight.shape[1]}), got {tuple(xz.shape)}")
    elif xz.dim() != 3 or xz.shape[-1] != 2 * d_inner:
        raise ValueError(f"xz must have shape (batch, seqlen, 2 * d_inner={2 * d_inner}), got {tuple(xz.shape)}")
    if out_proj_weight is None and out_proj_bias is not None:
        raise ValueError("out_proj_bias was given without out_proj_weight: with out_proj outside, pass neither")
    if xz.shape[1] == 0:  # as the model: the kernels need a step to read
        raise ValueError(f"xz has no time steps (shape {tuple(xz.shape)}); pass at least one")
    if attention_mask is not None:
        if tuple(attention_mask.shape) != tuple(xz.shape[:2]):
            raise ValueError(f"attention_mask must have shape (batch, seqlen) = {tuple(xz.shape[:2])}, got "
                             f"{tuple(attention_mask.shape)}")
        if attention_mask.is_complex() or attention_mask.device != xz.device:
            raise ValueError(f"attention_mask must be a bool, integer or float tensor on {xz.device}, got "
                             f"{attention_mask.dtype} on {attention_mask.device}")
    inputs = (
        xz, in_proj_weight, in_proj_bias, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_proj_bias,
        A_log, D, out_proj_weight, out_proj_bias, seq_idx, attention_mask, mixer_rms_eps,
    )
    _compile_first_call(inputs)
    return _MambaInner.apply(*inputs)


class _DryContext:
    """autograd's ctx for a forward and backward run by hand (`_compile_first_call`)."""

    def __init__(self, needs_input_grad):
        self.needs_input_grad = needs_input_grad

    def save_for_backward(self, *tensors):
        self.saved_tensors = tensors


def _call_key(inputs):
    """What the kernels of a call are built for: device, matmul dtype, the tensors' shapes, strides
    and dtypes, which inputs are given and which need gradients."""
    xz = inputs[0]
    key = [xz.device, compute_dtype(xz)]
    for t in inputs:
        key.append((tuple(t.shape), t.stride(), t.dtype, t.requires_grad) if isinstance(t, torch.Tensor) else t)
    return tuple(key)


def _compile_first_call(inputs):
    """On a training call (gradients wanted) of a kind not seen before, compile every kernel its
    forward and backward launch, side by side (`compile_ahead`), before running it: a dry forward and
    backward by hand, on CUDA, outside torch.compile and CUDA graph capture."""
    xz = inputs[0]
    if not (xz.is_cuda and torch.is_grad_enabled()) or torch.compiler.is_compiling():
        return
    key = _call_key(inputs)  # checked first: after the first call of a kind, this is all a call costs
    if key in _compiled_ahead:
        return
    needs_input_grad = tuple(isinstance(t, torch.Tensor) and t.requires_grad for t in inputs)
    if not any(needs_input_grad) or torch.cuda.is_current_stream_capturing():
        return
    _compiled_ahead.add(key)

    def forward_and_backward():
        ctx = _DryContext(needs_input_grad)
        out = _MambaInner.forward(ctx, *inputs)
        _MambaInner.backward(ctx, torch.empty_like(out))

    compile_ahead(forward_and_backward)


__all__ = ["compute_dtype", "mamba_inner_triton"]
