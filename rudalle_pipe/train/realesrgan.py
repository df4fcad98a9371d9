"""Stage 5 of the demo family: a small x4 Real-ESRGAN generator (RRDBNet) trained on the shapes data.

Pairs are the 64 px and 256 px renders of the same scene (``shapes.render`` draws the same
geometry at both sizes), for a pool of ``pool_scenes`` scenes of split ``"train"`` rendered once.
Every step takes ``batch_size`` aligned random crops (``lr_crop`` px of the 64 px input, ``4 *
lr_crop`` px of the 256 px target), most of them centred on an object edge (flat background teaches
nothing), and minimises the L1 loss, as Real-ESRGAN's PSNR-oriented pre-training (RealESRNet) does.

At inference the upscaler sees VQGAN decodes, not clean renders. Given ``vae_dir`` (a VQGAN saved by
stage 2), a ``vae_fraction`` of the inputs are the VQGAN reconstructions of the 64 px renders
instead, so the network learns to sharpen those too.

:func:`evaluate` reports PSNR against the 256 px ground truth for the network and for bicubic
upsampling on scenes of held-out (colour, shape) pairs. The model is saved with
:func:`rudalle_pipe.hub.save_pretrained` (``model_type="rrdbnet"``).
"""
from __future__ import annotations

import json
import logging
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from rudalle_pipe import shapes
from rudalle_pipe import files
from rudalle_pipe.hub import load_pretrained, save_pretrained
from rudalle_pipe.realesrgan import RRDBNet, RRDBNetConfig
from rudalle_pipe.train.common import LoopConfig, Shard, make_accelerator, run_training

logger = logging.getLogger(__name__)

__all__ = ["SRTrainConfig", "DEMO_CONFIG", "QUICK_CONFIG", "make_pool", "make_batch", "init_weights",
           "psnr", "evaluate", "train"]

_LR, _HR = 64, 256  # input and target sides; the model's scale is _HR // _LR = 4


@dataclass(frozen=True)
class SRTrainConfig:
    """Everything stage 5 needs."""

    model: RRDBNetConfig = field(default_factory=lambda: RRDBNetConfig(num_feat=32, num_block=2, num_grow_ch=16,
                                                                       scale=4))  # the x4 generator
    loop: LoopConfig = field(default_factory=lambda: LoopConfig(steps=800, lr=2e-3, warmup_steps=50))  # optimiser
    batch_size: int = 16  # crops per step
    lr_crop: int = 16  # side of an input crop, pixels of the 64 px image (target crop: 4x)
    edge_fraction: float = 0.75  # share of crops centred on an object edge (the rest: uniform)
    pool_scenes: int = 300  # distinct train scenes rendered at 64 and 256 px
    vae_fraction: float = 0.5  # share of inputs that are VQGAN reconstructions (only with vae_dir)
    eval_images: int = 24  # held-out-pair scenes scored by evaluate() after training (0: skip)
    seed: int = 0  # data seed (batches are a function of (seed, step))

    def __post_init__(self) -> None:
        if self.model.scale != _HR // _LR:
            raise ValueError(f"model.scale must be {_HR // _LR} (64 -> 256 px pairs), got {self.model.scale}")
        if not 4 <= self.lr_crop <= _LR:
            raise ValueError(f"lr_crop must be in [4, {_LR}], got {self.lr_crop}")
        for name in ("edge_fraction", "vae_fraction"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.pool_scenes < 1 or self.batch_size < 1:
            raise ValueError(f"pool_scenes and batch_size must be >= 1, got {self.pool_scenes}, {self.batch_size}")


DEMO_CONFIG = SRTrainConfig(loop=LoopConfig(steps=1500, lr=2e-3, warmup_steps=50, checkpoint_every=250, log_every=10))
QUICK_CONFIG = SRTrainConfig(model=RRDBNetConfig(num_feat=8, num_block=1, num_grow_ch=4, scale=4),
                             loop=LoopConfig(steps=12, lr=2e-3, warmup_steps=0, checkpoint_every=6, log_every=2),
                             batch_size=4, lr_crop=8, pool_scenes=12, eval_images=0)


# ----------------------------------------------------------------------------- data


def _to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)  # (3, H, W) uint8


