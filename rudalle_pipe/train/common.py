"""One training loop for every model the project trains, built on Hugging Face accelerate.

The same code runs on one CPU, one GPU, or several processes, GPUs and machines under ``accelerate
launch`` or ``torchrun`` (data parallel: DDP; FSDP and DeepSpeed shard the model and are refused, see
:func:`run_training`). It gives every stage:

* AdamW with a linear warm-up and a cosine decay, and gradient clipping;
* checkpoints every ``checkpoint_every`` steps through ``Accelerator.save_state`` (model, optimizer,
  scheduler and RNG states), each swapped into place only when complete; a rerun resumes from the
  newest complete one (:mod:`rudalle_pipe.train.checkpoints`);
* a CSV loss log (``step,loss,lr,seconds``) and a tqdm bar on the main process.

Training is data-parallel. Under ``accelerate launch`` or ``torchrun`` with N processes, every
optimizer step consumes one global batch of ``N * gradient_accumulation_steps`` shards; a shard is
what ``get_batch(step, shard)`` returns for one :class:`Shard` (process ``rank``, micro-step ``micro``).
``batch_size`` in the stage configs is the size of one shard, i.e. per process and micro-step. Batches
are pure functions of ``(step, shard)``, so a resumed run sees the same data as an uninterrupted one,
and a run is reproducible for a given process count; :meth:`Shard.indices` slices one epoch-wise
shuffle so that N processes see exactly the data one process sees with an N times larger batch.
The losses returned and logged are averaged over the shards of each step; the learning-rate schedule
follows optimizer steps; only the main process writes the log, checkpoints' markers and exports.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from ..checks import check_float, check_int
from . import checkpoints

logger = logging.getLogger(__name__)

__all__ = ["LoopConfig", "OPTIMIZERS", "MAX_STEPS", "MAX_SEED", "MAX_LR", "make_optimizer", "run_training",
           "cosine_with_warmup", "batch_indices",
           "is_main_process", "wait_for_everyone", "Shard", "make_accelerator", "check_mixed_precision"]


OPTIMIZERS = ("adamw", "adafactor", "adamw8bit")
MAX_STEPS = 10_000_000  # upper bound of steps, checkpoint_every, log_every: weeks on a GPU for the large models
MAX_SEED = 2**32 - 1  # seeds are 32-bit (batch_indices mixes them with the epoch into a 64-bit torch seed)
MAX_LR = 10.0  # a learning rate above this diverges at once
MAX_ACCUMULATION = 4096  # gradient_accumulation_steps: more shards per step than this is a typo


def make_optimizer(params: list[nn.Parameter], config: "LoopConfig") -> torch.optim.Optimizer:
    """The optimizer named by ``config.optimizer`` over ``params``."""
    if config.optimizer == "adafactor":
        return torch.optim.Adafactor(params, lr=config.lr, weight_decay=config.weight_decay)
    if config.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as err:
            raise ImportError("optimizer='adamw8bit' needs bitsandbytes (pip install bitsandbytes, CUDA only); "
                              "use 'adafactor' for a low-memory optimizer without it") from err
        return bnb.optim.AdamW8bit(params, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay)
    return torch.optim.AdamW(params, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay)


@dataclass(frozen=True)
class LoopConfig:
    """Optimisation settings of one training stage."""

    steps: int  # optimizer steps in total (a resumed run continues up to this)
    lr: float = 1e-3  # peak learning rate
    weight_decay: float = 0.0  # AdamW weight decay
    betas: tuple[float, float] = (0.9, 0.99)  # AdamW betas
    warmup_steps: int = 0  # linear warm-up from 0 to lr
    min_lr_ratio: float = 0.1  # the cosine decays to lr * min_lr_ratio
    grad_clip: float | None = 1.0  # max gradient norm; None disables clipping
    checkpoint_every: int = 200  # save_state every this many steps (and at the end)
    log_every: int = 10  # loss-log rows every this many steps
    gradient_accumulation_steps: int = 1  # shards per process summed into one optimizer step (accelerate's
    # accumulate); the global batch is num_processes * gradient_accumulation_steps * batch_size
    mixed_precision: str = "no"  # "no", "fp16" or "bf16" (accelerate's autocast)
    seed: int = 0  # seeds torch before the model's first step
    optimizer: str = "adamw"  # one of OPTIMIZERS: "adamw", "adafactor" (factored second moments, low
    # memory; torch.optim.Adafactor) or "adamw8bit" (8-bit states; needs bitsandbytes and a GPU)

    def __post_init__(self) -> None:
        check_int("steps", self.steps, high=MAX_STEPS)
        check_float("lr", self.lr, low=0, low_open=True, high=MAX_LR)
        check_float("weight_decay", self.weight_decay, low=0)
        if not (isinstance(self.betas, (tuple, list)) and len(self.betas) == 2):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        for i, beta in enumerate(self.betas):
            check_float(f"betas[{i}]", beta, low=0, high=1, high_open=True)
        check_int("warmup_steps", self.warmup_steps, low=0, high=self.steps)
        check_float("min_lr_ratio", self.min_lr_ratio, low=0, high=1)
        if self.grad_clip is not None:
            check_float("grad_clip", self.grad_clip, low=0, low_open=True)
        check_int("checkpoint_every", self.checkpoint_every, high=MAX_STEPS)
        check_int("log_every", self.log_every, high=MAX_STEPS)
        check_int("gradient_accumulation_steps", self.gradient_accumulation_steps, high=MAX_ACCUMULATION)
        check_int("seed", self.seed, low=0, high=MAX_SEED)
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ValueError(f"mixed_precision must be 'no', 'fp16' or 'bf16', got {self.mixed_precision!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {list(OPTIMIZERS)}, got {self.optimizer!r}")


def cosine_with_warmup(step: int, *, total: int, warmup: int, min_ratio: float) -> float:
    """Learning-rate multiplier: linear warm-up to 1, then cosine down to ``min_ratio``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class Shard:
    """The part of one optimizer step's global batch that a ``get_batch(step, shard)`` call builds.

    A step's global batch has ``parts = world_size * accumulation`` shards; this one is number
    ``part = micro * world_size + rank``. One process (``parts == 1``) gets part 0, whose indices and
    seed are those of the whole batch, so single-process runs see the batches they always saw.
    """

    rank: int = 0  # this process (accelerate's process_index), 0..world_size-1
    world_size: int = 1  # processes training together
    micro: int = 0  # micro-step within the optimizer step, 0..accumulation-1
    accumulation: int = 1  # gradient_accumulation_steps

    def __post_init__(self) -> None:
        check_int("world_size", self.world_size)
        check_int("accumulation", self.accumulation, high=MAX_ACCUMULATION)
        check_int("rank", self.rank, low=0, high=self.world_size - 1)
        check_int("micro", self.micro, low=0, high=self.accumulation - 1)

    @property
    def part(self) -> int:
        """This shard's position in the step's global batch."""
        return self.micro * self.world_size + self.rank

    @property
    def parts(self) -> int:
        """Shards per optimizer step."""
        return self.world_size * self.accumulation

    def indices(self, step: int, n: int, batch_size: int, seed: int = 0) -> torch.Tensor:
        """This shard's ``batch_size`` indices (int64) into a dataset of ``n`` items: its slice of the
        epoch-wise shuffled global batch :func:`batch_indices` ``(step, n, parts * batch_size, seed)``."""
        full = batch_indices(step, n, batch_size * self.parts, seed)  # (parts * batch_size,)
        return full[self.part * batch_size:(self.part + 1) * batch_size]

    def seed(self, base: int, step: int) -> int:
        """A 63-bit seed for this shard's random choices at ``step`` (part 0: ``base * 1_000_003 + step``)."""
        # the part's offset is odd: torch's CPU generator keeps only the seed's low 32 bits
        return (base * 1_000_003 + step + self.part * 1_000_000_007) % 2**63

    def generator(self, base: int, step: int) -> torch.Generator:
        """A CPU ``torch.Generator`` seeded with :meth:`seed` (never the global one)."""
        return torch.Generator().manual_seed(self.seed(base, step))


