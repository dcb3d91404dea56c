"""MLA's query, key and value for attention, from its projections (reference and OpDef).

Multi-head latent attention splits each query head into a part without position (``Dn``) and a rotary
part (``Dr``), and each key head into its own part without position and a rotary part shared by every
head (the ``k_rope`` of the compressed projection). Attention needs whole heads, so the model rotates the
two rotary parts and joins the pieces:

    q_out = [q[..., :Dn], rope(q[..., Dn:])]
    k_out = [kv[..., :Dn], rope(k_rope) for every head]
    v     = kv[..., Dn:]

One op does this (two joins and two rotations in torch) so that a backend can do it in one pass over
memory each way: the backward writes the query projection's gradient and the key-value projection's
gradient (``[dk[..., :Dn], dv]``) whole, and sums the shared rotary key's gradient over the heads,
where torch's joins and splits each make a copy.
"""

from __future__ import annotations

import torch

from .opdef import OpDef, Sample, randn
from .rope import rope
from .rope_scaling import rope_tables


def mla_qkv(q: torch.Tensor, kv: torch.Tensor, k_rope: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
            interleaved: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``q`` (B, S, H, Dn + Dr), ``kv`` (B, S, H, Dn + Dv), ``k_rope`` (B, S, Dr), tables (S, Dr / 2) ->
    ``(q_out, k_out, v)``: (B, S, H, Dn + Dr) twice and (B, S, H, Dv). ``Dr`` is ``k_rope``'s last size."""
    rope_dim = k_rope.shape[-1]
    nope_dim = q.shape[-1] - rope_dim
    if nope_dim < 0 or kv.shape[-1] < nope_dim or kv.shape[:-1] != q.shape[:-1] or k_rope.shape[:-1] != q.shape[:2]:
        raise ValueError(f"mla_qkv: q {tuple(q.shape)}, kv {tuple(kv.shape)} and k_rope {tuple(k_rope.shape)} "
                         "are not (B, S, H, Dn + Dr), (B, S, H, Dn + Dv) and (B, S, Dr)")
    b, s, h, _ = q.shape
    q_nope, q_pe = q.split([nope_dim, rope_dim], dim=-1)
    k_nope, v = kv.split([nope_dim, kv.shape[-1] - nope_dim], dim=-1)
    # rope rotates (..., seq, dim): heads-first views
    q_pe = rope(q_pe.transpose(1, 2), cos, sin, interleaved).transpose(1, 2)
    k_pe = rope(k_rope.unsqueeze(1), cos, sin, interleaved).transpose(1, 2)
    return (torch.cat([q_nope, q_pe], dim=-1), torch.cat([k_nope, k_pe.expand(b, s, h, rope_dim)], dim=-1), v)


def _samples(dtype, device, gen):
    # (B, S, H, Dn, Dr, Dv): openseek-small's ratios at a small size, sizes that are not powers of two, one head,
    # one position, no positions
    for b, s, h, dn, dr, dv in [(2, 16, 3, 32, 16, 32), (1, 9, 2, 24, 12, 40), (2, 5, 1, 16, 16, 16),
                                (1, 1, 4, 8, 4, 8), (1, 0, 2, 8, 4, 8)]:
        cos, sin = rope_tables(dr, s, device=device)
        for interleaved in (False, True):
            # the projections as the model makes them: q and kv viewed from (B, S, H * D) outputs, k_rope the
            # tail of the compressed projection (strided)
            q = randn(b, s, h * (dn + dr), dtype=dtype, device=device, generator=gen).view(b, s, h, dn + dr)
            kv = randn(b, s, h * (dn + dv), dtype=dtype, device=device, generator=gen).view(b, s, h, dn + dv)
            k_rope = randn(b, s, 12 + dr, dtype=dtype, device=device, generator=gen)[..., 12:]
            label = f"B{b}xS{s}xH{h}:nope{dn}-rope{dr}-v{dv}:{'interleaved' if interleaved else 'half'}"
            yield Sample((q, kv, k_rope, cos, sin), {"interleaved": interleaved}, label, reduction_length=h)


OPDEFS = [OpDef(name="mla_qkv",
                signature="mla_qkv(q[B, S, H, Dn+Dr], kv[B, S, H, Dn+Dv], k_rope[B, S, Dr], cos[S, Dr/2], "
                          "sin[S, Dr/2], interleaved=False) -> (q_out[B, S, H, Dn+Dr], k_out[B, S, H, Dn+Dr], "
                          "v[B, S, H, Dv])",
                reference=mla_qkv, samples=_samples, grad_inputs=(0, 1, 2),
                doc="q_out = [q_nope, rope(q_rope)], k_out = [k_nope, rope(k_rope) on every head], v = kv's tail. "
                    "v may be a view of kv. The rotation is the rope op's (either layout).")]