def make_pool(num_scenes: int, *, split: str = "train", seed: int = 0) -> dict[str, torch.Tensor]:
    """Renders of ``num_scenes`` random scenes of ``split``, each in a random variation
    (``shapes.render(..., variant=)``, the same at both sizes).

    Returns:
        ``lr`` uint8 ``[N, 3, 64, 64]`` and ``hr`` uint8 ``[N, 3, 256, 256]`` (RGB), and ``edges``
        int64 ``[E, 3]``: (image, y, x) of every 64 px pixel on an object edge.
    """
    rng = random.Random(seed)
    scenes = [shapes.sample_scene(rng, split) for _ in range(num_scenes)]
    variants = [rng.randrange(2**31) for _ in scenes]
    lr = torch.stack([_to_tensor(shapes.render(s, _LR, variant=v)) for s, v in zip(scenes, variants)])  # (N, 3, 64, 64)
    hr = torch.stack([_to_tensor(shapes.render(s, _HR, variant=v)) for s, v in zip(scenes, variants)])  # (N, 3, 256, 256)
    x = lr.float()
    edge = (x[..., 1:, :] - x[..., :-1, :]).abs().amax(1)[:, :, :-1] \
        + (x[..., :, 1:] - x[..., :, :-1]).abs().amax(1)[:, :-1, :]  # (N, 63, 63)
    return {"lr": lr, "hr": hr, "edges": torch.nonzero(edge > 0)}


