"""Triton helpers shared by the kernels of every folder: softplus, the SiLU gate, exp2 scaling, the
combine functions of the linear-recurrence scans, and warp-lane primitives.

The generated scan kernels (`selective_scan/codegen.py`) call these too: their modules get these
functions in their namespace (`GENERATED_HELPERS`), so their source carries no copy.

FAST_MATH (CUDA only; the interpreter has no inline assembly) swaps libdevice's exp, log and the IEEE
division for single special-function-unit instructions: libdevice's log alone took about 25
instructions per step, 1.5 per state update of the scan (docs/kernels.md, "Forward").
"""

import triton
import triton.language as tl


@triton.jit
def approx(x, op: tl.constexpr):
    # One special-function-unit instruction (ex2, lg2 or rcp), flushing denormals: no range fix-ups.
    return tl.inline_asm_elementwise(
        op + ".approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True, pack=1
    )


@triton.jit
def log1p_series(e):
    # log(1 + e) for 0 <= e <= 1/8 by its Taylor series to e^7: the first term left out, e^8 / 8, is below
    # 6e-8 of the value there. For FAST_MATH's softplus, whose lg2.approx is accurate to 2^-22 absolute
    # only, too coarse near log(1) = 0.
    return e * (1.0 + e * (-0.5 + e * (1.0 / 3.0 + e * (-0.25 + e * (0.2 + e * (-1.0 / 6.0 + e * (1.0 / 7.0)))))))


@triton.jit
def softplus(x, FAST_MATH: tl.constexpr):
    # log(1 + e^x), linear above 20 like torch. log(u), u = 1 + e, loses e's digits where 1 + e rounds
    # (all of them below x = -17); torch's log1p keeps them, and so does adding back what the rounding
    # dropped, e - (u - 1) (exact for e <= 1; beyond, small beside log(u) >= log 2), divided by u:
    # log(1 + e) = log(u) + log(1 + (e - (u - 1)) / u), whose second log is its argument to fp32 precision.
    # FAST_MATH: ex2 and lg2 instructions, and below e = 1/8 (x < -2.08) the series, as lg2.approx is
    # accurate to 2^-22 absolute only. The exponent is capped at 20, so that no inf reaches the unused branch.
    if FAST_MATH:
        e = approx(tl.minimum(x, 20.0) * 1.4426950408889634, "ex2")
        y = tl.where(e < 0.125, log1p_series(e), approx(1.0 + e, "lg2") * 0.6931471805599453)
    else:
        e = tl.exp(tl.minimum(x, 20.0))
        u = 1.0 + e
        y = tl.log(u) + (e - (u - 1.0)) / u
    return tl.where(x <= 20.0, y, x)


@triton.jit
def softplus_coarse(x):
    # FAST_MATH's softplus without the series: ln 2 lg2(1 + ex2(x log2 e)), two special-function-unit
    # instructions, accurate to about 2e-7 absolute (lg2.approx's 2^-22), 0 below x = -17. For the scan's
    # backward, which recomputes Δ at every step: there the series' ten instructions per step cost 5-7% of the
    # bf16 forward + backward on an H100, and an error of 2e-7 in Δ changes a step's decay exp(ΔA) by at most
    # 2e-7 |A| relative in the recomputed states the gradients follow. The forward keeps `softplus`'s relative
    # accuracy: a tiny Δ decides how a state decays over a million steps.
    y = approx(1.0 + approx(x * 1.4426950408889634, "ex2"), "lg2") * 0.6931471805599453
    return tl.where(x <= 20.0, y, x)


@triton.jit
def time_index(i, WIDE_INDEX: tl.constexpr):
    # A tile's (or checkpoint chunk's) index, whose multiples times a time stride address the time axis: in
    # 64 bits with WIDE_INDEX, where step x time stride may pass 2^31 (`_launch.wide_index`), else in 32
    # (cheaper in the loops).
    if WIDE_INDEX:
        i = i.to(tl.int64)
    return i


@triton.jit
def sigmoid(x, FAST_MATH: tl.constexpr):
    # FAST_MATH: with an approximate reciprocal in place of an IEEE division.
    if FAST_MATH:
        return approx(1.0 + approx(x * -1.4426950408889634, "ex2"), "rcp")
    return tl.sigmoid(x)


@triton.jit
def silu(x, FAST_MATH: tl.constexpr):
    return x * sigmoid(x, FAST_MATH)


@triton.jit
def log2_rate(a, A_LOG: tl.constexpr):
    # A scaled by log2(e), so that exp(ΔA) = exp2(Δ a): exp2 is the special-function unit's native
    # instruction. A_LOG: the value is A_log, A = -exp(A_log) (the model's parameter, as the training
    # mixer hands it over: no host-side exp and negation kernels).
    if A_LOG:
        a = -tl.exp(a)
    return a * 1.4426950408889634


@triton.jit
def linear_combine(a_l, b_l, a_r, b_r):
    # The maps h -> a_l h + b_l, then h -> a_r h + b_r, as one: h -> a_l a_r h + (b_l a_r + b_r). The
    # combine of `tl.associative_scan` over a linear recurrence h_t = a_t h_{t-1} + b_t.
    return a_l * a_r, a_r * b_l + b_r


@triton.jit
def add_pair(a_l, b_l, a_r, b_r):
    # Two sums in one `tl.reduce`.
    return a_l + a_r, b_l + b_r


@triton.jit
def lane_id(like):
    # This thread's lane in its warp, shaped like `like` (int32).
    return tl.inline_asm_elementwise("mov.u32 $0, %laneid;", "=r,r", [like], dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def shfl(x, ASM: tl.constexpr):
    # fp32 x from another lane of the warp: ASM is one shfl.sync instruction (`shfl_xor_code` writes it).
    bits = tl.inline_asm_elementwise(ASM, "=r,r", [x.to(tl.int32, bitcast=True)], dtype=tl.int32, is_pure=True, pack=1)
    return bits.to(tl.float32, bitcast=True)


def shfl_xor_code(x, offset):
    """Code for x from the lane whose id differs from this one's in bit `offset` (a power of two)."""
    return f'shfl({x}, "shfl.sync.bfly.b32 $0, $1, {offset}, 31, -1;")'


# The names the generated kernels call (`selective_scan/codegen.py` puts them in their namespace).
GENERATED_HELPERS = dict(
    approx=approx, softplus=softplus, softplus_coarse=softplus_coarse, sigmoid=sigmoid, silu=silu,
    log2_rate=log2_rate, lane_id=lane_id, shfl=shfl, time_index=time_index,
)

__all__ = [
    "GENERATED_HELPERS",
    "add_pair",
    "approx",
    "lane_id",
    "linear_combine",
    "log1p_series",
    "log2_rate",
    "shfl",
    "shfl_xor_code",
    "sigmoid",
    "silu",
    "softplus",
    "softplus_coarse",
    "time_index",
]
