"""Stage 2: train the VQGAN image tokenizer (:class:`rudalle_pipe.vae.VQGAN`) on 64 px renders.

The model keeps the Sber layout: at inference ``quantize.proj`` (1x1 conv) gives ``n_embed`` logits
per cell, the code is their argmax, and ``quantize.embed`` is the codebook the decoder reads. We train
it as a VQ-VAE with an l2-normalised (cosine) codebook, which converges in few steps and keeps the
codebook in use, and then write the equivalent ``proj``:

    h      = normalize(quant_conv(encoder(x)))           # (B, D, h, w), x in [-1, 1], unit vectors
    code   = argmax_k <h, e_k>  (e_k unit rows of embed)  # nearest code by cosine
    q      = e_code;  x_hat = decoder(post_quant_conv(h + sg(q - h)))   # straight-through
    loss   = L1 + MSE (x_hat vs x) + |sg(h) - q|^2 + beta |h - sg(q)|^2

Because ``argmax_k <e_k, h> = argmax_k <e_k, quant_conv(...)>`` (the norm of h is the same for every
k), ``proj.weight = embed.weight`` (as 1x1 conv) with zero bias reproduces the training-time codes
exactly, with the argmax the inference code already does.

The first ``ae_steps`` steps train a plain autoencoder on ``h`` (no quantisation), which learns far
faster than a VQ model from scratch; the codebook is then initialised by spherical k-means on the
encoder outputs of ``kmeans_images`` training renders, so every code starts in use. The 1x1
``quant_conv`` and ``post_quant_conv`` start as identities (a chain of freshly initialised linear
layers around the bottleneck slows the first steps down). After the main loop, ``decoder_steps`` more
steps train the decoder alone on the fixed codes (encoder and codebook frozen, so every image keeps
its codes), drawing the images in proportion to their reconstruction error, with a loss that weighs
pixels near edges (of the target or of the output) ``1 + decoder_edge_weight`` times more than flat
ones: the points of a small star are a few pixels of a 64 px picture, and a plain pixel loss is content
to draw them as a pentagon. Codes unused for a while (an exponential moving average of assignments, a
buffer saved with the checkpoints) are restarted on random encoder outputs of the current batch; that
randomness comes from a generator seeded by the step, so a resumed run is identical to an
uninterrupted one.
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .. import files
from ..hub import load_pretrained, save_pretrained
from ..vae import VQGAN, VQGANConfig
from .common import LoopConfig, Shard, is_main_process, run_training, wait_for_everyone
from .scenes import all_scenes, render_scenes, with_variants

logger = logging.getLogger(__name__)

__all__ = ["VQGANTrainConfig", "VQGANTrainer", "train", "load_trained", "reconstruction_psnr", "sync_proj"]

# f=8: 64 px -> 8 x 8 codes. No GroupNorm: with 32 channels, GroupNorm(32) normalises every channel
# per image, which loses the absolute colour of flat regions, and the model then learns far slower.
DEMO_VQGAN = VQGANConfig(ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1, attn_resolutions=(), z_channels=32,
                         embed_dim=32, n_embed=512, resolution=64, norm_groups=0)


@dataclass(frozen=True)
class VQGANTrainConfig:
    """Everything stage 2 needs: architecture, optimisation, quantizer settings, data sizes."""

    model: VQGANConfig = DEMO_VQGAN  # the VQGAN to train
    loop: LoopConfig = field(default_factory=lambda: LoopConfig(steps=3000, lr=8e-4, warmup_steps=50,
                                                                checkpoint_every=250))  # optimisation
    batch_size: int = 12  # images per step
    ae_steps: int = 1000  # leading steps trained without quantisation (then k-means initialises the codebook)
    kmeans_images: int = 384  # training renders whose encoder outputs seed the k-means
    kmeans_iters: int = 15  # spherical k-means iterations
    decoder_steps: int = 4000  # then the decoder alone on fixed codes, hard images oversampled; 0 = skip
    decoder_lr: float = 8e-4  # peak learning rate of that phase
    decoder_edge_weight: float = 30.0  # extra loss weight of pixels near edges in that phase (0 = plain loss)
    beta: float = 0.25  # commitment weight (pulls encoder outputs to their codes)
    restart_every: int = 20  # steps between dead-code restarts
    restart_until: float = 0.8  # fraction of the steps after which codes are no longer restarted
    usage_decay: float = 0.95  # per-step decay of the moving average of code assignments
    variants: int = 4  # renders per training scene, each a different variation (shapes.render(variant=k))
    max_images: int | None = None  # use only the first N training renders (tests); None = all
    eval_images: int = 150  # held-out renders for the PSNR report
    seed: int = 0  # model initialisation, batch order and restarts

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.restart_every < 1:
            raise ValueError(f"restart_every must be >= 1, got {self.restart_every}")
        if not 0 <= self.ae_steps < self.loop.steps:
            raise ValueError(f"ae_steps must be in [0, loop.steps={self.loop.steps}), got {self.ae_steps}")
        if not self.decoder_edge_weight >= 0:
            raise ValueError(f"decoder_edge_weight must be >= 0, got {self.decoder_edge_weight}")


def _unit_latents(vae: VQGAN, x: torch.Tensor) -> torch.Tensor:
    """x (B, 3, H, W) in [-1, 1] -> l2-normalised encoder outputs (B, D, H/f, W/f): what the codes quantise."""
    return F.normalize(vae.quant_conv(vae.encoder(x)), dim=1)


def _near_edges(x: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) in {0, 1}: 1 where some channel of a pixel in the 3x3 neighbourhood differs from that
    pixel's 3x3 mean by more than 0.05 (images x (B, 3, H, W) in [-1, 1])."""
    detail = (x - F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)).abs().amax(1, keepdim=True)
    return F.max_pool2d((detail > 0.05).float(), 3, 1, 1)


