"""Stage 4 of the demo family: a small open_clip CLIP trained contrastively on the shapes data.

The model is a plain open_clip ``CLIP`` with a custom config: a small ModifiedResNet (convolutions
tell the small shapes apart far better than a ViT on 8 px patches did) on 64x64 images and
open_clip's text transformer reading the demo's own YouTokenToMe BPE ids (vocabulary of a few
hundred, so the token table stays tiny) through :class:`rudalle_pipe.clip.YTTMClipTokenizer`. The
text tower pools the EOS position (``pool_type="eos"``, ``eos_id=3``): open_clip's default
``"argmax"`` pools the highest id, which is the EOT only for its own tokenizer.

Training data are the renders of every scene of split ``"train"`` (about 1,350 scenes), in
``variants`` variations each (``shapes.render(..., variant=k)``, one picked at random per use), each
with a random word order of its caption. Every batch:

* holds ``batch_size`` *distinct* scenes, so no in-batch negative is a copy of a positive, drawn
  as pairs of scenes one attribute apart, so that images and captions both meet hard negatives;
* adds ``hard_negatives`` captions per image that differ from it in exactly one attribute (as
  extra texts in the image -> text direction), because reranking must separate "red star" from
  "orange star", not from random captions; a negative equal to another image's scene is masked;
* augments the images like generated ones: small shifts, blur, colour gain/offset and noise.

The loss is the symmetric InfoNCE with open_clip's learnable logit scale (clamped at 100).
:func:`evaluate` measures retrieval on held-out (colour, shape) pairs; :func:`train` saves the
model with :func:`rudalle_pipe.clip.save_clip` (``get_clip("local-dir:<dir>")`` loads it).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from rudalle_pipe import files, shapes
from rudalle_pipe.clip import ClipBundle, YTTMClipTokenizer, save_clip
from rudalle_pipe.tokenizer import YTTMTokenizer
from rudalle_pipe.train.common import LoopConfig, Shard, make_accelerator, run_training
from rudalle_pipe.train.scenes import all_captions, all_scenes, render_scenes, with_variants

logger = logging.getLogger(__name__)

__all__ = ["ClipArchConfig", "ClipTrainConfig", "DEMO_CONFIG", "QUICK_CONFIG", "build_clip", "make_batch",
           "clip_loss", "evaluate", "train"]

MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)  # image normalisation: [0, 1] -> [-1, 1]
_ATTRIBUTES = ("shape", "color", "size", "position", "background")
_CHOICES = {"shape": shapes.SHAPES, "color": tuple(shapes.COLORS), "size": shapes.SIZES,
            "position": shapes.POSITIONS, "background": tuple(shapes.BACKGROUNDS)}


@dataclass(frozen=True)
class ClipArchConfig:
    """Sizes of the small CLIP (an open_clip ``model_cfg`` once the vocabulary size is known)."""

    embed_dim: int = 96  # joint embedding width
    image_size: int = 64  # input side, pixels
    vision_layers: int | tuple[int, int, int, int] = (1, 1, 1, 1)  # ModifiedResNet stage depths, or ViT blocks (int)
    vision_width: int = 16  # ModifiedResNet base width (features end 32x wider), or ViT width
    patch_size: int = 8  # ViT only: patch side ((64 / 8)^2 = 64 patch tokens)
    vision_head_width: int = 32  # ViT only: width per attention head
    text_width: int = 96  # text transformer width
    text_layers: int = 2  # text transformer blocks
    text_heads: int = 3  # text transformer heads
    context_length: int | None = None  # text tokens (BOS, BPE ids, EOS, pad 0); None: the longest caption's

    def model_cfg(self, vocab_size: int) -> dict[str, Any]:
        """open_clip model config (the ``model_cfg`` of ``open_clip_config.json``)."""
        if self.context_length is None:
            raise ValueError("context_length is None: set it (train() sets it to the longest caption's length)")
        vision: dict[str, Any] = {"image_size": self.image_size, "width": self.vision_width}
        if isinstance(self.vision_layers, int):  # ViT
            vision.update(layers=self.vision_layers, patch_size=self.patch_size, head_width=self.vision_head_width)
        else:  # ModifiedResNet: open_clip picks it when "layers" is a list
            vision.update(layers=list(self.vision_layers))
        return {
            "embed_dim": self.embed_dim,
            "vision_cfg": vision,
            "text_cfg": {"context_length": self.context_length, "vocab_size": vocab_size, "width": self.text_width,
                         "heads": self.text_heads, "layers": self.text_layers,
                         "pool_type": "eos", "eos_id": 3, "pad_id": 0},  # YTTM ids: pad 0, eos 3
        }


@dataclass(frozen=True)
class ClipTrainConfig:
    """Everything stage 4 needs besides the tokenizer file."""

    model: ClipArchConfig = field(default_factory=ClipArchConfig)  # architecture
    loop: LoopConfig = field(default_factory=lambda: LoopConfig(steps=600, lr=1e-3, warmup_steps=50))  # optimiser
    batch_size: int = 64  # distinct scenes (image-caption pairs) per step
    hard_negatives: int = 2  # one-attribute-off captions added per image as extra negatives
    neighbour_pairs: bool = True  # fill batches with pairs of scenes one attribute apart (hard negatives both ways)
    augment: bool = True  # shifts, blur, colour jitter and noise, like imperfect generated images
    variants: int = 4  # renders per scene, variations shapes.render(variant=0..variants-1); 0 = the plain render
    eval_images: int = 200  # held-out-pair images scored by evaluate() after training (0: skip)
    seed: int = 0  # data seed (batches are a function of (seed, step))

    def __post_init__(self) -> None:
        if not 2 <= self.batch_size <= 1000:
            raise ValueError(f"batch_size must be in [2, 1000] (distinct scenes per batch), got {self.batch_size}")
        if self.hard_negatives < 0:
            raise ValueError(f"hard_negatives must be >= 0, got {self.hard_negatives}")


DEMO_CONFIG = ClipTrainConfig(
    loop=LoopConfig(steps=1000, lr=1e-3, warmup_steps=50, weight_decay=0.0, checkpoint_every=200, log_every=10))
QUICK_CONFIG = ClipTrainConfig(
    model=ClipArchConfig(embed_dim=32, vision_layers=1, vision_width=32, patch_size=16, text_width=32,
                         text_layers=1, text_heads=2),  # a one-block ViT: the cheapest tower
    loop=LoopConfig(steps=12, lr=3e-3, warmup_steps=0, checkpoint_every=6, log_every=2),
    batch_size=16, hard_negatives=1, eval_images=0)


# ----------------------------------------------------------------------------- data


def one_off(scene: shapes.Scene, rng: random.Random, *, allow_heldout: bool = False) -> shapes.Scene:
    """A valid scene that differs from ``scene`` in exactly one random attribute."""
    while True:
        attribute = rng.choice(_ATTRIBUTES)
        value = rng.choice([v for v in _CHOICES[attribute] if v != getattr(scene, attribute)])
        changed = {**dataclasses.asdict(scene), attribute: value}
        if changed["color"] == changed["background"]:
            continue
        if not allow_heldout and (changed["color"], changed["shape"]) in shapes.HELD_OUT_PAIRS:
            continue
        return shapes.Scene(**changed)


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Make clean renders look like generated images.

    Args:
        images: float ``[B, 3, H, W]`` RGB in [0, 1].
    Returns:
        float ``[B, 3, H, W]`` in [0, 1]: shifted by up to 2 px (edge pixels repeat), blurred with a
        random Gaussian (sigma 0-1.2 px, half the images), per-channel gain 0.93-1.07 and offset
        +-0.04, plus Gaussian noise with std up to 0.03.
    """
    b, _, h, w = images.shape
    padded = F.pad(images, (2, 2, 2, 2), mode="replicate")  # (B, 3, H+4, W+4)
    shifts = torch.randint(0, 5, (b, 2), generator=generator)
    images = torch.stack([padded[i, :, dy:dy + h, dx:dx + w] for i, (dy, dx) in enumerate(shifts.tolist())])
    sigma = torch.rand(b, generator=generator) * 1.2 * (torch.rand(b, generator=generator) < 0.5)  # (B,)
    offsets = torch.arange(-3, 4, dtype=images.dtype)  # (7,)
    kernel = torch.exp(-0.5 * (offsets[None] / sigma.clamp(min=1e-3)[:, None]) ** 2)  # (B, 7)
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(3, 0)  # (3B, 7): one per channel
    flat = F.pad(images.reshape(1, 3 * b, h, w), (3, 3, 3, 3), mode="replicate")  # (1, 3B, H+6, W+6)
    flat = F.conv2d(flat, kernel[:, None, None, :], groups=3 * b)  # (1, 3B, H+6, W) rows blurred
    images = F.conv2d(flat, kernel[:, None, :, None], groups=3 * b).reshape(b, 3, h, w)  # (B, 3, H, W)
    gain = 1 + (torch.rand(b, 3, 1, 1, generator=generator) - 0.5) * 0.14
    offset = (torch.rand(b, 3, 1, 1, generator=generator) - 0.5) * 0.08
    noise = torch.randn(images.shape, generator=generator) * torch.rand(b, 1, 1, 1, generator=generator) * 0.03
    return (images * gain + offset + noise).clamp(0, 1)


