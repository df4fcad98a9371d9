"""Stage 3: train the generator (:class:`rudalle_pipe.DalleModel`) on captioned, VQGAN-encoded renders.

The dataset is every distinct scene of the ``"train"`` split, rendered in ``variants`` variations
(``shapes.render(..., variant=k)``: small shifts, scales, rotations and colour shades, so that one
caption has many pictures and sampled candidates differ), each with all its caption word orders
(``shapes.WORD_ORDERS``). The renders are encoded once with the trained VQGAN (deterministic argmax)
and the codes are cached in ``out_dir/codes.pt``; the captions are tokenized with the trained BPE.
A ``caption_dropout`` fraction of the rows gets the empty text (all pads) instead of its caption, so
the model also learns the unconditional distribution that classifier-free guidance needs.
One sequence is ``[text ids (text_seq_length) | image codes (side * side)]`` and the loss is the
original's weighted cross-entropy ``(L_text + 7 L_image) / 8`` (``model(ids, return_loss=True)``), with
one addition (``first_code_loss``, on by default): the image term also scores the *first* image code
with the image head at the last text position. The original scores that code only as a text-vocabulary
label, yet generation samples it from the image head at that position; the 1.3B models generalise over
the gap, but a 2M-parameter model leaves that head untrained there and starts every picture with a
random code (a blob in the top-left corner that drags the background colour along).
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from .. import files
from ..checks import check_float, check_int
from ..dalle import DalleConfig, DalleModel
from ..generation import empty_text_ids
from ..tokenizer import YTTMTokenizer, prepare_text
from ..vae import VQGAN
from .common import LoopConfig, Shard, is_main_process, run_training, wait_for_everyone
from .scenes import all_captions, all_scenes, render_scenes, with_variants

logger = logging.getLogger(__name__)

__all__ = ["DalleTrainConfig", "train", "encode_dataset", "tokenize_captions", "model_config", "batch_rows",
           "generator_loss"]


@dataclass(frozen=True)
class DalleTrainConfig:
    """Stage 3 settings: the generator's size (vocabularies and grid come from the tokenizer and VQGAN),
    optimisation and data."""

    num_layers: int = 4  # transformer blocks (layer 1 uses the column mask, the last the conv mask)
    hidden_size: int = 192  # model width
    num_attention_heads: int = 6  # heads (head width 32)
    text_seq_length: int = 20  # text positions: BOS + caption tokens + EOS, right-padded
    dropout: float = 0.1  # dropout everywhere (training only)
    loop: LoopConfig = field(default_factory=lambda: LoopConfig(steps=5000, lr=1e-3, weight_decay=0.01,
                                                                warmup_steps=50, checkpoint_every=100))
    batch_size: int = 32  # (caption, image) pairs per step
    variants: int = 8  # renders per scene, each a different variation (shapes.render(variant=k)); 0 = plain only
    caption_dropout: float = 0.1  # fraction of rows trained on the empty text (all pads): the unconditional
    # model that classifier-free guidance pushes against (generation.empty_text_ids)
    max_scenes: int | None = None  # use only the first N training scenes (tests); None = all
    eval_scenes: int = 64  # held-out scenes whose loss is reported
    seed: int = 0  # initialisation and batch order
    first_code_loss: bool = True  # the image term also covers the first image code (see the module docstring)

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        check_int("variants", self.variants, low=0, high=1024)
        check_float("caption_dropout", self.caption_dropout, low=0, high=1, high_open=True)


def model_config(config: DalleTrainConfig, tokenizer: YTTMTokenizer, vae: VQGAN, image_size: int) -> DalleConfig:
    """The :class:`DalleConfig` for ``config`` with this tokenizer and VQGAN (codebook size, grid side
    ``image_size / f``).

    The text vocabulary is ``max(BPE vocab, codebook size)`` plus one pad id per text position: the
    original loss scores the first image code as the label of the last text position *in the text
    vocabulary*, so every code must be a valid text id (true of the real models, 16512 > 8192).
    """
    return DalleConfig(num_layers=config.num_layers, hidden_size=config.hidden_size,
                       num_attention_heads=config.num_attention_heads,
                       vocab_size=max(tokenizer.vocab_size, vae.num_tokens) + config.text_seq_length,
                       image_vocab_size=vae.num_tokens, text_seq_length=config.text_seq_length,
                       image_tokens_per_dim=image_size // vae.downsample_factor, dropout=config.dropout)


@torch.no_grad()
def encode_dataset(vae: VQGAN, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """uint8 renders (N, 3, H, W) -> int16 codes (N, (H/f) * (W/f)) by the VQGAN's argmax."""
    codes = [vae.get_codebook_indices(chunk.float() / 255.0) for chunk in images.split(batch_size)]
    return torch.cat(codes).to(torch.int16)  # (N, h*w); int16 holds codebooks up to 32768