def _edge_weights(x: torch.Tensor, edge_weight: float, x_hat: torch.Tensor | None = None) -> torch.Tensor:
    """Per-pixel loss weights (B, 1, H, W), mean 1 per image: ``1 + edge_weight`` near the edges of the
    target x (B, 3, H, W) in [-1, 1] or of the output ``x_hat``, 1 elsewhere.

    Counting the output's edges too keeps the weighting neutral: weighting only the target's edges
    would teach a code seen both on flat background and at an object's corner to draw a speck."""
    near = _near_edges(x)
    if x_hat is not None:
        near = torch.maximum(near, _near_edges(x_hat.detach()))
    weights = 1 + edge_weight * near
    return weights / weights.mean(dim=(2, 3), keepdim=True)


def _reconstruction_loss(x_hat: torch.Tensor, x: torch.Tensor, edge_weight: float = 0.0,
                         per_image: bool = False) -> torch.Tensor:
    """L1 + MSE between the decoder output and the target, both (B, 3, H, W) in [-1, 1]; pixels near
    edges (of either image) weigh ``1 + edge_weight`` times more (see :func:`_edge_weights`).
    Returns a scalar, or (B,) with ``per_image``."""
    diff = x_hat - x
    weights = _edge_weights(x, edge_weight, x_hat) if edge_weight else 1.0
    loss = (weights * diff.abs()).mean((1, 2, 3)) + (weights * diff.pow(2)).mean((1, 2, 3))
    return loss if per_image else loss.mean()


