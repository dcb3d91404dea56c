"""FP8 training ops as DeepSeek-V3 does it: e4m3 values with per-tile float32 scales (references, OpDefs).

Formats and the rounding rule (one rule, used bit for bit by the references and the Triton kernels):

- **Tiles.** Activations (and gradients) are quantized per ``1x128`` tile: one scale per row and per
  128 consecutive elements of the reduction dimension. Weights per ``128x128`` block. The last
  tile of a dimension that is not a multiple of 128 is partial (its scale covers the elements that
  exist). For the weight gradient, DeepSeek-V3 quantizes the inputs along the token dimension: that
  is a ``1x128`` quantization of the transposed tensor (``fp8_quantize(x.t())``); for the routed
  experts the 128-token tiles are the global ones of the permuted rows (a tile may straddle two
  experts and then shares one scale between them).
- **Scale.** ``amax`` is the tile's largest ``|x|`` after converting ``x`` to float32;
  ``scale = max(fl32(amax / 448), 2**-126)`` (a correctly rounded float32 division; the floor at the
  smallest normal float32 guards all-zero and tiny tiles). A tile holding a NaN gets scale NaN.
- **Values.** ``y = fl32(x / scale)`` (correctly rounded), then ``q = e4m3(y)``: round to nearest,
  ties to even, on the e4m3 grid (3 mantissa bits, subnormal step ``2**-9``), saturated at +-448.
  ``x ~= q * scale``.
- **GEMM.** ``C = dequant(A) @ dequant(B)^T``: each 128-deep block of the reduction is one product of
  fp8 operands, multiplied by its two scales and added to a float32 accumulator (DeepSeek-V3's
  "promotion": the tensor cores' limited-precision accumulation never runs longer than 128
  elements), rounded once to ``out_dtype`` at the end.

The references compute in float64 and reproduce the two float32 roundings exactly (a float32
quotient computed in float64 and rounded to float32 is the correctly rounded float32 quotient, as
53 >= 2 * 24 + 2), so ``fp8_quantize`` is checked bit for bit.

`fp8_linear` and `fp8_grouped_linear` are the training layers (autograd): forward ``y = x W^T`` with x
per 1x128 and W per 128x128; backward ``dx = dy W`` (dy per 1x128 along the output features, W's
blocks reused transposed) and ``dW = dy^T x`` (both quantized along the tokens); gradients come back
in the inputs' dtypes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .opdef import OpDef, Sample, randn

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
TILE = 128
MIN_SCALE = 2.0 ** -126
TILES = {"1x128": 1, "128x128": 128}
OUT_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}
# Bound of the GEMM's own arithmetic (``OpDef.error_scale``) in units of 2**-24 times sum_k |a_k b_k|:
# the accumulation inside a 128-deep fp8 tensor-core product keeps ~14 bits on Hopper (DeepSeek-V3,
# section 3.3.2), 2**13 units, plus one float32 rounding per promoted block and per element.
GEMM_ACC_UNITS = 2 ** 13


# Bumped whenever weights may have changed behind their tensors' version counters (the ZeRO optimizer writes
# the flat parameter buffer through other views, and NCCL's all-gather writes it directly): the fp8 kernels'
# per-weight quantization cache checks it along with ``weight._version``.
_WEIGHT_GENERATION = [0]


def weights_updated() -> None:
    """Tell the fp8 layers' weight cache that weights may have changed (after an optimizer step or a load)."""
    _WEIGHT_GENERATION[0] += 1


def weight_generation() -> int:
    return _WEIGHT_GENERATION[0]


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def tile_rows(tile: str) -> int:
    if tile not in TILES:
        raise ValueError(f"fp8 tile must be one of {', '.join(TILES)}, got {tile!r}")
    return TILES[tile]


def out_dtype_of(out_dtype: str | torch.dtype) -> torch.dtype:
    """The torch dtype of an ``out_dtype`` argument (a name of `OUT_DTYPES`, or a torch dtype as is)."""
    if isinstance(out_dtype, torch.dtype):
        return out_dtype
    if out_dtype not in OUT_DTYPES:
        raise ValueError(f"out_dtype must be one of {', '.join(OUT_DTYPES)}, got {out_dtype!r}")
    return OUT_DTYPES[out_dtype]