def normalize(images: torch.Tensor) -> torch.Tensor:
    """``[B, 3, H, W]`` in [0, 1] -> the model's input (``(x - MEAN) / STD``)."""
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    return (images - mean) / std


def make_batch(step: int, *, config: ClipTrainConfig, scenes: Sequence[shapes.Scene], renders: torch.Tensor,
               tokenizer: YTTMClipTokenizer, shard: Shard = Shard()) -> dict[str, torch.Tensor]:
    """The batch of ``step``, a pure function of ``(config.seed, step, shard)`` (``shard``: this process's
    part of the step's global batch, see :class:`rudalle_pipe.train.common.Shard`). ``renders`` are uint8
    ``[N, 3, S, S]`` (one per scene) or ``[N, K, 3, S, S]`` (K variations per scene, one drawn per image).

    Returns:
        ``pixels`` float ``[B, 3, S, S]`` normalised; ``tokens`` int64 ``[B * (1 + hard_negatives),
        context_length]`` (the B matching captions first); ``allowed`` bool ``[B, T]``, False where a
        text other than the image's own describes the image's scene (a false negative).
    """
    rng = random.Random(shard.seed(config.seed, step))
    generator = shard.generator(config.seed, step)
    position = {scene: i for i, scene in enumerate(scenes)}
    index: list[int] = []
    for anchor in rng.sample(range(len(scenes)), len(scenes)):  # random scenes, each with a near neighbour
        if len(index) == config.batch_size:
            break
        if anchor in index:
            continue
        index.append(anchor)
        if config.neighbour_pairs and len(index) < config.batch_size:
            for _ in range(10):  # a one-attribute-off scene that is in ``scenes`` and not yet in the batch
                neighbour = position.get(one_off(scenes[anchor], rng), anchor)
                if neighbour not in index:
                    index.append(neighbour)
                    break
    batch_scenes = [scenes[i] for i in index]
    texts_scenes = batch_scenes + [one_off(s, rng) for s in batch_scenes for _ in range(config.hard_negatives)]
    texts = [shapes.caption(s, rng) for s in texts_scenes]
    if renders.dim() == 5:  # (N, K, 3, S, S): K variations per scene, one picked per image
        renders = renders[torch.tensor(index), torch.randint(0, renders.shape[1], (len(index),), generator=generator)]
        images = renders.float() / 255  # (B, 3, S, S) in [0, 1]
    else:
        images = renders[index].float() / 255  # (B, 3, S, S) in [0, 1]
    if config.augment:
        images = augment(images, generator)
    same = torch.tensor([[a == t for t in texts_scenes] for a in batch_scenes])  # (B, T)
    allowed = ~same | torch.eye(len(batch_scenes), len(texts_scenes), dtype=torch.bool)
    return {"pixels": normalize(images), "tokens": tokenizer(texts), "allowed": allowed}