class VQGANTrainer(nn.Module):
    """Wraps a :class:`VQGAN` so that one ``forward`` is one training loss (DDP wraps this module).

    ``usage`` (n_embed,) float32 buffer: moving average of how many cells each code took per step.
    Dead codes are restarted at the start of a step (before the codebook enters the autograd graph).
    """

    def __init__(self, vae: VQGAN, beta: float, usage_decay: float) -> None:
        super().__init__()
        self.vae = vae
        self.beta, self.usage_decay = beta, usage_decay
        vae.quantize.proj.requires_grad_(False)  # derived from the codebook by sync_proj
        with torch.no_grad():  # square 1x1 convs around the bottleneck start as identities
            for conv in (vae.quant_conv, vae.post_quant_conv):
                if conv.weight.shape[0] == conv.weight.shape[1]:
                    conv.weight.copy_(torch.eye(conv.weight.shape[0])[:, :, None, None])
                    conv.bias.zero_()
        self.register_buffer("usage", torch.ones(vae.config.n_embed))
        self.register_buffer("restarted", torch.zeros((), dtype=torch.long))  # codes restarted so far

    def forward(self, images: torch.Tensor, restart: bool, seed: int, quantize: bool = True,
                kmeans_images: torch.Tensor | None = None, kmeans_iters: int = 15) -> torch.Tensor:
        """images: uint8 (B, 3, H, W) RGB. Returns the scalar training loss.

        ``quantize=False``: plain autoencoder step. ``kmeans_images`` (uint8 (N, 3, H, W)): first
        initialise the codebook by spherical k-means on their encoder outputs."""
        vae = self.vae
        device = vae.quant_conv.weight.device
        x = images.to(device).float() / 127.5 - 1.0  # (B, 3, H, W) in [-1, 1]
        if kmeans_images is not None:
            self._kmeans_init(kmeans_images.to(device), seed, kmeans_iters)
        if not quantize:
            return _reconstruction_loss(vae.decoder(vae.post_quant_conv(_unit_latents(vae, x))), x)
        if restart:  # before the codebook enters the autograd graph of this step
            with torch.no_grad():
                h0 = _unit_latents(vae, x)  # (B, D, h, w)
                self._restart_dead(rearrange(h0, "b d y x -> (b y x) d"), seed)
        h = _unit_latents(vae, x)  # (B, D, h, w), unit vectors
        flat = rearrange(h, "b d y x -> (b y x) d")  # (N, D)
        codebook = F.normalize(vae.quantize.embed.weight, dim=1)  # (K, D)
        codes = (flat.detach() @ codebook.T).argmax(dim=1)  # (N,)
        q = codebook[codes]  # (N, D)
        vq_loss = (flat.detach() - q).pow(2).sum(1).mean() + self.beta * (flat - q.detach()).pow(2).sum(1).mean()
        q_st = rearrange(flat + (q - flat).detach(), "(b y x) d -> b d y x", b=h.shape[0], y=h.shape[2])
        x_hat = vae.decoder(vae.post_quant_conv(q_st))  # (B, 3, H, W)
        rec = _reconstruction_loss(x_hat, x)
        with torch.no_grad():
            counts = torch.bincount(codes, minlength=codebook.shape[0]).float()  # (K,)
            self.usage.mul_(self.usage_decay).add_(counts, alpha=1 - self.usage_decay)
        return rec + vq_loss

    @torch.no_grad()
    def _kmeans_init(self, images: torch.Tensor, seed: int, iters: int) -> None:
        """Spherical k-means of the encoder outputs of ``images`` into the codebook (K unit rows)."""
        vae = self.vae
        feats = [_unit_latents(vae, chunk.float() / 127.5 - 1.0) for chunk in images.split(64)]
        flat = torch.cat([rearrange(f, "b d y x -> (b y x) d") for f in feats])  # (N, D)
        k = vae.config.n_embed
        gen = torch.Generator().manual_seed(seed)
        centres = flat[torch.randperm(len(flat), generator=gen)[:k].to(flat.device)].clone()  # (k, D)
        if len(centres) < k:  # fewer vectors than codes: pad with random directions
            extra = torch.randn(k - len(centres), flat.shape[1], generator=gen).to(flat.device)
            centres = torch.cat([centres, F.normalize(extra, dim=1)])
        for _ in range(iters):
            assign = (flat @ centres.T).argmax(dim=1)  # (N,)
            sums = torch.zeros_like(centres).index_add_(0, assign, flat)
            counts = torch.bincount(assign, minlength=k)
            empty = counts == 0  # re-seed empty clusters on random vectors
            pick = torch.randint(len(flat), (int(empty.sum()),), generator=gen).to(flat.device)
            sums[empty] = flat[pick]
            centres = F.normalize(sums, dim=1)
        vae.quantize.embed.weight.copy_(centres.to(vae.quantize.embed.weight.dtype))
        self.usage.fill_(1.0)

    @torch.no_grad()
    def _restart_dead(self, flat: torch.Tensor, seed: int) -> None:
        """Move codes whose average use fell below 1% of a uniform share onto random encoder outputs."""
        dead = (self.usage < 0.01 * self.usage.sum() / self.usage.numel()).nonzero().flatten()  # (n,)
        if not len(dead):
            return
        gen = torch.Generator().manual_seed(seed)
        pick = torch.randint(len(flat), (len(dead),), generator=gen).to(flat.device)
        self.vae.quantize.embed.weight[dead] = flat[pick].to(self.vae.quantize.embed.weight.dtype)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # data parallel: each process drew from its own batch; all take rank 0's codes (DDP keeps the
            # usage buffer equal by broadcasting rank 0's, so every process restarts at the same steps)
            torch.distributed.broadcast(self.vae.quantize.embed.weight.data, src=0)
        self.usage[dead] = self.usage.mean()
        self.restarted += len(dead)


