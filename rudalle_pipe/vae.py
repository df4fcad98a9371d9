"""Sber VQGAN: images <-> grids of codes, one of 8192 per 8x8 patch (taming-transformers style).

The image tokenizer of ruDALL-E. Encoding maps an RGB image in [0, 1] to a grid of codebook indices by a
deterministic argmax over the gumbel quantizer's logits; decoding looks the codes up in the codebook and
runs the convolutional decoder. The optional DWT decoder (the "512 px" variant) predicts 12 wavelet
channels instead of RGB and an inverse Haar transform doubles the output size.

Module layout (``VQGAN.state_dict()``) equals the keys of the real Sber files relative to the original
``GumbelVQ`` module: ``encoder.*``, ``quant_conv.*``, ``quantize.{proj,embed}.*``, ``post_quant_conv.*``
and ``decoder.*`` (for DWT: ``decoder.{post_quant_conv,decoder,idwt}.*``). The DWT files add a ``model.``
prefix, which :func:`convert_vqgan_state_dict` strips.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .hub import load_state_dict_lazily, on_meta, read_checkpoint

logger = logging.getLogger(__name__)

__all__ = ["VQGANConfig", "VQGAN", "convert_vqgan_state_dict", "load_vqgan"]

_DWT_OUT_CH = 12  # 3 colours x 4 Haar bands (low, then 3 high bands per colour)
_TRAINING_ONLY_PREFIXES = ("loss.", "discriminator.")  # Lightning training state, unused at inference


@dataclass(frozen=True)
class VQGANConfig:
    """Architecture of the Sber VQGAN; the defaults are the real 256 px model (use ``dwt=True, out_ch=12``
    for the 512 px DWT decoder). Field names follow the original ``ddconfig`` / ``GumbelVQ`` arguments."""

    ch: int = 128  # base width; every level's width ch * ch_mult[i] must be a multiple of norm_groups
    ch_mult: tuple[int, ...] = (1, 1, 2, 4)  # width multiplier per resolution level; len - 1 = log2(f)
    num_res_blocks: int = 2  # ResnetBlocks per level in the encoder (decoder uses one more)
    attn_resolutions: tuple[int, ...] = (32,)  # nominal resolutions (from `resolution`) with self-attention
    z_channels: int = 256  # channels of the encoder output / decoder input
    resolution: int = 256  # nominal training resolution; only used to place attention blocks
    n_embed: int = 8192  # codebook size (number of image tokens)
    embed_dim: int = 256  # codebook vector size
    in_channels: int = 3  # encoder input channels (RGB)
    out_ch: int = 3  # decoder output channels: 3 (RGB), or 12 wavelet bands with dwt=True
    double_z: bool = False  # must be False: the gumbel quantizer takes z_channels, not 2 * z_channels
    dropout: float = 0.0  # dropout inside ResnetBlocks (inactive in eval mode)
    dwt: bool = False  # decoder predicts Haar wavelet bands; the output image is twice as large
    norm_groups: int = 32  # GroupNorm groups (the Sber models use 32); 0 = no normalisation layers

    def __post_init__(self) -> None:
        for name in ("ch_mult", "attn_resolutions"):  # accept lists (e.g. from JSON), store tuples
            value = getattr(self, name)
            if not isinstance(value, (list, tuple)) or not all(isinstance(v, int) and v > 0 for v in value):
                raise ValueError(f"VQGANConfig.{name} must be a sequence of positive ints, got {value!r}")
            object.__setattr__(self, name, tuple(value))
        for name in ("ch", "num_res_blocks", "z_channels", "resolution", "n_embed", "embed_dim",
                     "in_channels", "out_ch"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"VQGANConfig.{name} must be a positive int, got {value!r}")
        if not self.ch_mult:
            raise ValueError("VQGANConfig.ch_mult must have at least one level, got ()")
        if not isinstance(self.norm_groups, int) or self.norm_groups < 0:
            raise ValueError(f"VQGANConfig.norm_groups must be an int >= 0 (0: no normalisation), "
                             f"got {self.norm_groups!r}")
        groups = self.norm_groups or 1
        bad_widths = [self.ch * m for m in (1, *self.ch_mult) if (self.ch * m) % groups]
        if bad_widths:
            raise ValueError(f"VQGANConfig: GroupNorm needs widths divisible by {self.norm_groups} "
                             f"(norm_groups); ch={self.ch} with ch_mult={self.ch_mult} gives {bad_widths}")
        if self.resolution % self.downsample_factor:
            raise ValueError(f"VQGANConfig.resolution={self.resolution} must be divisible by the "
                             f"downsampling factor {self.downsample_factor} (2 ** (len(ch_mult) - 1))")
        if self.embed_dim != self.z_channels:
            raise ValueError(f"VQGANConfig: embed_dim ({self.embed_dim}) must equal z_channels "
                             f"({self.z_channels}): the quantizer's logit conv, sized for z_channels, "
                             f"reads quant_conv's embed_dim outputs")
        if self.double_z:
            raise ValueError("VQGANConfig.double_z=True is not supported: the gumbel quantizer expects "
                             "z_channels encoder outputs; use double_z=False")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"VQGANConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if self.dwt and self.out_ch != _DWT_OUT_CH:
            raise ValueError(f"VQGANConfig: dwt=True needs out_ch={_DWT_OUT_CH} (3 low + 9 high Haar bands), "
                             f"got out_ch={self.out_ch}")

    @property
    def downsample_factor(self) -> int:
        """Image pixels per token along each side when encoding (8 for the Sber VQGAN)."""
        return 2 ** (len(self.ch_mult) - 1)


# ----------------------------------------------------------------------------- building blocks


def _group_norm(channels: int, groups: int) -> nn.Module:
    """GroupNorm with ``groups`` groups, or no normalisation (identity) for ``groups == 0``."""
    if groups == 0:
        return nn.Identity()
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """GroupNorm -> swish -> conv3x3, twice, plus a (1x1 conv if widths differ) shortcut. (B, C_in, H, W)
    -> (B, C_out, H, W)."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float, groups: int = 32):
        super().__init__()
        self.norm1 = _group_norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _group_norm(out_channels, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, C_out, H, W)
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))  # (B, C_out, H, W)
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions with 1x1-conv q/k/v/proj_out, residual."""

    def __init__(self, channels: int, groups: int = 32):
        super().__init__()
        self.norm = _group_norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, _, height, _ = x.shape
        h = self.norm(x)
        q, k, v = (rearrange(conv(h), "b c h w -> b 1 (h w) c") for conv in (self.q, self.k, self.v))
        h = F.scaled_dot_product_attention(q, k, v)  # (B, 1, H*W, C), scores scaled by C ** -0.5
        h = rearrange(h, "b 1 (h w) c -> b c h w", h=height)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    """Zero-pad right and bottom by one pixel, then a stride-2 3x3 conv: (B, C, H, W) -> (B, C, H/2, W/2)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv: (B, C, H, W) -> (B, C, 2H, 2W)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    """ResnetBlock -> AttnBlock -> ResnetBlock at the lowest resolution, width preserved."""

    def __init__(self, channels: int, dropout: float, groups: int = 32):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout, groups)
        self.attn_1 = AttnBlock(channels, groups)
        self.block_2 = ResnetBlock(channels, channels, dropout, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Level(nn.Module):
    """One resolution level: ResnetBlocks, each followed by its AttnBlock when the level has attention,
    then an optional ``downsample`` (encoder) or ``upsample`` (decoder)."""

    def __init__(self, blocks: list[ResnetBlock], attns: list[AttnBlock], *,
                 downsample: Downsample | None = None, upsample: Upsample | None = None):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList(attns)
        if downsample is not None:
            self.downsample = downsample
        if upsample is not None:
            self.upsample = upsample

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.block):
            h = block(h)
            if len(self.attn):
                h = self.attn[i](h)
        if hasattr(self, "downsample"):
            h = self.downsample(h)  # (B, C, H/2, W/2)
        if hasattr(self, "upsample"):
            h = self.upsample(h)  # (B, C, 2H, 2W)
        return h


