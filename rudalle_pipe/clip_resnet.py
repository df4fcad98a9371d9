"""A small CLIP, open_clip's ModifiedResNet image tower with its text transformer, built without importing open_clip.

Importing open_clip costs about 2 s on the 2-core CPU (it pulls in torchvision, ``torch._dynamo`` and
transformers): more than the whole rest of the README's first command. The bundled demo's CLIP has this
architecture, so :func:`rudalle_pipe.clip.get_clip` builds a ``local-dir:`` folder here when its config asks for
nothing else (:func:`unsupported` says why not); every other CLIP goes through open_clip.

The state-dict keys, ``encode_image``/``encode_text``/``forward`` and the eval preprocessing are those of open_clip
3.3's ``CLIP`` with a list of ``layers`` in ``vision_cfg`` (the CLIP paper's ResNet: a 3-convolution stem, average
pooling before strided convolutions, attention pooling at the end). ``tests/test_clip_resnet.py`` checks
features and preprocessing against open_clip on the demo's weights and on random ones.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from .images import images_to_tensor

__all__ = ["ResNetCLIP", "Preprocess", "unsupported"]

# the config keys this module builds; anything else (or another value) goes to open_clip
_TOP = {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu"}
_VISION = {"layers", "width", "image_size", "head_width"}
_TEXT = {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio", "pad_id", "eos_id", "pool_type",
         "proj_type", "proj_bias"}
_PREPROCESS = {"size", "mean", "std", "interpolation", "resize_mode"}


def unsupported(config: dict[str, Any]) -> str:
    """Why an ``open_clip_config.json`` (``{"model_cfg": ..., "preprocess_cfg": ...}``) needs open_clip, or ``""``
    when :class:`ResNetCLIP` and :class:`Preprocess` build exactly what open_clip would."""
    model, pre = config.get("model_cfg"), config.get("preprocess_cfg", {})
    if not isinstance(model, dict) or not isinstance(pre, dict):
        return "model_cfg/preprocess_cfg are not objects"
    vision, text = model.get("vision_cfg"), model.get("text_cfg")
    if not isinstance(vision, dict) or not isinstance(text, dict):
        return "vision_cfg/text_cfg are not objects"
    for what, found, known in (("model_cfg", model, _TOP), ("vision_cfg", vision, _VISION),
                               ("text_cfg", text, _TEXT), ("preprocess_cfg", pre, _PREPROCESS)):
        if set(found) - known:
            return f"{what} sets {sorted(set(found) - known)}"
    layers = vision.get("layers")
    if not (isinstance(layers, list) and len(layers) == 4 and all(isinstance(n, int) and n > 0 for n in layers)):
        return f"vision_cfg.layers={layers!r} is not a ResNet's four stage depths"
    if not isinstance(vision.get("image_size", 224), int) or vision.get("image_size", 224) % 32:
        return f"vision_cfg.image_size={vision.get('image_size')!r} is not an int multiple of 32"
    if text.get("pool_type", "argmax") not in ("argmax", "eos") or text.get("proj_type", "linear") != "linear" \
            or text.get("proj_bias", False):
        return "the text tower pools or projects in another way"
    if pre.get("interpolation", "bicubic") != "bicubic" or pre.get("resize_mode", "shortest") != "shortest" \
            or pre.get("size", vision.get("image_size", 224)) != vision.get("image_size", 224):
        return "the preprocessing is not bicubic shortest-side resizing to the image size"
    if not all(isinstance(pre.get(k), list) and len(pre[k]) == 3 for k in ("mean", "std")):
        return "preprocess_cfg does not give the mean and std of the 3 channels"
    return ""


class _QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class _Bottleneck(nn.Module):
    """1x1 -> 3x3 -> (average pool when strided) -> 1x1 (x4 channels), plus a pooled 1x1 shortcut when the shape
    changes."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(inplanes, planes, 1, bias=False), nn.BatchNorm2d(planes)
        self.conv2, self.bn2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False), nn.BatchNorm2d(planes)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3, self.bn3 = nn.Conv2d(planes, planes * 4, 1, bias=False), nn.BatchNorm2d(planes * 4)
        self.downsample = None
        if stride > 1 or inplanes != planes * 4:
            self.downsample = nn.Sequential(OrderedDict([("-1", nn.AvgPool2d(stride)),
                                                         ("0", nn.Conv2d(inplanes, planes * 4, 1, bias=False)),
                                                         ("1", nn.BatchNorm2d(planes * 4))]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.avgpool(F.relu(self.bn2(self.conv2(out))))
        out = self.bn3(self.conv3(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class _AttentionPool(nn.Module):
    """The feature map's mean, plus position embeddings, attends over the map (and itself): ``(B, C, H, W) ->
    (B, output_dim)``."""

    def __init__(self, grid: int, dim: int, heads: int, output_dim: int) -> None:
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.zeros(grid * grid + 1, dim))
        self.k_proj, self.q_proj, self.v_proj = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.c_proj = nn.Linear(dim, output_dim)
        self.heads = heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.flatten(2).transpose(1, 2)  # (B, HW, C)
        tokens = torch.cat([tokens.mean(dim=1, keepdim=True), tokens], dim=1) + self.positional_embedding
        b, n, c = tokens.shape

        def heads(t: torch.Tensor) -> torch.Tensor:  # (B, L, C) -> (B, heads, L, C / heads)
            return t.view(b, t.shape[1], self.heads, c // self.heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(self.q_proj(tokens[:, :1])), heads(self.k_proj(tokens)),
                                             heads(self.v_proj(tokens)))  # only the mean token's output is kept
        return self.c_proj(out.transpose(1, 2).reshape(b, c))


class _ResNetTower(nn.Module):
    def __init__(self, layers: list[int], output_dim: int, heads: int, image_size: int, width: int) -> None:
        super().__init__()
        self.image_size, self.output_dim = image_size, output_dim
        self.conv1, self.bn1 = nn.Conv2d(3, width // 2, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(width // 2)
        self.conv2, self.bn2 = nn.Conv2d(width // 2, width // 2, 3, padding=1, bias=False), nn.BatchNorm2d(width // 2)
        self.conv3, self.bn3 = nn.Conv2d(width // 2, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)
        inplanes = width
        for stage, (depth, planes) in enumerate(zip(layers, (width, width * 2, width * 4, width * 8)), start=1):
            blocks = [_Bottleneck(inplanes, planes, 1 if stage == 1 else 2)]
            inplanes = planes * 4
            blocks += [_Bottleneck(inplanes, planes) for _ in range(depth - 1)]
            self.add_module(f"layer{stage}", nn.Sequential(*blocks))
        self.attnpool = _AttentionPool(image_size // 32, width * 32, heads, output_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv, bn in ((self.conv1, self.bn1), (self.conv2, self.bn2), (self.conv3, self.bn3)):
            x = F.relu(bn(conv(x)))
        x = F.avg_pool2d(x, 2)
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = stage(x)
        return self.attnpool(x)


class _TextBlock(nn.Module):
    def __init__(self, width: int, heads: int, hidden: int, act: type[nn.Module]) -> None:
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(width, hidden)), ("gelu", act()),
                                              ("c_proj", nn.Linear(hidden, width))]))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False, attn_mask=mask)[0]
        return x + self.mlp(self.ln_2(x))


class ResNetCLIP(nn.Module):
    """open_clip's ``CLIP`` for a ``model_cfg`` that :func:`unsupported` accepts (same keys, same outputs).

    ``encode_image``: float ``(B, 3, S, S)``, normalised as :class:`Preprocess` does -> ``(B, embed_dim)``;
    ``encode_text``: int64 ``(T, context_length)`` token ids -> ``(T, embed_dim)``; both unnormalised unless
    ``normalize=True``. ``forward(image, text)`` returns both normalised, and ``logit_scale.exp()``.
    """

    def __init__(self, model_cfg: dict[str, Any], preprocess_cfg: dict[str, Any]) -> None:
        super().__init__()
        why = unsupported({"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg})
        if why:
            raise ValueError(f"ResNetCLIP cannot build this config ({why}); use rudalle_pipe.get_clip")
        embed, vision, text = model_cfg["embed_dim"], model_cfg["vision_cfg"], model_cfg["text_cfg"]
        width, image_size = vision.get("width", 64), vision.get("image_size", 224)
        self.visual = _ResNetTower(vision["layers"], embed, width * 32 // vision.get("head_width", 64), image_size,
                                   width)
        pre = preprocess_cfg
        self.visual.preprocess_cfg = {"size": image_size, "mean": pre["mean"], "std": pre["std"],
                                      "interpolation": "bicubic", "resize_mode": "shortest"}
        self.visual.image_mean, self.visual.image_std = pre["mean"], pre["std"]
        t_width, length = text.get("width", 512), text.get("context_length", 77)
        act = _QuickGELU if model_cfg.get("quick_gelu") else nn.GELU
        hidden = int(t_width * text.get("mlp_ratio", 4.0))
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.ModuleList(_TextBlock(t_width, text.get("heads", 8), hidden, act)
                                                   for _ in range(text.get("layers", 12)))
        self.token_embedding = nn.Embedding(text.get("vocab_size", 49408), t_width)
        self.positional_embedding = nn.Parameter(torch.zeros(length, t_width))
        self.ln_final = nn.LayerNorm(t_width)
        self.text_projection = nn.Parameter(torch.zeros(t_width, embed))
        self.logit_scale = nn.Parameter(torch.zeros(()))
        self.context_length, self.vocab_size = length, self.token_embedding.num_embeddings
        self.text_pool_type, self.text_eos_id = text.get("pool_type", "argmax"), text.get("eos_id", 2)
        self.register_buffer("attn_mask", torch.full((length, length), float("-inf")).triu(1), persistent=False)

    def encode_image(self, image: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        features = self.visual(image)
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        x = self.token_embedding(text) + self.positional_embedding
        for block in self.transformer.resblocks:
            x = block(x, self.attn_mask)
        x = self.ln_final(x)
        pooled = (text == self.text_eos_id).int() if self.text_pool_type == "eos" else text
        x = x[torch.arange(x.shape[0], device=x.device), pooled.argmax(dim=-1)] @ self.text_projection
        return F.normalize(x, dim=-1) if normalize else x

    def forward(self, image: torch.Tensor | None = None, text: torch.Tensor | None = None):
        image_features = self.encode_image(image, normalize=True) if image is not None else None
        text_features = self.encode_text(text, normalize=True) if text is not None else None
        return image_features, text_features, self.logit_scale.exp()


class Preprocess:
    """open_clip's eval transform for bicubic shortest-side resizing: PIL image -> float ``(3, size, size)``,
    ``(pixel / 255 - mean) / std``. As torchvision's ``Resize(size)`` then ``CenterCrop(size)``: the shorter
    side becomes ``size`` and the longer ``int(size * long / short)``; the crop starts at ``round(extra / 2)``.
    (:func:`rudalle_pipe.images.resize_and_crop` rounds both differently; these are open_clip's, so that the
    scores equal open_clip's for pictures of any size.)"""

    def __init__(self, size: int, mean: list[float], std: list[float]) -> None:
        self.size = size
        self.mean, self.std = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        w, h = image.size
        short, long = min(w, h), max(w, h)
        if short != self.size:
            other = int(self.size * long / short)
            image = image.resize((self.size, other) if w <= h else (other, self.size), Image.BICUBIC)
            w, h = image.size
        left, top = int(round((w - self.size) / 2.0)), int(round((h - self.size) / 2.0))
        if (w, h) != (self.size, self.size):
            image = image.crop((left, top, left + self.size, top + self.size))
        return (images_to_tensor([image])[0] - self.mean) / self.std