def check_mixed_precision(mixed_precision: str) -> None:
    """Refuse a ``mixed_precision`` that this process cannot use any more.

    accelerate keeps one ``AcceleratorState`` per process, fixed by the first ``Accelerator``; a
    later one with another ``mixed_precision`` fails deep inside accelerate. Resetting that shared state
    would break every Accelerator the caller still holds, so training refuses early instead, before
    any data is read (run each precision in its own process, or keep the first one).

    Raises:
        ValueError: the process already runs accelerate with another ``mixed_precision``.
    """
    from accelerate.state import AcceleratorState, is_initialized

    if is_initialized():
        current = AcceleratorState().mixed_precision
        if current != mixed_precision:
            raise ValueError(f"mixed_precision={mixed_precision!r} asked, but this process already runs accelerate "
                             f"with mixed_precision={current!r} (accelerate fixes it once per process); train with "
                             f"mixed_precision={current!r} or start a new Python process")


def make_accelerator(config: "LoopConfig", *, find_unused_parameters: bool = False) -> Any:
    """The ``accelerate.Accelerator`` for ``config`` (precision, gradient accumulation; CPU without CUDA),
    after :func:`check_mixed_precision`. ``find_unused_parameters``: DDP tolerates parameters that some
    steps do not use (the VQGAN's codebook during its autoencoder warm-up)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    check_mixed_precision(config.mixed_precision)
    return Accelerator(mixed_precision=config.mixed_precision, cpu=not torch.cuda.is_available(),
                       gradient_accumulation_steps=config.gradient_accumulation_steps,
                       kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=find_unused_parameters)])


@contextlib.contextmanager
def keep_global_rng() -> Iterator[None]:
    """Put Python's, numpy's and torch's global generators (CPU and every CUDA device) back as they were on
    the way out: training seeds them (accelerate's ``set_seed``, for reproducible dropout), and the
    caller's own random streams must not change because a model was trained."""
    import numpy as np

    python_state, numpy_state, cpu_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
        torch.set_rng_state(cpu_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)


def _keeps_global_rng(function):
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        with keep_global_rng():
            return function(*args, **kwargs)

    return wrapper


@_keeps_global_rng
def run_training(
    name: str,
    model: nn.Module,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    get_batch: Callable[[int], Any],
    config: LoopConfig,
    out_dir: str | Path,
    *,
    parameters: list[nn.Parameter] | None = None,
    progress: bool = True,
    accelerator: Any = None,
    on_checkpoint: Callable[[nn.Module, int], None] | None = None,
    find_unused_parameters: bool = False,
) -> tuple[nn.Module, list[float]]:
    """Train ``model`` to ``config.steps`` steps, resuming from the newest complete checkpoint in
    ``out_dir`` (see :mod:`rudalle_pipe.train.checkpoints` for the crash-proof layout).

    Args:
        name: stage name for the progress bar and logs.
        loss_fn: ``loss_fn(model, batch) -> scalar loss``.
        get_batch: ``get_batch(step, shard) -> batch``: this process's shard (a :class:`Shard`) of the
            global batch of optimizer step ``step``; ``batch_size`` is per shard. Use ``shard.indices``
            and ``shard.generator`` so that shards differ and each is a pure function of (step, shard).
            Pass CPU tensors; ``loss_fn`` moves them to the model's device.
        parameters: the parameters to optimise (default: all that require grad).
        accelerator: an ``accelerate.Accelerator`` to reuse (:func:`make_accelerator` builds one otherwise);
            its ``gradient_accumulation_steps`` must be ``config.gradient_accumulation_steps``.
        on_checkpoint: called on the main process as ``on_checkpoint(unwrapped_model, step)`` at
            every checkpoint, after the state is written and before it becomes the current one (e.g.
            to also write the model in the Hugging Face layout); if it fails, the older checkpoint stays.
        find_unused_parameters: see :func:`make_accelerator` (used only when it builds the accelerator).

    Returns:
        The unwrapped model and the losses of the steps run in this call (each the mean over the step's
        shards on every process, identical on every process). The caller's global random
        generators are as they were before the call (see :func:`keep_global_rng`).

    Raises:
        NotImplementedError: the accelerator shards the model (FSDP, DeepSpeed).
        ValueError: ``out_dir/loss_log.csv`` was not written by this package (it is left unchanged); the
            accelerator's accumulation or this process's accelerate ``mixed_precision`` differs from ``config``.
        FileExistsError: ``out_dir/checkpoint`` is a folder this package did not write.
    """
    from accelerate.utils import set_seed

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    accelerator = accelerator or make_accelerator(config, find_unused_parameters=find_unused_parameters)
    accumulation = config.gradient_accumulation_steps
    if accelerator.gradient_accumulation_steps != accumulation:
        raise ValueError(f"{name}: the accelerator accumulates {accelerator.gradient_accumulation_steps} steps but "
                         f"gradient_accumulation_steps={accumulation}; build it with make_accelerator(config)")
    kind = str(getattr(accelerator.distributed_type, "value", accelerator.distributed_type))
    if kind in ("FSDP", "DEEPSPEED"):
        raise NotImplementedError(
            f"{name}: accelerate runs {kind} here, but run_training writes its exports and returns the model from "
            "the main process's unwrapped module, which holds only a shard under FSDP or DeepSpeed ZeRO; data "
            "parallel training (accelerate launch --multi_gpu) is supported: see README, 'Many prompts, many GPUs'")
    if accelerator.is_main_process:
        checkpoints.check_state_dir(out_dir)
    accelerator.wait_for_everyone()
    set_seed(config.seed, device_specific=True)  # dropout: seed + rank, so rank 0 keeps the one-process stream
    params = parameters if parameters is not None else [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cosine_with_warmup(
        s, total=config.steps, warmup=config.warmup_steps, min_ratio=config.min_lr_ratio))
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    # the loop steps the schedule once per optimizer step itself (accelerate would otherwise advance the
    # prepared scheduler num_processes times per step under `accelerate launch`)
    scheduler.step_with_optimizer = False

    start = checkpoints.load_checkpoint(accelerator, out_dir, name)
    if start > config.steps:
        raise ValueError(f"{name}: the checkpoint in {out_dir} is at step {start}, past steps={config.steps}")
    if start:
        logger.info("%s: resuming from step %d of %d", name, start, config.steps)
    rank, world = accelerator.process_index, accelerator.num_processes
    if world > 1:
        logger.info("%s: data-parallel on %d processes; global batch = %d shards of batch_size", name, world,
                    world * accumulation)
    main = accelerator.is_main_process
    log_path = checkpoints.prepare_log(out_dir, start) if main else None  # drops rows after ``start``
    accelerator.wait_for_everyone()
    losses: list[float] = []
    model.train()
    accelerator.step = 0  # accelerate's micro-step counter: every optimizer step below is `accumulation` of them
    bar = tqdm(total=config.steps, initial=start, desc=name, disable=not progress or not main)
    t0 = time.perf_counter()
    with open(log_path, "a", newline="") if main else contextlib.nullcontext() as log_file:
        for step in range(start, config.steps):
            total = None
            for micro in range(accumulation):  # 1. this process's shards of the step's global batch
                batch = get_batch(step, Shard(rank, world, micro, accumulation))
                with accelerator.accumulate(model):  # 2. gradients sync (and the optimizer steps) on the last
                    with accelerator.autocast():
                        loss = loss_fn(model, batch)
                    accelerator.backward(loss)  # scaled by 1 / accumulation; DDP averages over processes
                    if accelerator.sync_gradients and config.grad_clip is not None:
                        accelerator.clip_grad_norm_(params, config.grad_clip)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                total = loss.detach().float() if total is None else total + loss.detach().float()
            assert accelerator.sync_gradients, "accumulation out of step with accelerate's counter"
            scheduler.step()  # 3. one schedule step per optimizer step
            value = float(accelerator.reduce(total / accumulation, reduction="mean"))  # 4. mean over all shards
            if not math.isfinite(value):
                raise FloatingPointError(f"{name}: loss became {value} at step {step}; lower lr or enable grad_clip")
            losses.append(value)
            bar.update(1)
            bar.set_postfix(loss=f"{value:.4f}")
            done = step + 1
            if main and (done % config.log_every == 0 or done == config.steps):
                checkpoints.write_log_row(log_file, [done, f"{value:.6f}", f"{scheduler.get_last_lr()[0]:.3e}",
                                                     f"{time.perf_counter() - t0:.1f}"])
            if done % config.checkpoint_every == 0 or done == config.steps:
                export = None
                if on_checkpoint is not None:
                    export = functools.partial(on_checkpoint, accelerator.unwrap_model(model), done)
                checkpoints.save_checkpoint(accelerator, out_dir, done, {"config": asdict(config)}, export)
    bar.close()
    model.eval()
    return accelerator.unwrap_model(model), losses


def batch_indices(step: int, n: int, batch_size: int, seed: int = 0) -> torch.Tensor:
    """Indices (batch_size,) int64 into a dataset of ``n`` items for ``step``: epoch-wise shuffles,
    a pure function of ``(step, n, batch_size, seed)`` so that a resumed run sees the same batches."""
    start = step * batch_size
    parts, taken = [], 0
    while taken < batch_size:
        epoch, offset = divmod(start + taken, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        chunk = perm[offset:offset + batch_size - taken]
        parts.append(chunk)
        taken += len(chunk)
    return torch.cat(parts)


def is_main_process() -> bool:
    """True on the process that writes final files (always True without ``accelerate launch``)."""
    from accelerate import PartialState

    # the same device choice as run_training's Accelerator: the first PartialState fixes the process
    # group for the whole program, and one made without cpu=True on a CPU-only machine is not distributed
    return PartialState(cpu=not torch.cuda.is_available()).is_main_process


def wait_for_everyone() -> None:
    """A barrier of every process under ``accelerate launch`` / ``torchrun`` (returns at once otherwise), so
    that files the main process writes exist for all of them afterwards."""
    from accelerate import PartialState

    PartialState(cpu=not torch.cuda.is_available()).wait_for_everyone()