def e4m3_round(y: torch.Tensor) -> torch.Tensor:
    """``y`` (float64) rounded to nearest-even on the e4m3 grid and saturated at +-448; NaN stays NaN."""
    a = y.abs().clamp(max=FP8_MAX)
    _, e = torch.frexp(a)  # a = m * 2**e with m in [0.5, 1): the binade's exponent is e - 1
    ulp = torch.ldexp(torch.ones_like(a), (e - 1).clamp(min=-6) - 3)
    return torch.copysign(torch.round(a / ulp) * ulp, y)  # torch.round rounds half to even


def b_tile(b_q: torch.Tensor, b_scale: torch.Tensor) -> str:
    """How a GEMM's B is scaled: ``"1x128"`` (``b_scale[N, K/128]``) or ``"128x128"`` (``[N/128, K/128]``); a B of
    one row, where both layouts are ``[1, K/128]``, counts as 128x128."""
    n = b_q.shape[0]
    return "1x128" if b_scale.shape[0] == n and n != _cdiv(n, TILE) else "128x128"


def scale_shape(m: int, k: int, tile: str) -> tuple[int, int]:
    rows = tile_rows(tile)
    return (m if rows == 1 else _cdiv(m, rows)), _cdiv(k, TILE)


def fp8_quantize(x: torch.Tensor, tile: str = "1x128") -> tuple[torch.Tensor, torch.Tensor]:
    """``x[M, K]`` -> ``(q[M, K] float8_e4m3fn, scale float32)``, scale ``[M, ceil(K/128)]`` for ``tile='1x128'``
    or ``[ceil(M/128), ceil(K/128)]`` for ``'128x128'``; ``x ~= q * scale`` per tile (module docstring)."""
    rows = tile_rows(tile)
    if x.dim() != 2:
        raise ValueError(f"fp8_quantize takes a 2-d tensor, got shape {tuple(x.shape)}")
    m, k = x.shape
    xf = x.detach().to(torch.float32).to(torch.float64)
    mb, kb = _cdiv(m, rows), _cdiv(k, TILE)
    tiles = F.pad(xf, (0, kb * TILE - k, 0, mb * rows - m)).view(mb, rows, kb, TILE)
    amax = tiles.abs().amax(dim=(1, 3)) if tiles.numel() else torch.zeros(mb, kb, dtype=torch.float64,
                                                                              device=x.device)
    scale = (amax / FP8_MAX).to(torch.float32).clamp(min=MIN_SCALE)
    y = (xf / expand_scale(scale.double(), m, k)).to(torch.float32).to(torch.float64)
    return e4m3_round(y).to(FP8_DTYPE), scale


def expand_scale(scale: torch.Tensor, m: int, k: int) -> torch.Tensor:
    """A tile scale ``[M or ceil(M/128), ceil(K/128)]`` repeated to one value per element ``[M, K]``."""
    kb = _cdiv(k, TILE)
    if scale.dim() != 2 or scale.shape[1] != kb or scale.shape[0] not in (m, _cdiv(m, TILE)):
        raise ValueError(f"scale of shape {tuple(scale.shape)} does not fit a [{m}, {k}] fp8 tensor "
                         f"(expected [{m}, {kb}] per 1x128 tile or [{_cdiv(m, TILE)}, {kb}] per 128x128 block)")
    rows = 1 if scale.shape[0] == m else TILE
    return scale.repeat_interleave(rows, 0)[:m].repeat_interleave(TILE, 1)[:, :k]


