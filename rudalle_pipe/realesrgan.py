"""Real-ESRGAN super-resolution: the RRDBNet generator, its loader and a tiled upscaling function.

* :class:`RRDBNetConfig` / :class:`RRDBNet`: the ESRGAN "Residual in Residual Dense Block" network
  in the key layout of the Real-ESRGAN ``.pth`` files (``conv_first``, ``body.N.rdb{1,2,3}.conv{1..5}``,
  ``conv_body``, ``conv_up1``, ``conv_up2``, [``conv_up3`` for x8], ``conv_hr``, ``conv_last``).
* :func:`infer_rrdbnet_config` reads the sizes and scale off a state dict, so other Real-ESRGAN
  family files (``RealESRGAN_x4plus``, ``RealESRGAN_x4plus_anime_6B``, ...) load without a config.
* :func:`load_rrdbnet` / :func:`get_realesrgan`: file (or registry name) -> module, built on the
  ``meta`` device and filled tensor by tensor.
* :func:`super_resolution`: list of PIL images -> list of PIL images, ``scale`` times larger, cut
  into overlapping tiles that are blended with a smooth window.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from rudalle_pipe.hub import download, load_state_dict_lazily, on_meta, read_checkpoint
from rudalle_pipe.images import check_images
from rudalle_pipe.checks import check_int
from rudalle_pipe.registry import PRETRAINED

logger = logging.getLogger(__name__)

__all__ = [
    "RRDBNetConfig",
    "RRDBNet",
    "RealESRGANWeights",
    "REALESRGAN_MODELS",
    "list_realesrgan",
    "unwrap_realesrgan_state_dict",
    "infer_rrdbnet_config",
    "load_rrdbnet",
    "get_realesrgan",
    "super_resolution",
]

# scale -> pixel-unshuffle factor applied before conv_first (x1 and x2 run the trunk at 1/4, 1/2 size)
_UNSHUFFLE = {1: 4, 2: 2, 4: 1, 8: 1}


@dataclass(frozen=True)
class RRDBNetConfig:
    num_in_ch: int = 3  # image channels in (RGB)
    num_out_ch: int = 3  # image channels out (RGB)
    num_feat: int = 64  # trunk width (channels of every RRDB)
    num_block: int = 23  # number of RRDBs in the trunk (6 for the anime_6B model)
    num_grow_ch: int = 32  # channels added by each conv inside a dense block
    scale: int = 4  # upscaling factor: 1 or 2 (pixel-unshuffle first), 4, or 8 (third up-conv)

    def __post_init__(self) -> None:
        if self.scale not in _UNSHUFFLE:
            raise ValueError(f"scale={self.scale!r} is not supported; choose one of {sorted(_UNSHUFFLE)}")
        for name in ("num_in_ch", "num_out_ch", "num_feat", "num_block", "num_grow_ch"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")


class ResidualDenseBlock(nn.Module):
    """Five 3x3 convs, each fed the concatenation of the input and all earlier outputs.

    ``[B, F, H, W] -> [B, F, H, W]``; output = input + 0.2 * conv5(...).
    """

    def __init__(self, num_feat: int, num_grow_ch: int) -> None:
        super().__init__()
        g = num_grow_ch
        self.conv1 = nn.Conv2d(num_feat, g, 3, 1, 1)
        self.conv2 = nn.Conv2d(num_feat + g, g, 3, 1, 1)
        self.conv3 = nn.Conv2d(num_feat + 2 * g, g, 3, 1, 1)
        self.conv4 = nn.Conv2d(num_feat + 3 * g, g, 3, 1, 1)
        self.conv5 = nn.Conv2d(num_feat + 4 * g, num_feat, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = [x]
        for conv in (self.conv1, self.conv2, self.conv3, self.conv4):
            feats.append(F.leaky_relu(conv(torch.cat(feats, dim=1)), 0.2, inplace=True))  # (B, g, H, W)
        return x + 0.2 * self.conv5(torch.cat(feats, dim=1))  # (B, F, H, W)


class RRDB(nn.Module):
    """Three dense blocks in a row with a 0.2-scaled residual around them. ``[B, F, H, W]`` in and out."""

    def __init__(self, num_feat: int, num_grow_ch: int) -> None:
        super().__init__()
        self.rdb1 = ResidualDenseBlock(num_feat, num_grow_ch)
        self.rdb2 = ResidualDenseBlock(num_feat, num_grow_ch)
        self.rdb3 = ResidualDenseBlock(num_feat, num_grow_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 0.2 * self.rdb3(self.rdb2(self.rdb1(x)))


class RRDBNet(nn.Module):
    """The Real-ESRGAN generator.

    ``forward``: ``[B, num_in_ch, H, W]`` float in [0, 1] (RGB) -> ``[B, num_out_ch, scale*H, scale*W]``,
    the *raw* network output: it is not clamped and can leave [0, 1] slightly (clamp before display;
    :func:`super_resolution` does). For scale 2 (1), H and W must be multiples of 2 (4), because the
    input is pixel-unshuffled before ``conv_first``.
    """

    def __init__(self, config: RRDBNetConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.conv_first = nn.Conv2d(c.num_in_ch * self.input_multiple**2, c.num_feat, 3, 1, 1)
        self.body = nn.Sequential(*(RRDB(c.num_feat, c.num_grow_ch) for _ in range(c.num_block)))
        self.conv_body = nn.Conv2d(c.num_feat, c.num_feat, 3, 1, 1)
        # each up-conv follows a nearest x2: x1, x2 and x4 models have two, x8 has three
        self.conv_up1 = nn.Conv2d(c.num_feat, c.num_feat, 3, 1, 1)
        self.conv_up2 = nn.Conv2d(c.num_feat, c.num_feat, 3, 1, 1)
        if c.scale == 8:
            self.conv_up3 = nn.Conv2d(c.num_feat, c.num_feat, 3, 1, 1)
        self.conv_hr = nn.Conv2d(c.num_feat, c.num_feat, 3, 1, 1)
        self.conv_last = nn.Conv2d(c.num_feat, c.num_out_ch, 3, 1, 1)

    @property
    def scale(self) -> int:
        """Output size / input size."""
        return self.config.scale

    @property
    def input_multiple(self) -> int:
        """Input height and width must be multiples of this (the pixel-unshuffle factor)."""
        return _UNSHUFFLE[self.config.scale]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.input_multiple
        if x.ndim != 4 or x.shape[2] % m or x.shape[3] % m:
            raise ValueError(
                f"RRDBNet x{self.scale} wants a [B, C, H, W] input with H and W multiples of {m}, "
                f"got shape {tuple(x.shape)}"
            )
        if m > 1:
            x = F.pixel_unshuffle(x, m)  # (B, C*m*m, H/m, W/m)
        feat = self.conv_first(x)  # (B, F, h, w)
        feat = feat + self.conv_body(self.body(feat))  # (B, F, h, w)
        ups = [self.conv_up1, self.conv_up2] + ([self.conv_up3] if self.scale == 8 else [])
        for conv in ups:
            feat = F.interpolate(feat, scale_factor=2, mode="nearest")  # (B, F, 2h, 2w)
            feat = F.leaky_relu(conv(feat), 0.2, inplace=True)
        return self.conv_last(F.leaky_relu(self.conv_hr(feat), 0.2, inplace=True))  # (B, out, s*H, s*W)


# ----------------------------------------------------------------------------- registry and loading


@dataclass(frozen=True)
class RealESRGANWeights:
    repo_id: str  # Hugging Face Hub repo holding the file
    filename: str  # file inside the repo
    config: RRDBNetConfig  # architecture of the file


# Derived from the package registry (rudalle_pipe.registry), the single source of names and files.
REALESRGAN_MODELS: Mapping[str, RealESRGANWeights] = MappingProxyType({
    name: RealESRGANWeights(entry.repo_id, entry.filename, RRDBNetConfig(**entry.config))
    for name, entry in PRETRAINED.items() if entry.kind == "realesrgan"
})
_OVERRIDABLE = ("num_feat", "num_block", "num_grow_ch")


def list_realesrgan() -> list[str]:
    """Names accepted by :func:`get_realesrgan`."""
    return sorted(REALESRGAN_MODELS)


def unwrap_realesrgan_state_dict(raw: Mapping[str, object]) -> dict[str, torch.Tensor]:
    """Return the weights of a Real-ESRGAN file: ``raw["params_ema"]``, else ``raw["params"]``, else ``raw``.

    Raises:
        ValueError: ``raw`` (or the chosen entry) is not a dict of tensors.
    """
    if not isinstance(raw, Mapping):
        raise ValueError(f"a Real-ESRGAN checkpoint must hold a dict, got {type(raw).__name__}")
    sd = raw.get("params_ema", raw.get("params", raw))
    if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(
            "the Real-ESRGAN checkpoint holds no dict of tensors under 'params_ema', 'params' or at "
            f"top level (top-level keys: {sorted(raw)[:10]})"
        )
    return dict(sd)


def infer_rrdbnet_config(state_dict: Mapping[str, torch.Tensor]) -> RRDBNetConfig:
    """Read an :class:`RRDBNetConfig` off the key names and shapes of an RRDBNet state dict.

    ``num_feat``, ``num_grow_ch``, ``num_out_ch`` and ``num_block`` come straight from shapes and keys;
    ``conv_up3`` means scale 8; otherwise the scale follows from the ``conv_first`` input channels
    (``num_in_ch`` times 1, 4 or 16 for scale 4, 2 or 1), assuming ``num_in_ch == num_out_ch``.

    Raises:
        ValueError: a needed key is missing or the channel counts fit no scale.
    """
    need = ("conv_first.weight", "conv_last.weight", "body.0.rdb1.conv1.weight")
    missing = [k for k in need if k not in state_dict]
    if missing:
        raise ValueError(
            f"not an RRDBNet (Real-ESRGAN) state dict: missing {missing}; first keys: {list(state_dict)[:5]}"
        )
    num_feat, first_in = state_dict["conv_first.weight"].shape[:2]
    num_out_ch = state_dict["conv_last.weight"].shape[0]
    num_grow_ch = state_dict["body.0.rdb1.conv1.weight"].shape[0]
    num_block = 1 + max(int(m.group(1)) for k in state_dict if (m := re.match(r"body\.(\d+)\.", k)))
    if "conv_up3.weight" in state_dict:
        scale = 8
    else:
        by_factor = {_UNSHUFFLE[s] ** 2: s for s in (1, 2, 4)}  # {16: 1, 4: 2, 1: 4}
        factor = first_in // num_out_ch if first_in % num_out_ch == 0 else None
        if factor not in by_factor:
            raise ValueError(
                f"conv_first takes {first_in} channels and conv_last gives {num_out_ch}: the ratio fits "
                f"no RRDBNet scale (expected 1, 4 or 16 for scale 4, 2 or 1)"
            )
        scale = by_factor[factor]
    num_in_ch = first_in // _UNSHUFFLE[scale] ** 2
    return RRDBNetConfig(num_in_ch, num_out_ch, num_feat, num_block, num_grow_ch, scale)


def load_rrdbnet(
    path: str | os.PathLike,
    config: RRDBNetConfig | None = None,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> RRDBNet:
    """Load a Real-ESRGAN ``.pth`` (or ``.safetensors``) file into an :class:`RRDBNet` in eval mode.

    ``config=None`` infers it from the file (:func:`infer_rrdbnet_config`). The module is built on the
    ``meta`` device and each tensor is cast to ``dtype`` and moved to ``device`` once.

    Raises:
        ValueError: unreadable file, or keys/shapes that do not fit ``config`` (all of them listed).
    """
    state_dict = unwrap_realesrgan_state_dict(read_checkpoint(path))
    if config is None:
        config = infer_rrdbnet_config(state_dict)
        logger.info("inferred %s from %s", config, path)
    with on_meta():
        model = RRDBNet(config)
    load_state_dict_lazily(model, state_dict, what=str(path), dtype=dtype, device=device)
    return model.eval()


def get_realesrgan(
    name: str,
    *,
    checkpoint_path: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    cache_dir: str | os.PathLike | None = None,
    **config_overrides: int,
) -> RRDBNet:
    """Build the registered Real-ESRGAN model ``name`` ("x2", "x4", "x8") with its weights.

    The file comes from ``checkpoint_path`` when given, else from the Hub (see
    :data:`REALESRGAN_MODELS`; cached, ``HF_HUB_OFFLINE``-aware). ``config_overrides`` may replace
    ``num_feat``, ``num_block`` and ``num_grow_ch`` of the registered config (for small test files).

    Raises:
        ValueError: unknown ``name``; weights that do not fit the config.
        TypeError: an unknown override name.
        rudalle_pipe.hub.WeightsNotFoundError: not cached and cannot be downloaded.
    """
    if name not in REALESRGAN_MODELS:
        raise ValueError(f"unknown Real-ESRGAN model {name!r}; available: {list_realesrgan()}")
    unknown = sorted(set(config_overrides) - set(_OVERRIDABLE))
    if unknown:
        raise TypeError(f"unknown config override(s) {unknown}; valid ones: {list(_OVERRIDABLE)}")
    entry = REALESRGAN_MODELS[name]
    config = dataclasses.replace(entry.config, **config_overrides)
    if checkpoint_path is None:
        checkpoint_path = download(entry.repo_id, entry.filename, cache_dir=cache_dir)
    return load_rrdbnet(checkpoint_path, config, device=device, dtype=dtype)


# ----------------------------------------------------------------------------- tiled upscaling


def _tile_span(length: int, tile: int, overlap: int, multiple: int = 1) -> tuple[int, list[int]]:
    """Tile size and start offsets that cover ``[0, length)`` with as few tiles of at most ``tile`` as possible.

    Neighbours overlap by at least ``overlap``. The size is shrunk to the smallest that still covers
    ``length`` with that many tiles (less wasted compute), and starts are spread evenly. Everything
    is a multiple of ``multiple``; ``length`` and ``tile`` must be multiples of it too.
    """
    units, tile_u, overlap_u = length // multiple, tile // multiple, -(-overlap // multiple)
    if units <= tile_u:
        return length, [0]
    n = -(-(units - overlap_u) // (tile_u - overlap_u))
    size_u = -(-(units + (n - 1) * overlap_u) // n)  # <= tile_u
    return multiple * size_u, [multiple * round(i * (units - size_u) / (n - 1)) for i in range(n)]


def _tile_grid(x: torch.Tensor, tile: int | None, overlap: int, multiple: int) -> list[tuple[int, int, int, int]]:
    """Tiles ``(top, left, height, width)`` covering the last two dims of ``x``; one tile when ``tile`` is falsy."""
    h, w = x.shape[-2:]
    (th, ys), (tw, xs) = ((h, [0]), (w, [0])) if not tile else (
        _tile_span(h, tile, overlap, multiple), _tile_span(w, tile, overlap, multiple))
    return [(y, x0, th, tw) for y in ys for x0 in xs]


def _ramp(size: int, ramp: int, left: bool, right: bool) -> torch.Tensor:
    """1-D blending window ``[size]``: 1 inside, sin^2 ramps over ``ramp`` samples at the flagged ends.

    Values stay > 0, so every pixel keeps a positive total weight.
    """
    w = torch.ones(size)
    if ramp > 0:
        edge = torch.sin(0.5 * math.pi * (torch.arange(min(ramp, size)) + 0.5) / ramp) ** 2
        if left:
            w[: len(edge)] *= edge
        if right:
            w[size - len(edge) :] *= edge.flip(0)
    return w


def _upscale_planes(
    x: torch.Tensor,
    upscaler: nn.Module,
    tile: int | None,
    overlap: int,
    batch_size: int,
    bar: tqdm,
) -> torch.Tensor:
    """Upscale ``x [N, 3, H, W]`` (CPU, [0, 1]) tile by tile -> ``[N, 3, s*H, s*W]`` float32 on CPU.

    H and W must be multiples of the upscaler's input multiple. Tiles of all N planes go through the
    network ``batch_size`` at a time; predictions are weighted by a separable window that ramps down
    towards tile edges shared with a neighbour and are accumulated into a CPU canvas, then normalised.
    """
    param = next(upscaler.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None else torch.float32
    s, m = upscaler.scale, getattr(upscaler, "input_multiple", 1)
    n_planes, _, h, w = x.shape
    boxes = _tile_grid(x, tile, overlap, m)
    jobs = [(p, y, x0, th, tw) for p in range(n_planes) for y, x0, th, tw in boxes]
    canvas = torch.zeros(n_planes, 3, s * h, s * w)  # (N, 3, sH, sW)
    weight = torch.zeros(1, 1, s * h, s * w)  # (1, 1, sH, sW)
    for i in range(0, len(jobs), batch_size):
        chunk = jobs[i : i + batch_size]
        batch = torch.stack([x[p, :, y : y + th, x0 : x0 + tw] for p, y, x0, th, tw in chunk])  # (b, 3, th, tw)
        out = upscaler(batch.to(device=device, dtype=dtype)).float().cpu()  # (b, 3, s*th, s*tw)
        for (p, y, x0, th, tw), pred in zip(chunk, out):
            wy = _ramp(s * th, s * overlap, y > 0, y + th < h)
            wx = _ramp(s * tw, s * overlap, x0 > 0, x0 + tw < w)
            win = wy[:, None] * wx[None, :]  # (s*th, s*tw)
            canvas[p, :, s * y : s * (y + th), s * x0 : s * (x0 + tw)] += pred * win
            if p == 0:
                weight[0, 0, s * y : s * (y + th), s * x0 : s * (x0 + tw)] += win
        bar.update(len(chunk))
    return canvas.div_(weight)


_MODES = {"RGB": (3, False), "RGBA": (3, True), "L": (1, False), "LA": (1, True)}  # mode -> (colour ch, alpha)


MIN_TILE_SIZE = 16  # smallest tile side: below it the per-call overhead of the 23-block network dominates
TILE_OVERLAP_FACTOR = 4  # tile_size >= 4 * tile_overlap


def min_tile_size(tile_overlap: int, input_multiple: int = 1) -> int:
    """The smallest ``tile_size`` allowed with ``tile_overlap``: ``max(16, 4 * overlap)``, the overlap first
    rounded up to a multiple of ``input_multiple`` (as the tiling does), the result rounded up likewise.

    Why: a side of ``L`` px is cut into ``n ~ (L - o) / (t - o)`` tiles of ``t``, so the network sees
    about ``L * t / (t - o)`` px per side; ``t >= 4 * o`` keeps that near 4/3 L. With the rounding
    to whole tiles, the worst case over all lengths < 2000 and overlaps < 200 is 1.40 L per side for
    x4/x8 models (1.45 L for x2, 1.5 L for x1), so a call costs at most ~2x (2.25x) the untiled work.
    Tile 25 with overlap 24 sent ~600x the pixels through the network."""
    m = input_multiple
    overlap = -(-tile_overlap // m) * m
    return -(-max(MIN_TILE_SIZE, TILE_OVERLAP_FACTOR * overlap) // m) * m


def _check_inputs(
    images: Sequence[Image.Image], upscaler: nn.Module, batch_size: int, tile_size: int | None,
    tile_overlap: int, border_pad: int,
) -> None:
    check_images(images, modes=_MODES, hint=". Convert it first, e.g. img.convert('RGBA') for palette "
                 "images with transparency, else img.convert('RGB')")
    scale = getattr(upscaler, "scale", None)
    if not isinstance(upscaler, nn.Module) or not isinstance(scale, int) or scale < 1:
        raise TypeError(f"upscaler must be an nn.Module with an int `scale` >= 1, got {type(upscaler).__name__}")
    check_int("batch_size", batch_size, low=1)
    check_int("tile_overlap", tile_overlap, low=0)
    check_int("border_pad", border_pad, low=0)
    if tile_size is None or check_int("tile_size", tile_size, low=0) == 0:
        return
    m = getattr(upscaler, "input_multiple", 1)
    low = min_tile_size(tile_overlap, m)
    if tile_size < low:
        rounded = f", rounded up to a multiple of {m}" if m > 1 and tile_overlap % m else ""
        raise ValueError(
            f"tile_size ({tile_size}) must be >= {low} = max({MIN_TILE_SIZE}, {TILE_OVERLAP_FACTOR} * tile_overlap "
            f"({tile_overlap}{rounded})), so that tiling costs at most ~2.25x the untiled work; or None/0 for no tiling"
        )
    if tile_size % m:
        raise ValueError(f"tile_size={tile_size} must be a multiple of {m} for a x{scale} upscaler")


def super_resolution(
    images: Sequence[Image.Image],
    upscaler: nn.Module,
    *,
    batch_size: int = 4,
    tile_size: int | None = 192,
    tile_overlap: int = 24,
    border_pad: int = 15,
    progress: bool = True,
) -> list[Image.Image]:
    """Upscale PIL images with ``upscaler`` (an :class:`RRDBNet`, or any module with a ``scale``).

    Args:
        images: PIL images of any size in mode "RGB", "RGBA", "L" or "LA" (others raise; convert them
            first). Gray images go through the network as 3 equal channels and come back as the mean of
            the 3 outputs. Alpha is upscaled the same way, through the network, as a gray image
            (like Real-ESRGAN's own default); a constant alpha (e.g. fully opaque) is copied as is.
        upscaler: maps ``[B, 3, H, W]`` in [0, 1] to ``[B, 3, sH, sW]``; run on its own device and dtype
            (read from its parameters) under ``torch.inference_mode()``. Its train/eval mode is left alone.
        batch_size: tiles per forward call.
        tile_size: side of the square input tiles in pixels; ``None`` or 0 runs each image whole.
            At least ``max(16, 4 * tile_overlap)`` (:func:`min_tile_size`), so that tiling never costs
            more than ~2.25x the untiled work (smaller tiles spend it on overlaps and per-call overhead).
            192 with overlap 24 is close to the original's 240 px patches (192 + 2 * 24) and bounds
            the x4 model's extra CPU memory to about 2 GB in fp32 with batch_size 4 whatever the image
            size (untiled, a 1024 px image needs ~14 GB; see benchmarks/super_resolution.py). Tiles
            are shrunk to the smallest size that covers the image with the same number of tiles, so a
            256 px image (286 px with padding) costs 4 tiles of 155 px, ~1.2x the untiled work.
        tile_overlap: input pixels shared by neighbouring tiles (at least). Inside the overlaps the
            predictions are blended with a sin^2 window, so tile borders leave no seams.
        border_pad: reflect-padding added around each image before tiling and cropped after (the
            original uses 15), so the image border is not degraded by the network's zero padding.
            Clipped to ``size - 1`` on tiny images.
        progress: show a tqdm bar over tiles.

    Returns:
        One PIL image per input, in the input's mode, of size ``(scale*W, scale*H)``; pixel values are
        the network output clamped to [0, 1], times 255, rounded.

    Peak memory: the network sees at most ``batch_size`` tiles of ``tile_size``; the output is
    accumulated on the CPU in float32 (4 planes of the output size, 7 with a non-constant alpha).
    """
    _check_inputs(images, upscaler, batch_size, tile_size, tile_overlap, border_pad)
    s, m = upscaler.scale, getattr(upscaler, "input_multiple", 1)
    plans = []
    for img in images:
        n_ch, has_alpha = _MODES[img.mode]
        arr = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)  # (H, W) or (H, W, C)
        arr = arr.reshape(img.height, img.width, -1).permute(2, 0, 1)  # (C, H, W)
        alpha = arr[-1:] if has_alpha else None  # (1, H, W)
        flat_alpha = alpha is not None and bool((alpha == alpha.flatten()[0]).all())
        planes = [arr[:n_ch].expand(3, -1, -1)] + ([alpha.expand(3, -1, -1)] if has_alpha and not flat_alpha else [])
        x = torch.stack(planes)  # (N, 3, H, W), N = 2 with a non-constant alpha
        py, px = min(border_pad, img.height - 1), min(border_pad, img.width - 1)
        x = F.pad(x, (px, px, py, py), mode="reflect") if py or px else x
        eh, ew = -x.shape[2] % m, -x.shape[3] % m  # grow to a multiple of the unshuffle factor
        x = F.pad(x, (0, ew, 0, eh), mode="replicate") if eh or ew else x
        plans.append((img, x, py, px, alpha.flatten()[0].item() if flat_alpha else None))
    total = sum(x.shape[0] * len(_tile_grid(x, tile_size, tile_overlap, m)) for _, x, *_ in plans)

    results = []
    with torch.inference_mode(), tqdm(total=total, desc="super_resolution", unit="tile", disable=not progress) as bar:
        for img, x, py, px, flat_alpha in plans:
            out = _upscale_planes(x, upscaler, tile_size or None, tile_overlap, batch_size, bar)  # (N, 3, sH', sW')
            out = out[:, :, s * py : s * (py + img.height), s * px : s * (px + img.width)]  # (N, 3, sH, sW)
            n_ch, has_alpha = _MODES[img.mode]
            color = out[0] if n_ch == 3 else out[0].mean(0, keepdim=True)  # (C, sH, sW)
            if has_alpha:  # (1, sH, sW)
                alpha = out[1].mean(0, keepdim=True) if flat_alpha is None else torch.full_like(color[:1], flat_alpha)
            chans = torch.cat([color, alpha] if has_alpha else [color])  # (C', sH, sW)
            arr = (chans.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()  # (sH, sW, C)
            result = Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr)
            assert result.mode == img.mode, (result.mode, img.mode)
            results.append(result)
    return results