def clip_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Symmetric InfoNCE: image -> (captions + hard negatives), caption -> images."""
    device = next(model.parameters()).device
    image_emb, text_emb, scale = model(batch["pixels"].to(device), batch["tokens"].to(device))  # (B, D), (T, D)
    logits = scale.clamp(max=100) * image_emb @ text_emb.T  # (B, T)
    logits = logits.masked_fill(~batch["allowed"].to(device), float("-inf"))
    b = image_emb.shape[0]
    target = torch.arange(b, device=device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits[:, :b].T, target)) / 2


# ----------------------------------------------------------------------------- model and evaluation


def build_clip(arch: ClipArchConfig, tokenizer: YTTMClipTokenizer) -> ClipBundle:
    """A randomly initialised CLIP of ``arch`` (in eval mode) with the YTTM tokenizer, as a :class:`ClipBundle`."""
    import open_clip
    from open_clip.model import set_model_preprocess_cfg

    if tokenizer.context_length != arch.context_length:
        raise ValueError(f"tokenizer.context_length={tokenizer.context_length} != arch.context_length="
                         f"{arch.context_length}")
    model_cfg = arch.model_cfg(tokenizer.vocab_size)
    model = open_clip.CLIP(model_cfg["embed_dim"], model_cfg["vision_cfg"], model_cfg["text_cfg"])
    preprocess_cfg = {"size": arch.image_size, "mean": MEAN, "std": STD, "interpolation": "bicubic",
                      "resize_mode": "shortest"}
    set_model_preprocess_cfg(model, preprocess_cfg)
    preprocess = open_clip.image_transform(arch.image_size, is_train=False, mean=MEAN, std=STD)
    return ClipBundle(model=model.eval(), preprocess=preprocess, tokenizer=tokenizer, name="rudalle-pipe-demo-clip",
                      pretrained=None, model_cfg=model_cfg)


@torch.no_grad()
def evaluate(bundle: ClipBundle, *, split: str = "heldout", num_images: int = 200, candidates: int = 16,
             augmented: bool = True, seed: int = 1) -> dict[str, float]:
    """Retrieval accuracies of ``bundle`` on ``num_images`` random scenes of ``split``.

    Returns fractions in [0, 1]:
        ``caption_top1``: the image's canonical caption scores highest among those of all valid scenes;
        ``<attribute>``: highest among the captions that vary only that attribute;
        ``rerank_top1``: for a caption, its image scores highest among ``candidates`` images whose
        other ``candidates - 1`` scenes are 1-2 attributes off (a stand-in for generated candidates).
    Images are augmented (as generated ones would be imperfect) unless ``augmented`` is False.
    """
    model = bundle.model.eval()
    device = next(model.parameters()).device
    rng, generator = random.Random(seed), torch.Generator().manual_seed(seed)
    targets = [rng.choice(all_scenes(split)) for _ in range(num_images)]
    everything = all_scenes("all")

    def embed_images(scenes_: Sequence[shapes.Scene]) -> torch.Tensor:
        images = render_scenes(scenes_).float() / 255
        images = augment(images, generator) if augmented else images
        return F.normalize(model.encode_image(normalize(images).to(device)), dim=-1)  # (N, D)

    def embed_texts(scenes_: Sequence[shapes.Scene]) -> torch.Tensor:
        tokens = bundle.tokenizer([shapes.caption(s) for s in scenes_]).to(device)
        return torch.cat([F.normalize(model.encode_text(t), dim=-1) for t in tokens.split(512)])  # (N, D)

    image_emb = embed_images(targets)  # (N, D)
    text_all = embed_texts(everything)  # (S, D)
    best = (image_emb @ text_all.T).argmax(1).tolist()
    result = {"caption_top1": float(np.mean([everything[i] == t for i, t in zip(best, targets)]))}
    for attribute in _ATTRIBUTES:
        hits = []
        for emb, target in zip(image_emb, targets):
            variants = [dataclasses.replace(target, **{attribute: v}) for v in _CHOICES[attribute]
                        if attribute not in ("color", "background")
                        or v != (target.background if attribute == "color" else target.color)]
            hits.append(variants[int((embed_texts(variants) @ emb).argmax())] == target)
        result[attribute] = float(np.mean(hits))
    hits = []
    for target in targets:
        others = [one_off(one_off(target, rng, allow_heldout=True), rng, allow_heldout=True) if k % 2
                  else one_off(target, rng, allow_heldout=True) for k in range(candidates - 1)]
        others = [o if o != target else one_off(target, rng, allow_heldout=True) for o in others]
        scores = embed_images([target, *others]) @ embed_texts([target])[0]  # (candidates,)
        hits.append(int(scores.argmax()) == 0)
    result["rerank_top1"] = float(np.mean(hits))
    return result


# ----------------------------------------------------------------------------- stage


def train(out_dir: str | Path, *, config: ClipTrainConfig = DEMO_CONFIG, tokenizer_path: str | Path,
          progress: bool = True) -> Path:
    """Train the demo CLIP into ``out_dir`` and return the saved ``local-dir:`` folder ``out_dir/final``.

    A finished stage (``final/open_clip_config.json`` present) is returned as is; an interrupted
    one resumes from ``out_dir/checkpoint``. Only the main process writes the final files.
    """
    out_dir = Path(out_dir)
    final = out_dir / "final"
    if (final / "open_clip_config.json").is_file():
        logger.info("CLIP stage already finished: %s", final)
        return final
    if not isinstance(config, ClipTrainConfig):
        raise TypeError(f"config must be a ClipTrainConfig, got {type(config).__name__}")
    bpe = YTTMTokenizer.from_file(tokenizer_path)
    longest = max(len(bpe.encode(c)) + 2 for s in all_scenes("all") for c in all_captions(s))  # + BOS, EOS
    context_length = config.model.context_length or longest
    if longest > context_length:
        logger.warning("captions need %d tokens but context_length is %d; they are cut (EOS kept)",
                       longest, context_length)
    arch = dataclasses.replace(config.model, context_length=context_length)
    tokenizer = YTTMClipTokenizer(bpe, context_length)
    scenes = all_scenes("train")
    per_scene = max(config.variants, 1)
    repeated, variants = with_variants(scenes, config.variants)
    renders = render_scenes(repeated, arch.image_size, variants=variants).view(
        len(scenes), per_scene, 3, arch.image_size, arch.image_size)  # (N, K, 3, S, S) uint8
    torch.manual_seed(config.loop.seed)
    bundle = build_clip(arch, tokenizer)

    def get_batch(step: int, shard: Shard) -> dict[str, torch.Tensor]:
        return make_batch(step, config=config, scenes=scenes, renders=renders, tokenizer=tokenizer, shard=shard)

    accelerator = make_accelerator(config.loop)
    model, _ = run_training("clip", bundle.model, clip_loss, get_batch, config.loop, out_dir,
                            progress=progress, accelerator=accelerator)
    bundle.model = model.eval()
    if accelerator.is_main_process:
        if config.eval_images:
            metrics = {split: evaluate(bundle, split=split, num_images=config.eval_images)
                       for split in ("heldout", "train")}
            logger.info("CLIP retrieval (held-out pairs / seen pairs): %s", metrics)
            files.atomic_write(out_dir / "eval.json", json.dumps(metrics, indent=2) + "\n")
        with files.atomic_directory(final) as folder:  # last: final/ exists only when complete
            save_clip(bundle, folder)
    accelerator.wait_for_everyone()
    return final