def fp8_dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``q * scale`` in float64 (the tile kind is read from the scale's shape)."""
    return q.to(torch.float64) * expand_scale(scale.to(torch.float64), *q.shape)


def _result_dtype(out_dtype: str, scale: torch.Tensor) -> torch.dtype:
    # the reference run (float64 scales) keeps float64; a backend's run rounds to out_dtype
    return torch.float64 if scale.dtype == torch.float64 else out_dtype_of(out_dtype)


def fp8_gemm(a_q: torch.Tensor, a_scale: torch.Tensor, b_q: torch.Tensor, b_scale: torch.Tensor,
             out_dtype: str = "bfloat16") -> torch.Tensor:
    """``C[M, N] = dequant(a_q[M, K], a_scale) @ dequant(b_q[N, K], b_scale)^T``: a per 1x128 tile
    (``a_scale[M, ceil(K/128)]``), b per 128x128 block (``[ceil(N/128), ceil(K/128)]``) or per 1x128
    (``[N, ceil(K/128)]``, the weight gradient's layout). Result in ``out_dtype``."""
    if a_q.dim() != 2 or b_q.dim() != 2 or a_q.shape[1] != b_q.shape[1]:
        raise ValueError(f"fp8_gemm: a {tuple(a_q.shape)} and b {tuple(b_q.shape)} must be [M, K] and [N, K]")
    if a_scale.shape[0] != a_q.shape[0] and a_q.shape[0] > 0:
        raise ValueError("fp8_gemm: a must be scaled per 1x128 tile (a_scale [M, ceil(K/128)])")
    out = fp8_dequantize(a_q, a_scale) @ fp8_dequantize(b_q, b_scale).T
    return out.to(_result_dtype(out_dtype, a_scale))


def _check_counts(n: int, counts: torch.Tensor, experts: int) -> list[int]:
    sizes = counts.tolist()
    if len(sizes) != experts or sum(sizes) != n or min(sizes, default=0) < 0:
        raise ValueError(f"counts {sizes} must have one entry per expert ({experts}) summing to the rows ({n})")
    return sizes


def fp8_grouped_gemm(a_q: torch.Tensor, a_scale: torch.Tensor, b_q: torch.Tensor, b_scale: torch.Tensor,
                     counts: torch.Tensor, out_dtype: str = "bfloat16") -> torch.Tensor:
    """`grouped_linear` on fp8 operands: rows of ``a_q[N, K]`` (per 1x128) grouped by ``counts[E]``, each
    group times ``dequant(b_q[e], b_scale[e])^T`` (``b_q[E, M, K]`` per 128x128 block,
    ``b_scale[E, ceil(M/128), ceil(K/128)]``) -> ``C[N, M]`` in ``out_dtype``."""
    sizes = _check_counts(a_q.shape[0], counts, b_q.shape[0])
    a = fp8_dequantize(a_q, a_scale)
    outs = [g @ fp8_dequantize(b_q[e], b_scale[e]).T for e, g in enumerate(a.split(sizes))]
    out = torch.cat(outs) if outs else a.new_zeros(0, b_q.shape[1])
    return out.to(_result_dtype(out_dtype, a_scale))


# -- the training layers: reference autograd (float64 math on the quantized values) ------------------

def _qdq(x: torch.Tensor, tile: str) -> torch.Tensor:
    """``x`` quantized with the module's rule and dequantized, in float64."""
    return fp8_dequantize(*fp8_quantize(x, tile))


class _RefFP8Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight):
        ctx.save_for_backward(x, weight)
        x2 = x.reshape(-1, x.shape[-1])
        y = _qdq(x2, "1x128") @ _qdq(weight, "128x128").T
        return y.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
        dx = _qdq(dy2, "1x128") @ _qdq(weight, "128x128")  # W^T's blocks are W's, transposed
        dw = _qdq(dy2.T, "1x128") @ _qdq(x2.T, "1x128").T
        return dx.to(x.dtype).reshape(x.shape), dw.to(weight.dtype)


def fp8_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``y[..., N] = x[..., K] @ weight[N, K]^T`` through fp8 (forward and both backward GEMMs), in x's dtype."""
    return _RefFP8Linear.apply(x, weight)


class _RefFP8GroupedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, counts):
        sizes = _check_counts(x.shape[0], counts, weight.shape[0])
        ctx.save_for_backward(x, weight)
        ctx.sizes = sizes
        xd = _qdq(x, "1x128")
        outs = [g @ _qdq(weight[e], "128x128").T for e, g in enumerate(xd.split(sizes))]
        out = torch.cat(outs) if outs else xd.new_zeros(0, weight.shape[1])
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        sizes = ctx.sizes
        dyd = _qdq(dy, "1x128")
        dx = torch.cat([g @ _qdq(weight[e].T, "128x128").T for e, g in enumerate(dyd.split(sizes))]) \
            if sizes else dyd.new_zeros(0, x.shape[1])
        # the weight gradient's inputs per 128-token tiles of the permuted rows (global tiles)
        dyt, xt = _qdq(dy.T, "1x128"), _qdq(x.T, "1x128")
        dw = torch.stack([a @ b.T for a, b in zip(dyt.split(sizes, dim=1), xt.split(sizes, dim=1))])
        return dx.to(x.dtype), dw.to(weight.dtype), None


