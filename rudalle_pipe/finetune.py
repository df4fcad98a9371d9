"""Finetune a ruDALL-E generator on your own pictures (a style, a subject, emoji, ...).

    from rudalle_pipe import get_rudalle_model, get_tokenizer, get_vae
    from rudalle_pipe.finetune import finetune

    dalle, vae, tokenizer = get_rudalle_model("Malevich"), get_vae(), get_tokenizer()
    result = finetune(dalle, vae, tokenizer, "my_pictures/", out_dir="runs/cats", steps=500, lr=1e-4,
                      batch_size=1, lora_rank=8, gradient_checkpointing=True, mixed_precision="fp16")
    model = get_rudalle_model("runs/cats/final")      # the finetuned generator, like any other

What it does:

* **Data** (:func:`load_pairs`): a folder of images with captions - a ``captions.csv`` with columns
  ``file,caption``, or a ``<name>.txt`` next to every image, or one ``caption=`` for all - or a list of
  ``(image, caption)`` pairs (PIL images or paths). Images are resized (shorter side) and centre-cropped
  to the generator's resolution, encoded by the VQGAN **once**, and the codes are cached in
  ``out_dir/codes.pt`` (keyed by the pixels and the VQGAN, so a rerun does not encode again). A bad
  data file is an error naming it, or with ``skip_bad=True`` a warning and left out
  (:mod:`rudalle_pipe.train.finetune_data`).
* **What trains** (``train``): ``"all"``, or any of ``"attention"``, ``"mlp"``, ``"layernorm"``,
  ``"embeddings"``, ``"head"``; everything else is frozen. With ``lora_rank > 0`` the linear layers of
  the chosen attention/MLP parts get LoRA adapters instead (``W + (alpha / r) B A``, ``B`` starting at
  zero), written as ``torch.nn.utils.parametrize`` parametrisations of their weights, so the model code
  runs unchanged; the final model has the adapters merged in.
* **Loop**: :func:`rudalle_pipe.train.common.run_training` on Hugging Face accelerate (one CPU, one
  GPU, or ``accelerate launch`` over several), with AdamW / Adafactor / 8-bit AdamW, gradient clipping, a
  linear warm-up and cosine decay, mixed precision, gradient checkpointing, a tqdm bar and a CSV loss
  log (``out_dir/loss_log.csv``). The loss is the original's ``(L_text + 7 L_image) / 8``.
* **Checkpoints**: the full training state every ``checkpoint_every`` steps in ``out_dir/checkpoint``
  (a rerun with the same ``out_dir``, data, base weights and settings resumes from it; anything else
  is refused, naming the difference), the model itself in the Hugging Face layout in
  ``out_dir/step-<N>`` (the last ``keep_checkpoints`` kept; only folders this package marked are ever
  deleted), and the final model in ``out_dir/final``.
* **Crash-proof**: every file is written atomically (temporary name, fsync, rename); a checkpoint
  becomes current only when complete, and a resume falls back to the previous complete one
  (:mod:`rudalle_pipe.train.checkpoints`); ``final/`` appears last, so it means "finished". An
  interrupt or a full disk at any write, followed by the same call, gives the same model.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional, Union

import torch
from torch import nn
from torch.nn.utils import parametrize

from . import files
from .checks import TRAINABLE_PARTS, check_float, check_int
from .dalle import DalleModel
from .tokenizer import YTTMTokenizer
from .train.common import MAX_STEPS
from .train.finetune_data import (CAPTIONS_FILE, IMAGE_SUFFIXES, Data, ImageLike, encode_pairs,  # noqa: F401 (re-exported)
                                  load_pairs, prepare_image)

logger = logging.getLogger(__name__)

__all__ = ["FinetuneConfig", "FinetuneResult", "TRAINABLE_PARTS", "IMAGE_SUFFIXES", "finetune", "load_pairs",
           "prepare_image", "encode_pairs", "select_trainable", "add_lora", "merge_lora", "dataset_loss", "estimate_memory",
           "MAX_STEPS", "MAX_BATCH_SIZE", "MAX_LORA_RANK", "MAX_KEEP_CHECKPOINTS"]

_LORA_TARGETS = {"attention": ("query_key_value", "dense"), "mlp": ("dense_h_to_4h", "dense_4h_to_h")}
MAX_BATCH_SIZE = 4096  # pairs per step
MAX_LORA_RANK = 1024  # LoRA rank (the large models are 2048 wide; a rank near that is full finetuning)
MAX_KEEP_CHECKPOINTS = 1000  # step-<N> exports kept



@dataclass(frozen=True)
class FinetuneConfig:
    """Every finetuning option; :func:`finetune` takes these as keyword arguments."""

    steps: int = 200  # optimizer steps in total, 1..MAX_STEPS (10_000_000); a resume must keep it
    lr: float = 1e-4  # peak learning rate, finite, in (0, 10] (1e-5..4e-5 for full finetuning of the large models)
    batch_size: int = 1  # (image, caption) pairs per step and process, 1..MAX_BATCH_SIZE (4096); the global
    # batch is num_processes * gradient_accumulation_steps * batch_size
    gradient_accumulation_steps: int = 1  # batches summed into one optimizer step (accelerate's accumulate)
    train: tuple[str, ...] = ("all",)  # parts that learn; see TRAINABLE_PARTS
    lora_rank: int = 0  # 1..MAX_LORA_RANK (1024): LoRA adapters of this rank on the attention/MLP linears of ``train``
    lora_alpha: float = 16.0  # LoRA scale numerator (finite, > 0): delta W = (lora_alpha / lora_rank) B A
    gradient_checkpointing: bool = False  # recompute each block's activations in the backward pass
    mixed_precision: str = "no"  # "no", "fp16" or "bf16" (accelerate autocast)
    optimizer: str = "adamw"  # "adamw", "adafactor" (low memory) or "adamw8bit" (bitsandbytes, GPU)
    weight_decay: float = 0.0  # AdamW weight decay
    grad_clip: Optional[float] = 1.0  # max gradient norm; None disables clipping
    warmup_steps: Optional[int] = None  # linear warm-up; None = 10% of the steps
    min_lr_ratio: float = 0.1  # the cosine decays to lr * min_lr_ratio
    checkpoint_every: int = 100  # save the training state and a step-<N> model this often (<= MAX_STEPS)
    keep_checkpoints: int = 2  # step-<N> model directories kept, 0..1000 (older ones this package wrote are deleted)
    log_every: int = 10  # rows of loss_log.csv (<= MAX_STEPS)
    seed: int = 0  # batch order, dropout; 0..2**32-1

    def __post_init__(self) -> None:
        train = (self.train,) if isinstance(self.train, str) else tuple(self.train)
        object.__setattr__(self, "train", train)
        bad = [p for p in train if p not in TRAINABLE_PARTS]
        if bad or not train:
            raise ValueError(f"train must name parts from {list(TRAINABLE_PARTS)}, got {list(train)!r}")
        check_int("steps", self.steps, high=MAX_STEPS)
        check_int("batch_size", self.batch_size, high=MAX_BATCH_SIZE)
        check_int("lora_rank", self.lora_rank, low=0, high=MAX_LORA_RANK)
        check_float("lora_alpha", self.lora_alpha, low=0, low_open=True)
        check_int("keep_checkpoints", self.keep_checkpoints, low=0, high=MAX_KEEP_CHECKPOINTS)
        if not isinstance(self.gradient_checkpointing, bool):
            raise TypeError(f"gradient_checkpointing must be True or False, got {self.gradient_checkpointing!r}")
        if self.lora_rank and not {"all", "attention", "mlp"} & set(train):
            raise ValueError(f"lora_rank={self.lora_rank} adapts attention/MLP linears, but train={list(train)} "
                             "names neither; add 'attention' and/or 'mlp' (or 'all')")
        self.loop_config()  # steps, lr, seed, ... through checks.py; mixed_precision, optimizer, warmup_steps

    def loop_config(self):
        """The :class:`rudalle_pipe.train.common.LoopConfig` of these settings."""
        from .train.common import LoopConfig

        warmup = self.warmup_steps if self.warmup_steps is not None else max(1, self.steps // 10)
        return LoopConfig(steps=self.steps, lr=self.lr, weight_decay=self.weight_decay, warmup_steps=warmup,
                          min_lr_ratio=self.min_lr_ratio, grad_clip=self.grad_clip,
                          checkpoint_every=self.checkpoint_every, log_every=self.log_every,
                          gradient_accumulation_steps=self.gradient_accumulation_steps,
                          mixed_precision=self.mixed_precision, seed=self.seed, optimizer=self.optimizer)


@dataclass
class FinetuneResult:
    """What :func:`finetune` returns."""

    model: DalleModel  # the finetuned generator (LoRA merged), eval mode
    path: Path  # out_dir/final: loads with get_rudalle_model(str(path))
    losses: list[float]  # training loss of every step run in this call
    loss_before: float  # mean loss over the training pairs before finetuning (eval mode)
    loss_after: float  # the same after finetuning
    trainable_parameters: int  # parameters that received gradients (LoRA factors with lora_rank > 0)


# -------------------------------------------------------------------------- what trains, LoRA
def _part_of(name: str) -> str:
    """Which TRAINABLE_PARTS entry a parameter of DalleModel belongs to."""
    if "layernorm" in name:
        return "layernorm"
    if ".attention." in name:
        return "attention"
    if ".mlp." in name:
        return "mlp"
    if name.startswith("to_logits"):
        return "head"
    return "embeddings"


class _LoRA(nn.Module):
    """Parametrisation ``W -> W + scale * B @ A`` of a Linear weight (out, in); A (r, in), B (out, r)."""

    def __init__(self, weight: torch.Tensor, rank: int, alpha: float, generator: torch.Generator) -> None:
        super().__init__()
        out_features, in_features = weight.shape
        a = torch.empty(rank, in_features)
        bound = 1.0 / math.sqrt(in_features)
        a.uniform_(-bound, bound, generator=generator)
        self.lora_a = nn.Parameter(a.to(weight.device))
        self.lora_b = nn.Parameter(torch.zeros(out_features, rank, device=weight.device))
        self.scale = alpha / rank

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + (self.lora_b @ self.lora_a * self.scale).to(weight.dtype)


def add_lora(dalle: DalleModel, parts: Iterable[str], rank: int, alpha: float, seed: int = 0) -> list[nn.Parameter]:
    """Freeze the model and add LoRA to the linears of ``parts`` (``"attention"``, ``"mlp"``, ``"all"``).
    Returns the new (fp32) LoRA parameters."""
    parts = set(parts)
    names = [n for part, ns in _LORA_TARGETS.items() if part in parts or "all" in parts for n in ns]
    dalle.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    params = []
    for layer in dalle.transformer.layers:
        for module in (layer.attention, layer.mlp):
            for name in names:
                linear = getattr(module, name, None)
                if isinstance(linear, nn.Linear) and not parametrize.is_parametrized(linear, "weight"):
                    lora = _LoRA(linear.weight, rank, alpha, generator)
                    parametrize.register_parametrization(linear, "weight", lora)
                    params += [lora.lora_a, lora.lora_b]
    return params


def merge_lora(dalle: DalleModel) -> DalleModel:
    """Bake every LoRA parametrisation into its weight (in place): a plain :class:`DalleModel` again."""
    for module in dalle.modules():
        if isinstance(module, nn.Linear) and parametrize.is_parametrized(module, "weight"):
            dtype = module.parametrizations.weight.original.dtype
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
            module.weight.data = module.weight.data.to(dtype)
    return dalle


def select_trainable(dalle: DalleModel, config: FinetuneConfig) -> list[nn.Parameter]:
    """Set ``requires_grad`` per ``config.train`` / LoRA and return the parameters to optimise."""
    if config.lora_rank:
        params = add_lora(dalle, config.train, config.lora_rank, config.lora_alpha, config.seed)
        others = set(config.train) - {"attention", "mlp", "all"}  # e.g. also train the layernorms fully
        for name, p in dalle.named_parameters():
            if "parametrizations" not in name and _part_of(name) in others:
                p.requires_grad_(True)
                params.append(p)
        return params
    params = []
    for name, p in dalle.named_parameters():
        on = "all" in config.train or _part_of(name) in config.train
        p.requires_grad_(on)
        if on:
            params.append(p)
    return params


def _state_for_saving(dalle: DalleModel) -> dict[str, torch.Tensor]:
    """State dict with LoRA merged (original key names), without changing the model."""
    state = {k: v for k, v in dalle.state_dict().items() if ".parametrizations." not in k}
    for name, module in dalle.named_modules():
        if isinstance(module, nn.Linear) and parametrize.is_parametrized(module, "weight"):
            original = module.parametrizations.weight.original
            state[f"{name}.weight"] = module.weight.detach().to(original.dtype)  # W + scale * B A
    return state


def _save_model(dalle: DalleModel, directory: Path) -> None:
    """Write ``directory`` in the Hugging Face layout (config.json + model.safetensors), LoRA merged."""
    from .hub import save_pretrained

    save_pretrained(dalle, dalle.config, directory, model_type="rudalle", state_dict=_state_for_saving(dalle))


@torch.no_grad()
def dataset_loss(dalle: DalleModel, ids: torch.Tensor, batch_size: int = 8) -> float:
    """Mean original loss of ``dalle`` (eval mode) over token sequences ``ids [N, L]``."""
    was_training = dalle.training
    dalle.eval()
    device = next(dalle.parameters()).device
    total = 0.0
    for chunk in ids.split(batch_size):
        total += float(dalle(chunk.to(device), return_loss=True).loss) * len(chunk)
    dalle.train(was_training)
    return total / len(ids)


# ------------------------------------------------------------------------------ memory estimate
_STATE_BYTES = {"adamw": 8, "adamw8bit": 2, "adafactor": 0}  # optimizer bytes per trainable parameter


def estimate_memory(model_config: Any, config: FinetuneConfig, *, weights_dtype: torch.dtype = torch.float16
                    ) -> dict[str, float]:
    """Rough peak accelerator memory (GiB) of finetuning a generator of ``model_config`` (a
    :class:`rudalle_pipe.DalleConfig`) with ``config``, before any framework overhead.

    Counted: frozen weights in ``weights_dtype``; trainable parameters as fp32 master copy + fp32
    gradient + optimizer states (AdamW 8 B, 8-bit AdamW 2 B, Adafactor ~0 B per parameter); the
    activations of a sequence of ``L`` positions, batch ``b``, width ``h``, ``a`` heads at 2 bytes, using
    the usual per-layer estimate ``34 L b h + 5 a L^2 b`` bytes for one layer (every layer without
    gradient checkpointing, one layer plus each layer's input with it); the fp32 logits and their
    gradient ``2 * 4 * b * L * V``. The parameters are counted on the meta device (nothing is allocated).
    """
    from .dalle import DalleModel
    from .hub import on_meta

    with on_meta():
        model = DalleModel(model_config)
        select_trainable(model, config)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
    frozen = total - trainable  # with LoRA: every original weight (the factors are the trainable part)
    cfg = model_config
    b, seq, h, a = config.batch_size, cfg.total_seq_length, cfg.hidden_size, cfg.num_attention_heads
    per_layer = 34 * seq * b * h + 5 * a * seq * seq * b  # bytes, fp16 activations of one layer
    if config.gradient_checkpointing:
        activations = per_layer + cfg.num_layers * seq * b * h * 2
    else:
        activations = cfg.num_layers * per_layer
    logits = 2 * 4 * b * seq * (cfg.vocab_size + cfg.image_vocab_size)
    gib = 2 ** 30
    parts = {
        "parameters_total_m": total / 1e6,
        "parameters_trainable_m": trainable / 1e6,
        "frozen_weights_gib": frozen * torch.finfo(weights_dtype).bits / 8 / gib,
        "trainable_weights_grads_gib": trainable * 8 / gib,
        "optimizer_gib": trainable * _STATE_BYTES[config.optimizer] / gib,
        "activations_gib": (activations + logits) / gib,
    }
    parts["total_gib"] = sum(v for k, v in parts.items() if k.endswith("_gib"))
    return parts


# ------------------------------------------------------------------------------------- finetune
def finetune(dalle: DalleModel, vae: Any, tokenizer: YTTMTokenizer, data: Data, *, out_dir: Union[str, Path],
             caption: Optional[str] = None, skip_bad: bool = False, progress: bool = True,
             config: Optional[FinetuneConfig] = None, **options: Any) -> FinetuneResult:
    """Finetune ``dalle`` on ``data`` and save the result to ``out_dir/final``.

    Args:
        dalle: the generator to finetune (changed in place; trainable parts are kept in fp32). A model
            loaded in fp16/bf16 needs ``mixed_precision`` "fp16"/"bf16" (its frozen weights stay half).
        vae: the VQGAN that encodes the images (``get_vae()`` for the Sber models).
        tokenizer: the generator's BPE tokenizer.
        data: a folder or ``(image, caption)`` pairs; see :func:`load_pairs`.
        out_dir: where checkpoints, ``loss_log.csv``, ``codes.pt``, ``finetune.json``, ``result.json``
            and ``final/`` go. A rerun with the same ``out_dir``, data, base weights and settings
            resumes from the last complete checkpoint; another data folder, other base weights or
            another ``steps`` (or any setting but ``checkpoint_every``/``keep_checkpoints``/
            ``log_every``) is refused, naming the difference (see :mod:`rudalle_pipe.train.runs`).
        caption: one caption for every image.
        skip_bad: skip (and list in warnings) unusable data files instead of failing; see :func:`load_pairs`.
        config / options: a :class:`FinetuneConfig`, or its fields as keyword arguments (``steps``,
            ``lr``, ``batch_size``, ``train``, ``lora_rank``, ``gradient_checkpointing``, ...).
    Returns:
        A :class:`FinetuneResult`; ``get_rudalle_model(str(result.path))`` loads the model again.

    Every file is written atomically; ``final/`` appears last, so it exists only when the run is
    complete (``result.json`` is written just before it). Only ``step-<N>`` folders carrying this
    package's marker are ever rotated away.
    """
    from .train import checkpoints, runs
    from .train.common import Shard, check_mixed_precision, is_main_process, run_training, wait_for_everyone

    if config is not None and options:
        raise TypeError(f"pass either config= or keyword options, not both (got {sorted(options)})")
    if config is None:
        known = {f.name for f in dataclasses.fields(FinetuneConfig)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise TypeError(f"unknown finetune options {unknown}; valid: {sorted(known)}")
        config = FinetuneConfig(**options)
    if not isinstance(dalle, DalleModel):
        raise TypeError(f"dalle must be a DalleModel, got {type(dalle).__name__}")
    out_dir = Path(out_dir)
    final = out_dir / "final"
    if final.exists():
        raise FileExistsError(f"{final} exists: this run has finished. Load it with get_rudalle_model("
                              f"{str(final)!r}) or choose another out_dir")
    check_mixed_precision(config.mixed_precision)  # a second precision in one process stops here, before slow work
    half = [(n, p.dtype) for n, p in dalle.named_parameters() if p.dtype in (torch.float16, torch.bfloat16)]
    if half and config.mixed_precision == "no":
        name, dtype = half[0]
        raise ValueError(f"the generator holds {dtype} weights ({name}, ...) and mixed_precision='no': pass "
                         "mixed_precision='fp16' or 'bf16', or load it in float32")
    pairs = load_pairs(data, caption=caption, skip_bad=skip_bad)
    record = runs.make_record(dataclasses.asdict(config), pairs, dalle)  # the base weights, before training
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoints.check_state_dir(out_dir)  # a foreign checkpoint/ folder stops here
    if checkpoints.has_checkpoint(out_dir):
        runs.check_record(out_dir, record)
    checkpoints.read_log(out_dir)  # a foreign loss_log.csv stops here, before any slow work

    def exported(step: int) -> bool:
        return bool(config.keep_checkpoints) and 1 <= step <= config.steps and (
            step % config.checkpoint_every == 0 or step == config.steps)

    foreign = checkpoints.foreign_exports(out_dir, exported)
    if foreign:
        raise FileExistsError(f"{', '.join(map(str, foreign))} would be replaced by checkpoint exports but "
                              "were not written by rudalle_pipe; move them away or choose another out_dir")
    if is_main_process():
        runs.write_record(out_dir, record)

    ids = encode_pairs(dalle, vae, tokenizer, pairs, cache=out_dir / "codes.pt")  # (N, L) int64
    logger.info("finetune: %d pairs, %d steps of batch %d", len(ids), config.steps, config.batch_size)
    loss_before = dataset_loss(dalle, ids)

    params = select_trainable(dalle, config)
    for p in params:  # optimizer states and updates in fp32
        if p.dtype != torch.float32:
            p.data = p.data.float()
    n_trainable = sum(p.numel() for p in params)
    if not n_trainable:
        raise ValueError(f"train={list(config.train)} selects no parameters")
    logger.info("finetune: %.2fM of %.2fM parameters train", n_trainable / 1e6,
                sum(p.numel() for p in dalle.parameters()) / 1e6)
    dalle.gradient_checkpointing = config.gradient_checkpointing

    def get_batch(step: int, shard: Shard) -> torch.Tensor:  # this process's batch_size pairs of the step
        return ids[shard.indices(step, len(ids), config.batch_size, config.seed)]

    def loss_fn(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        return model(batch.to(next(model.parameters()).device), return_loss=True).loss

    def on_checkpoint(model: DalleModel, step: int) -> None:
        if config.keep_checkpoints:
            checkpoints.write_export(out_dir, step, lambda folder: _save_model(model, folder))
            checkpoints.rotate_exports(out_dir, config.keep_checkpoints)

    model, losses = run_training("finetune", dalle, loss_fn, get_batch, config.loop_config(), out_dir,
                                 parameters=params, progress=progress, on_checkpoint=on_checkpoint)
    model.gradient_checkpointing = False
    merge_lora(model)
    model.requires_grad_(False)
    model.eval()
    loss_after = dataset_loss(model, ids)
    if is_main_process():
        summary = {"pairs": len(ids), "steps": config.steps, "loss_before": loss_before, "loss_after": loss_after,
                   "trainable_parameters": n_trainable}
        files.atomic_write(out_dir / "result.json", json.dumps(summary, indent=2) + "\n")
        with files.atomic_directory(final) as folder:  # last: final/ exists only when everything is written
            _save_model(model, folder)
    wait_for_everyone()  # every process returns once final/ is complete
    logger.info("finetune: loss %.4f -> %.4f; model saved to %s", loss_before, loss_after, final)
    return FinetuneResult(model=model, path=final, losses=losses, loss_before=loss_before, loss_after=loss_after,
                          trainable_parameters=n_trainable)