@torch.no_grad()
def sync_proj(vae: VQGAN) -> VQGAN:
    """Write the unit-normalised codebook into ``embed`` and the cosine argmax into ``proj`` (in place)."""
    codebook = F.normalize(vae.quantize.embed.weight, dim=1)  # (K, D)
    vae.quantize.embed.weight.copy_(codebook)
    vae.quantize.proj.weight.copy_(codebook[:, :, None, None])  # (K, D, 1, 1)
    vae.quantize.proj.bias.zero_()
    return vae


@torch.no_grad()
def reconstruction_psnr(vae: VQGAN, images: torch.Tensor, batch_size: int = 50) -> tuple[float, int]:
    """Mean PSNR (dB, images in [0, 1]) of argmax encode -> decode over uint8 ``images`` (N, 3, H, W),
    and the number of distinct codes used."""
    psnrs, used = [], set()
    for chunk in images.split(batch_size):
        x = chunk.float() / 255.0  # (b, 3, H, W) in [0, 1]
        codes = vae.get_codebook_indices(x)  # (b, h*w)
        used.update(codes.unique().tolist())
        mse = (vae.decode(codes) - x).pow(2).flatten(1).mean(dim=1).clamp_min(1e-10)  # (b,)
        psnrs.append(-10 * mse.log10())
    return float(torch.cat(psnrs).mean()), len(used)


class _DecoderTrainer(nn.Module):
    """``forward(codes, images)``: reconstruction loss of the decoder (and ``post_quant_conv``) on fixed codes."""

    def __init__(self, vae: VQGAN, edge_weight: float) -> None:
        super().__init__()
        self.vae, self.edge_weight = vae, edge_weight

    def forward(self, codes: torch.Tensor, images: torch.Tensor, per_image: bool = False) -> torch.Tensor:
        x = images.to(self.vae.post_quant_conv.weight.device).float() / 127.5 - 1.0  # (B, 3, H, W) in [-1, 1]
        return _reconstruction_loss(self.vae.decode_raw(codes), x, self.edge_weight, per_image)


def refine_decoder(vae: VQGAN, images: torch.Tensor, config: VQGANTrainConfig, out_dir: Path,
                   progress: bool = True) -> VQGAN:
    """Train only ``post_quant_conv`` and the decoder for ``config.decoder_steps`` steps on the codes of
    ``images`` (uint8 (N, 3, H, W)) with the edge-weighted loss, sampling images in proportion to their
    loss before the phase."""
    module = _DecoderTrainer(vae, config.decoder_edge_weight)
    with torch.no_grad():
        codes = torch.cat([vae.get_codebook_indices(c.float() / 255) for c in images.split(100)])  # (N, h*w)
        errors = torch.cat([module(k, c, per_image=True)
                            for k, c in zip(codes.split(100), images.split(100))]).double()  # (N,)
    weights = errors / errors.sum()
    vae.requires_grad_(False)
    params = [*vae.post_quant_conv.parameters(), *vae.decoder.parameters()]
    for p in params:
        p.requires_grad_(True)

    def get_batch(step: int, shard: Shard) -> dict:
        gen = shard.generator(config.seed, 7_777_777 + step)
        idx = torch.multinomial(weights, config.batch_size, replacement=True, generator=gen)
        return {"codes": codes[idx], "images": images[idx]}

    loop = LoopConfig(steps=config.decoder_steps, lr=config.decoder_lr, warmup_steps=min(20, config.decoder_steps),
                      checkpoint_every=config.loop.checkpoint_every, log_every=config.loop.log_every,
                      seed=config.seed, mixed_precision=config.loop.mixed_precision,
                      gradient_accumulation_steps=config.loop.gradient_accumulation_steps)
    trainer, _ = run_training("vqgan-decoder", module, lambda m, b: m(**b), get_batch, loop,
                              out_dir, parameters=params, progress=progress)
    return trainer.vae.requires_grad_(False).eval()