def fp8_grouped_linear(x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """`grouped_linear` (``x[N, K]``, ``weight[E, M, K]``, ``counts[E]`` -> ``y[N, M]``) through fp8."""
    return _RefFP8GroupedLinear.apply(x, weight, counts)


# -- error bounds (OpDef.error_scale / grad_error_scale) -------------------------------------------

def _abs_dq(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return fp8_dequantize(q, scale).abs()


def _gemm_units(k: int) -> float:
    return float(GEMM_ACC_UNITS + k)


def _gemm_error_scale(a_q, a_scale, b_q, b_scale, out_dtype="bfloat16"):
    return _gemm_units(a_q.shape[1]) * (_abs_dq(a_q, a_scale) @ _abs_dq(b_q, b_scale).T)


def _grouped_gemm_error_scale(a_q, a_scale, b_q, b_scale, counts, out_dtype="bfloat16"):
    sizes = _check_counts(a_q.shape[0], counts, b_q.shape[0])
    a = _abs_dq(a_q, a_scale)
    outs = [g @ _abs_dq(b_q[e], b_scale[e]).T for e, g in enumerate(a.split(sizes))]
    return _gemm_units(a_q.shape[1]) * (torch.cat(outs) if outs else a.new_zeros(0, b_q.shape[1]))


def _linear_error_scale(x, weight):
    x2 = x.reshape(-1, x.shape[-1])
    out = _qdq(x2, "1x128").abs() @ _qdq(weight, "128x128").abs().T
    return (_gemm_units(x.shape[-1]) * out).reshape(*x.shape[:-1], weight.shape[0])


def _linear_grad_error_scale(args, kwargs, upstreams):
    x, weight = args[0], args[1]
    x2 = x.reshape(-1, x.shape[-1])
    dy = upstreams[0].reshape(-1, weight.shape[0])
    dx = _qdq(dy, "1x128").abs() @ _qdq(weight, "128x128").abs()
    dw = _qdq(dy.T, "1x128").abs() @ _qdq(x2.T, "1x128").abs().T
    return [(_gemm_units(weight.shape[0]) * dx).reshape(x.shape), _gemm_units(x2.shape[0]) * dw]


def _grouped_linear_error_scale(x, weight, counts):
    sizes = _check_counts(x.shape[0], counts, weight.shape[0])
    xd = _qdq(x, "1x128").abs()
    outs = [g @ _qdq(weight[e], "128x128").abs().T for e, g in enumerate(xd.split(sizes))]
    return _gemm_units(x.shape[1]) * (torch.cat(outs) if outs else xd.new_zeros(0, weight.shape[1]))


def _grouped_linear_grad_error_scale(args, kwargs, upstreams):
    x, weight, counts = args
    sizes = _check_counts(x.shape[0], counts, weight.shape[0])
    dy = upstreams[0]
    dyd = _qdq(dy, "1x128").abs()
    dx = torch.cat([g @ _qdq(weight[e].T, "128x128").abs().T for e, g in enumerate(dyd.split(sizes))]) \
        if sizes else dyd.new_zeros(0, x.shape[1])
    dyt, xt = _qdq(dy.T, "1x128").abs(), _qdq(x.T, "1x128").abs()
    dw = torch.stack([a @ b.T * _gemm_units(a.shape[1]) for a, b in zip(dyt.split(sizes, dim=1),
                                                                         xt.split(sizes, dim=1))])
    return [_gemm_units(weight.shape[1]) * dx, dw, None]


# -- samples ---------------------------------------------------------------------------------------

def _special_rows(dtype, device, gen) -> torch.Tensor:
    """Rows that exercise the rounding rule: exact ties, e4m3 subnormals, saturation, zeros, tiny tiles."""
    grid = torch.tensor([1.0, 1.125, 1.0625, 1.1875, 3.0, 0.5, 2.0 ** -7, 2.0 ** -9], dtype=torch.float64)
    rows = torch.zeros(6, 160, dtype=torch.float64)
    # row 0: amax 448 (scale 1 exactly): ties between e4m3 neighbours (1.0625 is half-way), subnormals
    rows[0, :8] = grid * torch.tensor([1, -1, 1, -1, 1, -1, 1, -1])
    rows[0, 8] = 448.0
    rows[0, 9:20] = torch.tensor([2.0 ** -10, 3 * 2.0 ** -10, 5 * 2.0 ** -10, 2.0 ** -6, 1.5 * 2.0 ** -6,
                                  17.0, 19.0, 21.0, 240.0, 232.0, 440.0])
    rows[0, 128:140] = randn(12, dtype=torch.float64, device="cpu", generator=gen) * 1e-3  # second tile
    rows[1] = randn(160, dtype=torch.float64, device="cpu", generator=gen) * 100  # large values
    rows[2, :128] = 0.0  # an all-zero tile next to a normal one
    rows[2, 128:] = randn(32, dtype=torch.float64, device="cpu", generator=gen)
    rows[3] = randn(160, dtype=torch.float64, device="cpu", generator=gen) * 1e-6  # tiny
    # row 4: amax 3.5, so scale = 3.5 / 448 = 2**-7 exactly and y = 128 x: ties at e4m3 steps after scaling
    rows[4, :8] = torch.tensor([-3.5, 1.0625, 17.0, 19.0, 2.0 ** -10, 3 * 2.0 ** -10, 1.1875, -21.0]) / 128
    rows[4, 0] = -3.5
    rows[5] = randn(160, dtype=torch.float64, device="cpu", generator=gen)
    return rows.to(dtype=dtype, device=device)


def _quantize_samples(dtype, device, gen):
    yield Sample((_special_rows(dtype, device, gen), "1x128"), {}, "special:1x128")
    yield Sample((_special_rows(dtype, device, gen), "128x128"), {}, "special:128x128")
    for m, k, tile in ((3, 128, "1x128"), (130, 200, "128x128"), (7, 40, "1x128"), (33, 300, "128x128")):
        yield Sample((randn(m, k, dtype=dtype, device=device, generator=gen), tile), {}, f"M{m}K{k}:{tile}")


def _out_name(dtype: torch.dtype) -> str:
    return "float32" if dtype in (torch.float32, torch.float64) else "bfloat16"


def _quantized(x: torch.Tensor, tile: str, device) -> tuple[torch.Tensor, torch.Tensor]:
    q, s = fp8_quantize(x.cpu(), tile)
    return q.to(device), s.to(device)


def _spread_tiles(x: torch.Tensor, rows: int, gen) -> torch.Tensor:
    """``x`` with each (rows x 128) tile multiplied by 2^e, e uniform in -6..6: tile scales up to 2^12 apart, so
    a scale applied to another tile than its own (a misread layout) is off by a large factor on most tiles, not
    by the few percent that separate the scales of plain random tiles."""
    m, k = x.shape
    e = torch.randint(-6, 7, (-(-m // rows), -(-k // TILE)), generator=gen).to(x.dtype)
    return x * torch.exp2(e).repeat_interleave(rows, 0)[:m].repeat_interleave(TILE, 1)[:, :k]


def _gemm_samples(dtype, device, gen):
    for m, n, k, b_tile in ((5, 16, 128, "128x128"), (130, 136, 256, "128x128"), (9, 20, 200, "1x128"),
                            (64, 200, 72, "128x128")):
        a = _quantized(randn(m, k, dtype=torch.float64, device="cpu", generator=gen), "1x128", device)
        b = _quantized(randn(n, k, dtype=torch.float64, device="cpu", generator=gen, scale=0.05), b_tile, device)
        yield Sample((*a, *b, _out_name(dtype)), {}, f"M{m}N{n}K{k}:b{b_tile}", k)
    # tiles of very different magnitudes, at shapes a library GEMM takes (K, N multiples of 128; K/128 not
    # a multiple of 4, and several B blocks; the samples above are too narrow or too short for cuBLAS's
    # block-scaled path): every scale must be applied to its own tile
    for m, n, k, b_tile in ((48, 256, 640, "128x128"), (130, 384, 256, "128x128"), (33, 128, 384, "1x128")):
        a = _spread_tiles(randn(m, k, dtype=torch.float64, device="cpu", generator=gen), 1, gen)
        b = _spread_tiles(randn(n, k, dtype=torch.float64, device="cpu", generator=gen, scale=0.05),
                          TILE if b_tile == "128x128" else 1, gen)
        yield Sample((*_quantized(a, "1x128", device), *_quantized(b, b_tile, device), _out_name(dtype)), {},
                     f"spread:M{m}N{n}K{k}:b{b_tile}", k)


def _grouped_gemm_samples(dtype, device, gen):
    for counts, k, m in (([3, 0, 5, 8], 128, 16), ([0, 0, 4], 72, 24), ([70, 2, 0, 65], 200, 136)):
        x = randn(sum(counts), k, dtype=torch.float64, device="cpu", generator=gen)
        w = randn(len(counts), m, k, dtype=torch.float64, device="cpu", generator=gen, scale=k ** -0.5)
        a = _quantized(x, "1x128", device)
        bq = [fp8_quantize(we, "128x128") for we in w]
        b = torch.stack([q for q, _ in bq]).to(device), torch.stack([s for _, s in bq]).to(device)
        yield Sample((*a, *b, torch.tensor(counts, device=device), _out_name(dtype)), {},
                     f"E{len(counts)}N{sum(counts)}K{k}M{m}", k)


def _linear_samples(dtype, device, gen):
    for lead, k, n in (((6,), 128, 32), ((2, 5), 40, 24), ((130,), 200, 40)):
        x = randn(*lead, k, dtype=dtype, device=device, generator=gen)
        w = randn(n, k, dtype=dtype, device=device, generator=gen, scale=k ** -0.5)
        yield Sample((x, w), {}, f"T{'x'.join(map(str, lead))}K{k}N{n}", max(k, n))


def _grouped_linear_samples(dtype, device, gen):
    for counts, k, m in (([3, 0, 5, 8], 32, 16), ([0, 0, 4], 72, 24), ([70, 2, 0, 65], 136, 40)):
        x = randn(sum(counts), k, dtype=dtype, device=device, generator=gen)
        w = randn(len(counts), m, k, dtype=dtype, device=device, generator=gen, scale=k ** -0.5)
        yield Sample((x, w, torch.tensor(counts, device=device)), {}, f"E{len(counts)}N{sum(counts)}K{k}M{m}",
                     max(k, m))


# quantization is exact: a zero band (every element must equal the reference's)
_EXACT = {torch.float32: (0.0, 0.0), torch.bfloat16: (0.0, 0.0)}
_EXACT_NORM = {torch.float32: 0.0, torch.bfloat16: 0.0}
FP8_DTYPES = (torch.float32, torch.bfloat16)

OPDEFS = [
    OpDef(name="fp8_quantize", signature="fp8_quantize(x[M, K], tile='1x128') -> (q[M, K] float8_e4m3fn, scale)",
          reference=fp8_quantize, samples=_quantize_samples, dtypes=FP8_DTYPES, differentiable=False,
          tolerance=_EXACT, norm_tolerance=_EXACT_NORM),
    OpDef(name="fp8_gemm",
          signature="fp8_gemm(a_q[M, K], a_scale, b_q[N, K], b_scale, out_dtype='bfloat16') -> c[M, N]",
          reference=fp8_gemm, samples=_gemm_samples, dtypes=FP8_DTYPES, differentiable=False,
          error_scale=_gemm_error_scale),
    OpDef(name="fp8_grouped_gemm",
          signature="fp8_grouped_gemm(a_q[N, K], a_scale, b_q[E, M, K], b_scale, counts[E], out_dtype='bfloat16')"
                    " -> c[N, M]",
          reference=fp8_grouped_gemm, samples=_grouped_gemm_samples, dtypes=FP8_DTYPES, differentiable=False,
          error_scale=_grouped_gemm_error_scale),
    OpDef(name="fp8_linear", signature="fp8_linear(x[..., K], weight[N, K]) -> y[..., N]",
          reference=fp8_linear, samples=_linear_samples, dtypes=FP8_DTYPES, error_scale=_linear_error_scale,
          grad_error_scale=_linear_grad_error_scale),
    OpDef(name="fp8_grouped_linear",
          signature="fp8_grouped_linear(x[N, K], weight[E, M, K], counts[E]) -> y[N, M]",
          reference=fp8_grouped_linear, samples=_grouped_linear_samples, dtypes=FP8_DTYPES, grad_inputs=(0, 1),
          error_scale=_grouped_linear_error_scale, grad_error_scale=_grouped_linear_grad_error_scale),
]