class Encoder(nn.Module):
    """(B, in_channels, H, W) in [-1, 1] -> (B, z_channels, H/f, W/f) with f = config.downsample_factor."""

    def __init__(self, config: VQGANConfig):
        super().__init__()
        ch, mult, levels = config.ch, config.ch_mult, len(config.ch_mult)
        self.conv_in = nn.Conv2d(config.in_channels, ch, 3, padding=1)
        res, width = config.resolution, ch
        self.down = nn.ModuleList()
        for i in range(levels):
            blocks, attns = [], []
            for _ in range(config.num_res_blocks):
                blocks.append(ResnetBlock(width, ch * mult[i], config.dropout, config.norm_groups))
                width = ch * mult[i]
                if res in config.attn_resolutions:
                    attns.append(AttnBlock(width, config.norm_groups))
            last = i == levels - 1
            self.down.append(Level(blocks, attns, downsample=None if last else Downsample(width)))
            res = res if last else res // 2
        self.mid = MidBlock(width, config.dropout, config.norm_groups)
        self.norm_out = _group_norm(width, config.norm_groups)
        self.conv_out = nn.Conv2d(width, config.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)  # (B, ch, H, W)
        for level in self.down:
            h = level(h)
        h = self.mid(h)  # (B, ch * ch_mult[-1], H/f, W/f)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, z_channels, H/f, W/f)


