"""Self-attention that tensor parallelism can split by whole heads, with the plain network's weights.

torchvision's ``nn.MultiheadAttention`` keeps q, k and v in one ``in_proj_weight`` parameter and its forward bypasses
``out_proj``'s; timm's ``Attention`` fuses them in one ``qkv`` Linear. Either way q, k and v are stacked outermost
(``q; k; v``), so a column split hands one process all of q and part of k. Here q, k and v are three Linear layers:
each one's rows are ordered head by head, so a column split gives every process whole heads of all three, and the
forward reads its head count from the width it got. The weights keep their plain names but one: the fused tensor
``in_proj_weight`` (``qkv.weight``) becomes ``in_proj.q.weight``, ``in_proj.k.weight``, ``in_proj.v.weight``
(``qkv.q.weight``, ...), its three row blocks, so converting a state dict either way only cuts or joins tensors
(``imgcls.checkpoints.join_state`` and ``split_state``).
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from imgcls.checkpoints import QKV_PARTS


class QKV(nn.Module):
    """q, k and v as three Linear layers, each split by columns (whole heads) under tensor parallelism."""

    def __init__(self, dim: int, width: int, bias: bool) -> None:
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(dim, width, bias=bias) for _ in QKV_PARTS)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return self.q(x), self.k(x), self.v(x)  # each (B, N, local heads * head_dim)


def attend(
    qkv: tuple[Tensor, Tensor, Tensor],
    head_dim: int,
    dropout: float,
    attn_mask: Tensor | None = None,
    is_causal: bool = False,
) -> Tensor:
    """Scaled dot-product attention over the heads present: ``(B, N, H * head_dim)`` in, the same shape out."""
    batch, tokens, _ = qkv[0].shape
    q, k, v = (t.view(batch, tokens, -1, head_dim).transpose(1, 2) for t in qkv)  # (B, H, N, head_dim)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout, is_causal=is_causal)
    return out.transpose(1, 2).reshape(batch, tokens, -1)


class SplitMultiheadAttention(nn.Module):
    """Stands in for torchvision's ``nn.MultiheadAttention(batch_first=True)`` in a ViT ``EncoderBlock``.

    Self-attention only (``key`` and ``value`` are taken to be ``query``, as the block passes them); returns
    ``(output, None)``, as the block asks for no attention weights.
    """

    def __init__(self, dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.dropout = num_heads, dim // num_heads, dropout  # head count: unsplit
        self.in_proj = QKV(dim, dim, bias)
        self.out_proj = nn.Linear(dim, dim, bias=bias)

    def forward(self, query: Tensor, *args: object, **kwargs: object) -> tuple[Tensor, None]:
        out = attend(self.in_proj(query), self.head_dim, self.dropout if self.training else 0.0)
        return self.out_proj(out), None


class SplitTimmAttention(nn.Module):
    """Stands in for timm's ``Attention`` without q/k normalisation, output normalisation or gating; an attention
    mask must be the same for every head (a ViT passes none)."""

    def __init__(
        self, dim: int, num_heads: int, head_dim: int, bias: bool, attn_drop: float, proj: nn.Linear, proj_drop: float
    ) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.attn_drop = num_heads, head_dim, attn_drop  # head count: unsplit
        self.qkv = QKV(dim, num_heads * head_dim, bias)
        self.proj = nn.Linear(proj.in_features, proj.out_features, bias=proj.bias is not None)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        out = attend(self.qkv(x), self.head_dim, self.attn_drop if self.training else 0.0, attn_mask, is_causal)
        return self.proj_drop(self.proj(out))


SPLIT_ATTENTION = (SplitMultiheadAttention, SplitTimmAttention)


def split_attention(attention: nn.Module) -> nn.Module:
    """An empty stand-in (on the meta device) for ``attention`` with q, k and v split; ``ValueError`` says why not.

    The caller carries the weights over, named as ``imgcls.checkpoints.split_names`` says.
    """
    with torch.device("meta"):
        if isinstance(attention, nn.MultiheadAttention):
            if not (attention.batch_first and attention._qkv_same_embed_dim) or attention.bias_k is not None:
                raise ValueError("a MultiheadAttention other than a ViT's (batch first, one embedding size, no bias_k)")
            bias = attention.in_proj_bias is not None
            return SplitMultiheadAttention(attention.embed_dim, attention.num_heads, attention.dropout, bias)
        if _is_timm_attention(attention):
            extras = [
                name for name in ("q_norm", "k_norm", "norm") if not isinstance(getattr(attention, name), nn.Identity)
            ]
            if extras or getattr(attention, "gate", None) is not None:
                raise ValueError(f"timm's Attention with {', '.join(extras) or 'gate'} (normalised or gated heads)")
            return SplitTimmAttention(
                attention.qkv.in_features, attention.num_heads, attention.head_dim, attention.qkv.bias is not None,
                attention.attn_drop.p, attention.proj, attention.proj_drop.p,
            )  # fmt: skip
    raise ValueError(f"{type(attention).__qualname__} is not an attention layer this template can split")


def _is_timm_attention(module: nn.Module) -> bool:
    kind = type(module)
    return kind.__name__ == "Attention" and kind.__module__.startswith("timm.") and isinstance(module.qkv, nn.Linear)