def tokenize_captions(tokenizer: YTTMTokenizer, captions: Sequence[Sequence[str]], length: int) -> torch.Tensor:
    """Nested captions [N][V] -> int64 ids (N, V, length): BOS, BPE ids, EOS, zero padding."""
    return torch.stack([torch.stack([tokenizer.encode_text(prepare_text(c), length) for c in variants])
                        for variants in captions])


def _load_or_encode(path: Path, vae: VQGAN, scenes: list, variants: list, size: int, progress: bool) -> torch.Tensor:
    """Codes of the renders of ``scenes`` (variation ``variants[i]`` of scene i), cached in ``path``
    (written atomically) under a key of the scene and variation lists and the VQGAN's codebook; a stale
    cache is re-encoded, an unreadable one too, with a warning."""
    digest = hashlib.sha256(f"{size}:{scenes!r}:{variants!r}".encode("utf-8"))
    digest.update(vae.quantize.embed.weight.detach().float().cpu().numpy().tobytes())
    key = digest.hexdigest()
    if path.is_file():
        try:
            cached = torch.load(path, weights_only=True)
        except Exception as err:  # noqa: BLE001 - a torn or foreign file: encode again
            logger.warning("dalle: the codes cache %s is unreadable (%s); encoding again", path, err)
            cached = None
        if isinstance(cached, dict) and cached.get("key") == key and isinstance(cached.get("codes"), torch.Tensor):
            return cached["codes"]
        if cached is not None:
            logger.info("dalle: the codes cache %s is for other scenes or another VQGAN; encoding again", path)
    codes = encode_dataset(vae, render_scenes(scenes, size, variants=variants, progress=progress))
    if is_main_process():
        stored = {"key": key, "codes": codes}
        files.atomic_write(path, lambda f: torch.save(stored, f))
    return codes