def train(out_dir: str | Path, *, config: VQGANTrainConfig = VQGANTrainConfig(), progress: bool = True,
          images: torch.Tensor | None = None, eval_images: torch.Tensor | None = None) -> Path:
    """Train the VQGAN and save it to ``out_dir/final`` (``hub.save_pretrained``, model_type ``"vqgan"``).

    Args:
        images: uint8 (N, 3, H, W) training renders; default: ``config.variants`` variations of every
            scene of the ``"train"`` split at the model's resolution.
        eval_images: uint8 held-out renders for the PSNR report; default: ``"heldout"`` scenes.
    Returns:
        The directory of the saved model. Metrics go to ``out_dir/metrics.json``.
    """
    out_dir = Path(out_dir)
    final = out_dir / "final"
    if (final / "config.json").is_file():
        logger.info("vqgan: %s exists, skipping", final)
        return final
    size = config.model.resolution
    if images is None:
        scenes, variants = with_variants(all_scenes("train"), config.variants)
        images = render_scenes(scenes, size, variants=variants, progress=progress)
    if config.max_images is not None:
        images = images[: config.max_images]
    with torch.random.fork_rng():
        torch.manual_seed(config.seed)
        vae = VQGAN(config.model)
    trainer = VQGANTrainer(vae, config.beta, config.usage_decay)

    def get_batch(step: int, shard: Shard) -> dict:
        idx = shard.indices(step, len(images), config.batch_size, config.seed)
        restart = (step + 1) % config.restart_every == 0 and step < config.restart_until * config.loop.steps
        batch = {"images": images[idx], "restart": restart and step >= config.ae_steps,
                 "seed": shard.seed(config.seed, step), "quantize": step >= config.ae_steps}
        if step == config.ae_steps and config.ae_steps > 0:  # switch to VQ: k-means the codebook first
            pick = torch.randperm(len(images), generator=torch.Generator().manual_seed(config.seed))
            batch.update(kmeans_images=images[pick[: config.kmeans_images]], kmeans_iters=config.kmeans_iters)
        return batch

    trainer, losses = run_training("vqgan", trainer, lambda m, b: m(**b), get_batch, config.loop, out_dir,
                                   progress=progress, find_unused_parameters=True)  # no codebook while ae_steps
    restarted = int(trainer.restarted)
    vae = sync_proj(trainer.vae.eval())
    if config.decoder_steps:
        vae = refine_decoder(vae, images, config, out_dir / "decoder", progress)
    if eval_images is None:
        held = all_scenes("heldout")[: config.eval_images]
        eval_images = render_scenes(held, size, variants=[0 if config.variants else None] * len(held))
    psnr, used = reconstruction_psnr(vae, eval_images)
    train_psnr, train_used = reconstruction_psnr(vae, images[: len(eval_images)])
    metrics = {"heldout_psnr_db": psnr, "heldout_codes_used": used, "train_psnr_db": train_psnr,
               "train_codes_used": train_used, "n_embed": config.model.n_embed, "codes_restarted": restarted,
               "final_loss": losses[-1] if losses else None, "config": asdict(config)}
    logger.info("vqgan: held-out PSNR %.2f dB (%d codes used), train PSNR %.2f dB", psnr, used, train_psnr)
    if is_main_process():
        files.atomic_write(out_dir / "metrics.json", json.dumps(metrics, indent=2, default=str) + "\n")
        with files.atomic_directory(final) as folder:  # last: final/ exists only when complete
            save_pretrained(vae, vae.config, folder, model_type="vqgan")
    wait_for_everyone()  # every process returns once final/ is complete
    return final


def load_trained(directory: str | Path) -> VQGAN:
    """Load a VQGAN saved by :func:`train` (fp32, eval mode)."""
    return load_pretrained(VQGAN, VQGANConfig, directory, model_type="vqgan")
