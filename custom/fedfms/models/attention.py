"""Memory-efficient attention for SAM's image encoder, numerically the same as segment-anything's.

SAM adds decomposed relative-position terms to the attention logits, which forces the stock module to
materialise the full (heads x N x N) matrix — at 1024 px each global block keeps 12 x 4096 x 4096 values
per image for backward. Passing the terms as an ``attn_mask`` to ``scaled_dot_product_attention`` saves
nothing (the mask needs gradients, so no fused kernel runs). Instead the terms are folded into the dot
product: for query i and key j = (row r, column c)

    scale * q_i . k_j + relh[i, r] + relw[i, c]  =  [scale * q_i, relh[i], relw[i]] . [k_j, onehot(r), onehot(c)]

so SDPA runs with no mask and scale 1 (value zero-padded to the same head size) and a fused kernel applies.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from segment_anything.modeling.image_encoder import Attention, get_rel_pos


class FusedRelPosAttention(nn.Module):
    """Drop-in for ``segment_anything``'s ``Attention``: same parameters under the same names."""

    def __init__(self, attn: Attention):
        super().__init__()
        self.num_heads, self.scale, self.use_rel_pos = attn.num_heads, attn.scale, attn.use_rel_pos
        self.qkv, self.proj = attn.qkv, attn.proj
        if self.use_rel_pos:
            self.rel_pos_h, self.rel_pos_w = attn.rel_pos_h, attn.rel_pos_w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, _ = x.shape
        qkv = self.qkv(x).reshape(B, H * W, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, heads, N, d)
        d = q.shape[-1]
        if not self.use_rel_pos:
            out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        else:
            rh = get_rel_pos(H, H, self.rel_pos_h).to(q.dtype)  # (H, H, d)
            rw = get_rel_pos(W, W, self.rel_pos_w).to(q.dtype)  # (W, W, d)
            grid = q.reshape(B, self.num_heads, H, W, d)
            rel_h = torch.einsum("bnhwc,hkc->bnhwk", grid, rh).reshape(B, self.num_heads, H * W, H)
            rel_w = torch.einsum("bnhwc,wkc->bnhwk", grid, rw).reshape(B, self.num_heads, H * W, W)
            rows = torch.arange(H, device=x.device).repeat_interleave(W)
            cols = torch.arange(W, device=x.device).repeat(H)
            key_pos = torch.cat([F.one_hot(rows, H), F.one_hot(cols, W)], dim=-1).to(q.dtype)  # (N, H+W)
            extra = H + W
            pad = (-(d + extra)) % 8  # fused kernels want head sizes in multiples of 8
            q2 = torch.cat([q * self.scale, rel_h, rel_w, q.new_zeros(B, self.num_heads, H * W, pad)], dim=-1)
            k2 = torch.cat([k, key_pos.expand(B, self.num_heads, -1, -1), k.new_zeros(B, self.num_heads, H * W, pad)], dim=-1)
            v2 = F.pad(v, (0, extra + pad))
            out = F.scaled_dot_product_attention(q2, k2, v2, scale=1.0)[..., :d]
        out = out.reshape(B, self.num_heads, H, W, d).permute(0, 2, 3, 1, 4).reshape(B, H, W, -1)
        return self.proj(out)


def use_fused_attention(encoder: nn.Module) -> nn.Module:
    """Swap every block's attention of a SAM image encoder for :class:`FusedRelPosAttention`, in place."""
    for block in encoder.blocks:
        if isinstance(block.attn, Attention):
            block.attn = FusedRelPosAttention(block.attn)
    return encoder