class Decoder(nn.Module):
    """(B, z_channels, h, w) -> (B, out_ch, h*f, w*f), unbounded (roughly [-1, 1] for RGB)."""

    def __init__(self, config: VQGANConfig):
        super().__init__()
        ch, mult, levels = config.ch, config.ch_mult, len(config.ch_mult)
        width = ch * mult[-1]
        res = config.resolution // config.downsample_factor
        self.conv_in = nn.Conv2d(config.z_channels, width, 3, padding=1)
        self.mid = MidBlock(width, config.dropout, config.norm_groups)
        up = []  # built from the lowest resolution up, stored (like the original) in level order 0..L-1
        for i in reversed(range(levels)):
            blocks, attns = [], []
            for _ in range(config.num_res_blocks + 1):
                blocks.append(ResnetBlock(width, ch * mult[i], config.dropout, config.norm_groups))
                width = ch * mult[i]
                if res in config.attn_resolutions:
                    attns.append(AttnBlock(width, config.norm_groups))
            up.insert(0, Level(blocks, attns, upsample=Upsample(width) if i != 0 else None))
            res = res * 2 if i != 0 else res
        self.up = nn.ModuleList(up)
        self.norm_out = _group_norm(width, config.norm_groups)
        self.conv_out = nn.Conv2d(width, config.out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))  # (B, ch * ch_mult[-1], h, w)
        for level in reversed(self.up):  # lowest resolution first
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, out_ch, h*f, w*f)


# ----------------------------------------------------------------------------- DWT decoder


class InverseHaar2d(nn.Module):
    """One level of the 2-D inverse discrete wavelet transform with 2-tap filters (db1 = Haar, mode zero).

    The synthesis filters are persistent buffers, as in the original checkpoint (``g0_col``/``g1_col`` of
    shape (1, 1, 2, 1) for the height axis, ``g0_row``/``g1_row`` of shape (1, 1, 1, 2) for the width axis).
    For Haar every filter pair is (1/sqrt2) * ([1, 1], [1, -1]), so the output is, for p, q in {0, 1}:
    ``y[2i+p, 2j+q] = 0.5 * (low + s_p * lh + s_q * hl + s_p * s_q * hh)`` with s_0 = 1, s_1 = -1.
    """

    def __init__(self):
        super().__init__()
        g0, g1 = torch.tensor([1.0, 1.0]) / math.sqrt(2.0), torch.tensor([1.0, -1.0]) / math.sqrt(2.0)
        self.register_buffer("g0_col", g0.reshape(1, 1, 2, 1))
        self.register_buffer("g1_col", g1.reshape(1, 1, 2, 1))
        self.register_buffer("g0_row", g0.reshape(1, 1, 1, 2))
        self.register_buffer("g1_row", g1.reshape(1, 1, 1, 2))

    @staticmethod
    def _synthesize(lo: torch.Tensor, hi: torch.Tensor, g0: torch.Tensor, g1: torch.Tensor, dim: int):
        """Upsample by 2 along ``dim`` (2 = height, 3 = width): out[2i+k] = lo[i] * g0[k] + hi[i] * g1[k]."""
        g0, g1 = g0.flatten(), g1.flatten()
        phases = [lo * g0[k] + hi * g1[k] for k in range(2)]  # each (B, C, h, w)
        return torch.stack(phases, dim=dim + 1).flatten(dim, dim + 1)  # interleave the two phases

    def forward(self, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        """low (B, C, h, w) and high (B, C, 3, h, w) with bands (lh, hl, hh) -> (B, C, 2h, 2w).

        ``lh`` is high-pass along the height (pywt's horizontal detail cH), ``hl`` along the width (cV),
        ``hh`` along both (cD).
        """
        lh, hl, hh = high.unbind(dim=2)
        lo = self._synthesize(low, lh, self.g0_col, self.g1_col, dim=2)  # (B, C, 2h, w)
        hi = self._synthesize(hl, hh, self.g0_col, self.g1_col, dim=2)  # (B, C, 2h, w)
        return self._synthesize(lo, hi, self.g0_row, self.g1_row, dim=3)  # (B, C, 2h, 2w)


class DWTDecoder(nn.Module):
    """The 512 px decoder: its own post_quant_conv, a Decoder with 12 output channels, inverse Haar.

    (B, embed_dim, h, w) quantized latents -> (B, 3, 2*h*f, 2*w*f) image, roughly in [-1, 1].
    """

    def __init__(self, config: VQGANConfig):
        super().__init__()
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.z_channels, 1)
        self.decoder = Decoder(config)
        self.idwt = InverseHaar2d()

    def forward(self, quant: torch.Tensor) -> torch.Tensor:
        bands = self.decoder(self.post_quant_conv(quant))  # (B, 12, H, W)
        low = bands[:, :3]  # (B, 3, H, W): RGB low band
        high = rearrange(bands[:, 3:], "b (c k) h w -> b c k h w", k=3)  # (B, 3, 3, H, W): lh, hl, hh
        return self.idwt(low, high)  # (B, 3, 2H, 2W)