def vae_reconstruct(vae: nn.Module, images: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """VQGAN encode + decode of uint8 ``[N, 3, H, W]`` images -> uint8 ``[N, 3, H, W]``."""
    out = []
    for chunk in images.split(batch_size):
        decoded = vae.decode(vae.get_codebook_indices(chunk.float() / 255))  # (b, 3, H, W) in [0, 1]
        out.append((decoded * 255).round().to(torch.uint8))
    return torch.cat(out)


def make_batch(step: int, *, config: SRTrainConfig, pool: dict[str, torch.Tensor],
               shard: Shard = Shard()) -> dict[str, torch.Tensor]:
    """Aligned crops of ``step``, a pure function of ``(config.seed, step, shard)`` (``shard``: this
    process's part of the step's global batch, see :class:`rudalle_pipe.train.common.Shard`).

    Returns ``lr`` float ``[B, 3, c, c]`` and ``hr`` float ``[B, 3, 4c, 4c]``, both RGB in [0, 1]
    (``c = config.lr_crop``); ``lr`` comes from ``pool["vae"]`` (VQGAN decodes) when present for a
    ``vae_fraction`` of the crops.
    """
    g = shard.generator(config.seed, step)
    b, c, s = config.batch_size, config.lr_crop, _HR // _LR
    n = pool["lr"].shape[0]
    image = torch.randint(0, n, (b,), generator=g)
    top = torch.randint(0, _LR - c + 1, (b,), generator=g)
    left = torch.randint(0, _LR - c + 1, (b,), generator=g)
    on_edge = torch.rand(b, generator=g) < config.edge_fraction
    picks = torch.randint(0, pool["edges"].shape[0], (b,), generator=g)
    for i in torch.nonzero(on_edge).flatten().tolist():  # centre the crop on an edge pixel
        k, y, x = pool["edges"][picks[i]].tolist()
        image[i], top[i], left[i] = k, min(max(y - c // 2, 0), _LR - c), min(max(x - c // 2, 0), _LR - c)
    use_vae = torch.rand(b, generator=g) < config.vae_fraction
    lr, hr = [], []
    for i in range(b):
        k, y, x = image[i].item(), top[i].item(), left[i].item()
        source = pool["vae"] if "vae" in pool and use_vae[i] else pool["lr"]
        lr.append(source[k, :, y:y + c, x:x + c])  # (3, c, c)
        hr.append(pool["hr"][k, :, s * y:s * (y + c), s * x:s * (x + c)])  # (3, 4c, 4c)
    return {"lr": torch.stack(lr).float() / 255, "hr": torch.stack(hr).float() / 255}


def l1_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean absolute error between the network output and the 256 px crop."""
    device = next(model.parameters()).device
    return F.l1_loss(model(batch["lr"].to(device)), batch["hr"].to(device))


def init_weights(model: RRDBNet, scale: float = 0.1) -> RRDBNet:
    """Initialise ``model`` so that it starts as bilinear x4 upsampling and learns only the correction.

    ESRGAN's initialisation (Kaiming-normal convs, scaled by ``scale`` inside the RRDB trunk, zero
    bias) for every conv; then the first three feature channels carry the RGB input through the
    network: ``conv_first`` copies it, each up-conv applies the separable [1, 2, 1] / 4 filter that
    turns nearest x2 into bilinear x2 (LeakyReLU passes the non-negative values unchanged),
    ``conv_hr`` passes it on and ``conv_last`` reads it out. The other channels do not feed the
    carried ones at first (those weights start at zero and are learned), so the untrained network
    is bilinear-like x4 upsampling plus a learnable correction.
    """
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight)
            if not name.startswith(("conv_first", "conv_up")):
                module.weight.data *= scale
            nn.init.zeros_(module.bias)
    smooth = torch.tensor([1.0, 2.0, 1.0]) / 4
    channels = model.config.num_in_ch
    with torch.no_grad():
        for conv, kernel in [(model.conv_first, None), (model.conv_hr, None), (model.conv_last, None),
                             *[(getattr(model, n), torch.outer(smooth, smooth)) for n in ("conv_up1", "conv_up2",
                                                                                          "conv_up3")
                               if hasattr(model, n)]]:
            conv.weight[:channels] = 0  # the carried channels read only themselves (no offset from the rest)
            conv.weight[:, :channels] *= scale
            for c in range(min(channels, conv.out_channels)):
                if kernel is None:
                    conv.weight[c, c] = 0
                    conv.weight[c, c, 1, 1] = 1
                else:
                    conv.weight[c, c] = kernel
    return model


# ----------------------------------------------------------------------------- evaluation


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB between two image batches in [0, 1] (mean squared error over all pixels)."""
    mse = F.mse_loss(a.float(), b.float()).item()
    return float("inf") if mse == 0 else 10 * math.log10(1 / mse)


@torch.no_grad()
def evaluate(model: RRDBNet, *, num_images: int = 24, split: str = "heldout", seed: int = 1,
             inputs: torch.Tensor | None = None) -> dict[str, float]:
    """PSNR (dB) vs the 256 px renders of ``num_images`` scenes of ``split``: network and bicubic.

    Both outputs are rounded to uint8 first, as saved images would be. ``inputs`` (uint8
    ``[N, 3, 64, 64]``) replaces the clean 64 px renders, e.g. with VQGAN decodes of them.
    """
    pool = make_pool(num_images, split=split, seed=seed)
    lr = pool["lr"] if inputs is None else inputs
    device = next(model.parameters()).device
    sr = torch.cat([model(x.float().div(255).to(device)).clamp(0, 1).cpu() for x in lr.split(8)])  # (N, 3, 256, 256)
    sr = (sr * 255).round() / 255
    bicubic = torch.stack([_to_tensor(Image.fromarray(x.permute(1, 2, 0).numpy()).resize((_HR, _HR), Image.BICUBIC))
                           for x in lr]).float() / 255
    hr = pool["hr"].float() / 255
    return {"psnr_sr": psnr(sr, hr), "psnr_bicubic": psnr(bicubic, hr), "count": float(num_images)}


# ----------------------------------------------------------------------------- stage


def train(out_dir: str | Path, *, config: SRTrainConfig = DEMO_CONFIG, vae_dir: str | Path | None = None,
          progress: bool = True) -> Path:
    """Train the demo x4 upscaler into ``out_dir``; return the saved model folder ``out_dir/final``.

    Args:
        vae_dir: optional VQGAN folder (``hub.save_pretrained`` layout, ``model_type="vqgan"``) whose
            reconstructions serve as extra inputs.

    A finished stage (``final/config.json`` present) is returned as is; an interrupted one resumes
    from ``out_dir/checkpoint``. Only the main process writes the final files.
    """
    out_dir = Path(out_dir)
    final = out_dir / "final"
    if (final / "config.json").is_file():
        logger.info("SR stage already finished: %s", final)
        return final
    if not isinstance(config, SRTrainConfig):
        raise TypeError(f"config must be an SRTrainConfig, got {type(config).__name__}")
    pool = make_pool(config.pool_scenes, seed=config.seed)
    vae = None
    if vae_dir is not None:
        from rudalle_pipe.vae import VQGAN, VQGANConfig

        vae = load_pretrained(VQGAN, VQGANConfig, vae_dir, model_type="vqgan")
        pool["vae"] = vae_reconstruct(vae, pool["lr"])
        logger.info("SR inputs: VQGAN reconstructions at %.2f dB PSNR vs the renders",
                    psnr(pool["vae"].float() / 255, pool["lr"].float() / 255))
    torch.manual_seed(config.loop.seed)
    model = init_weights(RRDBNet(config.model))

    def get_batch(step: int, shard: Shard) -> dict[str, torch.Tensor]:
        return make_batch(step, config=config, pool=pool, shard=shard)

    accelerator = make_accelerator(config.loop)
    model, _ = run_training("realesrgan", model, l1_loss, get_batch, config.loop, out_dir,
                            progress=progress, accelerator=accelerator)
    model.eval()
    if accelerator.is_main_process:
        if config.eval_images:
            metrics = {"clean": evaluate(model, num_images=config.eval_images)}
            if vae is not None:
                held = make_pool(config.eval_images, split="heldout", seed=1)["lr"]
                metrics["vae"] = evaluate(model, num_images=config.eval_images, inputs=vae_reconstruct(vae, held))
            logger.info("SR held-out PSNR: %s", metrics)
            files.atomic_write(out_dir / "eval.json", json.dumps(metrics, indent=2) + "\n")
        with files.atomic_directory(final) as folder:  # last: final/ exists only when complete
            save_pretrained(model, model.config, folder, model_type="rrdbnet")
    accelerator.wait_for_everyone()
    return final