def batch_rows(step: int, *, texts: torch.Tensor, codes: torch.Tensor, config: DalleTrainConfig,
               shard: Shard = Shard()) -> torch.Tensor:
    """Training rows ``[B, T + h*w]`` = ``[caption ids | image codes]`` of ``step``, a pure function of
    ``(step, config.seed, shard)`` so that a resumed run sees the same batches (``shard``: this
    process's part of the step's global batch, see :class:`rudalle_pipe.train.common.Shard`).

    Args:
        texts: ``[S, V, T]`` caption ids: V word orders of each of S scenes.
        codes: ``[S * K, h*w]`` codes of K = ``max(config.variants, 1)`` renders per scene, scene-major.
    Pairs (render, word order) are drawn epoch-wise without replacement; a ``config.caption_dropout``
    fraction of the rows gets :func:`rudalle_pipe.generation.empty_text_ids` instead of the caption.
    """
    per_scene, n_orders = max(config.variants, 1), texts.shape[1]
    if codes.shape[0] != texts.shape[0] * per_scene:
        raise ValueError(f"codes has {codes.shape[0]} rows; {texts.shape[0]} scenes x {per_scene} renders expected")
    pair = shard.indices(step, codes.shape[0] * n_orders, config.batch_size, config.seed)  # (B,)
    image, order = pair // n_orders, pair % n_orders
    text = texts[image // per_scene, order]  # (B, T)
    dropped = torch.rand(len(pair), generator=shard.generator(config.seed, step))
    text = torch.where((dropped < config.caption_dropout)[:, None], empty_text_ids(texts.shape[2]), text)
    return torch.cat([text, codes[image].long()], dim=1)  # (B, T + h*w)


def generator_loss(model: DalleModel, ids: torch.Tensor, first_code: bool = True) -> torch.Tensor:
    """The original loss of ``ids [B, L]``; with ``first_code`` the image cross-entropy is the mean over
    all ``image_seq_length`` codes, the first one read from the image head at the last text position."""
    out = model(ids, return_loss=True)
    if not first_code:
        return out.loss
    cfg = model.config if hasattr(model, "config") else model.module.config
    T, n = cfg.text_seq_length, cfg.image_seq_length
    first = torch.nn.functional.cross_entropy(out.logits[:, T - 1, cfg.vocab_size:].float(), ids[:, T])
    loss_image = (out.loss_image * (n - 1) + first) / n
    w = cfg.loss_img_weight
    return (out.loss_text + w * loss_image) / (w + 1)


@torch.no_grad()
def _eval_loss(model: DalleModel, ids: torch.Tensor) -> dict[str, float]:
    model.eval()
    out = model(ids, return_loss=True)
    return {"loss": float(out.loss), "loss_text": float(out.loss_text), "loss_image": float(out.loss_image)}


def train(out_dir: str | Path, *, config: DalleTrainConfig = DalleTrainConfig(), progress: bool = True,
          tokenizer_path: str | Path, vae_dir: str | Path) -> Path:
    """Train the generator and save it with :meth:`DalleModel.save_pretrained` to ``out_dir/final``.

    Args:
        tokenizer_path: the stage 1 ``bpe.model``.
        vae_dir: the stage 2 VQGAN directory.
    Returns:
        The directory of the saved model. Metrics (final and held-out losses) go to ``out_dir/metrics.json``.
    """
    from .vqgan import load_trained

    out_dir = Path(out_dir)
    final = out_dir / "final"
    if (final / "config.json").is_file():
        logger.info("dalle: %s exists, skipping", final)
        return final
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = YTTMTokenizer.from_file(tokenizer_path)
    vae = load_trained(vae_dir)
    size = vae.config.resolution
    scenes = all_scenes("train")[: config.max_scenes]
    per_scene = max(config.variants, 1)  # renders per scene
    codes = _load_or_encode(out_dir / "codes.pt", vae, *with_variants(scenes, config.variants), size,
                            progress)  # (S * per_scene, h*w) int16, scene-major
    texts = tokenize_captions(tokenizer, [all_captions(s) for s in scenes], config.text_seq_length)  # (S, V, T)
    n_variants = texts.shape[1]
    model_cfg = model_config(config, tokenizer, vae, size)
    if codes.shape[1] != model_cfg.image_seq_length:
        raise ValueError(f"cached codes have {codes.shape[1]} positions, the model expects "
                         f"{model_cfg.image_seq_length}; delete {out_dir / 'codes.pt'}")
    with torch.random.fork_rng():
        torch.manual_seed(config.seed)
        model = DalleModel(model_cfg)
    logger.info("dalle: %d scenes x %d renders x %d captions, caption dropout %.2f, %.2fM parameters", len(scenes),
                per_scene, n_variants, config.caption_dropout, sum(p.numel() for p in model.parameters()) / 1e6)

    def get_batch(step: int, shard: Shard) -> torch.Tensor:
        return batch_rows(step, texts=texts, codes=codes, config=config, shard=shard)

    def loss_fn(m, ids: torch.Tensor) -> torch.Tensor:
        return generator_loss(m, ids.to(next(m.parameters()).device), config.first_code_loss)

    model, losses = run_training("dalle", model, loss_fn, get_batch, config.loop, out_dir, progress=progress)
    held_scenes = all_scenes("heldout")[:: max(1, 150 // config.eval_scenes)][: config.eval_scenes]
    held_codes = encode_dataset(vae, render_scenes(held_scenes, size, variants=[0 if config.variants else None]
                                                    * len(held_scenes)))
    held_text = tokenize_captions(tokenizer, [all_captions(s)[:1] for s in held_scenes], config.text_seq_length)
    train_ids = torch.stack([get_batch(0, Shard())[i] for i in range(min(config.batch_size, 64))])
    metrics = {"final_loss": losses[-1] if losses else None,
               "train_batch": _eval_loss(model, train_ids),
               "heldout": _eval_loss(model, torch.cat([held_text[:, 0], held_codes.long()], dim=1)),
               "parameters": sum(p.numel() for p in model.parameters()), "config": asdict(config)}
    logger.info("dalle: final loss %s, held-out loss %.4f", metrics["final_loss"], metrics["heldout"]["loss"])
    if is_main_process():
        files.atomic_write(out_dir / "metrics.json", json.dumps(metrics, indent=2, default=str) + "\n")
        with files.atomic_directory(final) as folder:  # last: final/ exists only when complete
            model.save_pretrained(folder)
    wait_for_everyone()  # every process returns once final/ is complete
    return final