# ----------------------------------------------------------------------------- the model


class GumbelQuantizer(nn.Module):
    """Holds the 1x1 conv to codebook logits (``proj``) and the codebook (``embed``, n_embed x embed_dim)."""

    def __init__(self, config: VQGANConfig):
        super().__init__()
        self.proj = nn.Conv2d(config.z_channels, config.n_embed, 1)
        self.embed = nn.Embedding(config.n_embed, config.embed_dim)


class VQGAN(nn.Module):
    """Sber VQGAN image tokenizer. Built from a config only; load weights with :func:`load_vqgan`.

    ``get_codebook_indices`` maps images to codes, ``decode`` maps codes back to images. Both run under
    ``torch.no_grad``, move inputs to the module's device and dtype, and work with the module cast to
    fp16/bf16; decoded images are always returned as float32.
    """

    def __init__(self, config: VQGANConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.quant_conv = nn.Conv2d(config.z_channels, config.embed_dim, 1)
        self.quantize = GumbelQuantizer(config)
        # With dwt=True this top-level conv is unused (DWTDecoder has its own, as in the original); it is
        # kept so that the real checkpoint loads strictly.
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.z_channels, 1)
        self.decoder = DWTDecoder(config) if config.dwt else Decoder(config)

    @property
    def downsample_factor(self) -> int:
        """Input pixels per code along each side (8)."""
        return self.config.downsample_factor

    @property
    def decode_factor(self) -> int:
        """Decoded pixels per code along each side: 8, or 16 with the DWT decoder."""
        return self.config.downsample_factor * (2 if self.config.dwt else 1)

    @property
    def num_tokens(self) -> int:
        """Codebook size: codes are in [0, num_tokens)."""
        return self.config.n_embed

    @torch.no_grad()
    def get_codebook_indices(self, images: torch.Tensor) -> torch.Tensor:
        """Encode images to codes by a deterministic argmax over the quantizer logits (no gumbel noise).

        Args:
            images: float tensor (B, in_channels, H, W), RGB in [0, 1]; H and W multiples of 8.
        Returns:
            int64 tensor (B, (H/8) * (W/8)) of codes in [0, n_embed), row-major over the code grid.
        """
        self._check_images(images)
        param = self.quant_conv.weight
        x = (2 * images.float() - 1).to(device=param.device, dtype=param.dtype)  # (B, 3, H, W) in [-1, 1]
        h = self.quant_conv(self.encoder(x))  # (B, embed_dim, H/8, W/8)
        logits = self.quantize.proj(h)  # (B, n_embed, H/8, W/8)
        return rearrange(logits.argmax(dim=1), "b h w -> b (h w)")

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Decode a square grid of codes to images.

        Args:
            codes: integer tensor (B, n) with n = s * s, values in [0, n_embed), row-major over the grid.
        Returns:
            float32 tensor (B, 3, s*f, s*f) RGB in [0, 1], f = ``decode_factor`` (8, or 16 for DWT).
        """
        return (self.decode_raw(codes).float().clamp(-1.0, 1.0) + 1.0) * 0.5

    def decode_raw(self, codes: torch.Tensor) -> torch.Tensor:
        """The decoder's output for ``codes`` (B, n), before clamping: (B, 3, s*f, s*f), roughly [-1, 1].
        Differentiable (training uses it); :meth:`decode` is the inference entry point."""
        side = self._check_codes(codes)
        weight = self.quantize.embed.weight  # (n_embed, embed_dim)
        z = F.embedding(codes.to(weight.device), weight)  # (B, n, embed_dim)
        z = rearrange(z, "b (h w) c -> b c h w", h=side)  # (B, embed_dim, s, s)
        if self.config.dwt:
            x = self.decoder(z)  # (B, 3, 16s, 16s); DWTDecoder applies its own post_quant_conv
        else:
            x = self.decoder(self.post_quant_conv(z))  # (B, 3, 8s, 8s)
        return x

    def _check_images(self, images: torch.Tensor) -> None:
        if not isinstance(images, torch.Tensor) or not images.is_floating_point():
            got = images.dtype if isinstance(images, torch.Tensor) else type(images).__name__
            raise TypeError(f"images must be a float tensor (B, 3, H, W) in [0, 1], got {got}")
        f, c = self.downsample_factor, self.config.in_channels
        if images.ndim != 4 or images.shape[1] != c or images.shape[2] % f or images.shape[3] % f:
            raise ValueError(f"images must have shape (B, {c}, H, W) with H and W multiples of {f}, "
                             f"got {tuple(images.shape)}")
        if images.numel() and (images.min() < 0 or images.max() > 1):
            raise ValueError(f"images must be in [0, 1], got values in [{images.min().item():.4g}, "
                             f"{images.max().item():.4g}]; convert from [-1, 1] or [0, 255] first")

    def _check_codes(self, codes: torch.Tensor) -> int:
        """Validate codes (B, n) and return the grid side s = sqrt(n)."""
        if not isinstance(codes, torch.Tensor) or codes.is_floating_point() or codes.is_complex() \
                or codes.dtype == torch.bool:
            got = codes.dtype if isinstance(codes, torch.Tensor) else type(codes).__name__
            raise TypeError(f"codes must be an integer tensor (B, n), got {got}")
        if codes.ndim != 2 or codes.shape[1] == 0:
            raise ValueError(f"codes must have shape (B, n) with n > 0, got {tuple(codes.shape)}")
        n = codes.shape[1]
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"codes must form a square grid, but n={n} is not a perfect square "
                             f"(e.g. 1024 = 32 x 32)")
        if codes.numel():
            low, high = codes.min().item(), codes.max().item()
            if low < 0 or high >= self.num_tokens:
                raise ValueError(f"codes must be in [0, {self.num_tokens}), got values in [{low}, {high}]")
        return side


# ----------------------------------------------------------------------------- loading


def convert_vqgan_state_dict(raw: Mapping[str, object], config: VQGANConfig) -> dict[str, torch.Tensor]:
    """Turn what :func:`~rudalle_pipe.hub.read_checkpoint` returns for a Sber VQGAN file into
    :class:`VQGAN`'s key layout.

    Accepts a Lightning dict (weights under ``state_dict``) or a bare state dict, with or without the
    ``model.`` prefix of the DWT file. Drops training-only ``loss.*`` / ``discriminator.*`` keys; any
    other unknown key is kept so that the key check reports it.

    Raises:
        ValueError: ``raw`` holds no state dict, or it is a DWT checkpoint while ``config.dwt`` is False
            (or the reverse).
    """
    state = raw.get("state_dict", raw) if isinstance(raw, Mapping) else None
    if not isinstance(state, Mapping) or not any(isinstance(v, torch.Tensor) for v in state.values()):
        keys = list(raw)[:10] if isinstance(raw, Mapping) else type(raw).__name__
        raise ValueError(f"not a VQGAN checkpoint: expected a dict of tensors or a Lightning dict with "
                         f"'state_dict', found {keys}")
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        key = key.removeprefix("model.")
        if not key.startswith(_TRAINING_ONLY_PREFIXES):
            out[key] = value
    is_dwt = any(k.startswith("decoder.idwt.") for k in out)
    if is_dwt != config.dwt:
        kind = "the DWT (512 px) decoder" if is_dwt else "the plain (256 px) decoder"
        raise ValueError(f"the checkpoint holds {kind} but config.dwt={config.dwt}; pass a config with "
                         f"dwt={is_dwt}" + (f", out_ch={_DWT_OUT_CH}" if is_dwt else ", out_ch=3"))
    return out


def load_vqgan(
    path: str | os.PathLike,
    config: VQGANConfig,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> VQGAN:
    """Read a Sber VQGAN checkpoint, check it against ``config`` and return the model in eval mode.

    The module is built on the meta device and the weights are assigned tensor by tensor (cast to
    ``dtype``, moved to ``device``), so no second copy is allocated.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is truncated/corrupt, or its keys or shapes do not fit ``config`` (the
            message lists every missing, unexpected and mis-shaped key).
    """
    state = convert_vqgan_state_dict(read_checkpoint(path), config)
    with on_meta():
        model = VQGAN(config)
    load_state_dict_lazily(model, state, what=str(path), dtype=dtype, device=device)
    logger.info("loaded VQGAN%s from %s (%s, %s)", " with DWT decoder" if config.dwt else "", path, device,
                dtype)
    return model.eval()
