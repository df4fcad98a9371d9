"""The CPU decode backend, all in one place: which products go through numpy's BLAS, the kernels used for
them, torch's thread count while they run, the int8 weight kernel, and oneDNN's packed bf16 weights.

A decoding step is a matrix-vector product per layer, bound by how fast the weights stream from memory.
PyTorch's MKL matrix-vector kernel reaches well under the memory bandwidth on some CPUs (measured 15 GB/s
against numpy's OpenBLAS at 32 GB/s on a 38 GB/s AMD EPYC; see ``benchmarks/generation.py``). The
generation loop therefore selects this backend explicitly with :func:`cpu_decoding`; inside it, fp32
products of few rows on the CPU (no autograd) go through numpy in :func:`linear` and :func:`matmul`, and
the results agree with torch to float rounding. In bf16, :func:`linear` instead multiplies by a copy of
each weight that oneDNN has reordered once into its blocked layout (:func:`_packed_linear`): torch's own
bf16 product handles the plain layout at every call, and at Malevich shape a batch-8 step took 115-154 ms
that way against 80-108 ms packed (``benchmarks/scale.py --formats bf16 bf16-unpacked``). At batch 1 the two
were within noise of each other, while packing 2.45 GB of weights takes a few seconds, so one row
(``PACK_MIN_ROWS``) keeps torch's product. The copies live for one :func:`cpu_decoding` block: while a
batch is generated, they cost the weights' memory again. Outside that block (training, scoring, a plain
forward) both functions are exactly torch's ``F.linear`` and ``@``, so the model's forward is the model alone.
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from contextvars import ContextVar
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Iterator, Optional

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["SMALL_ROWS", "PAIR_ROWS", "PACK_MIN_ROWS", "BLOCK_BYTES", "uses_numpy_blas", "linear", "matmul",
           "cpu_decoding", "decoding_threads", "small_tensor_threads", "Int8Weight", "quantize_weight"]

SMALL_ROWS = 64  # rows (batch x new positions) up to which decoding uses the numpy path
PAIR_ROWS = 4  # up to this many rows, large weights are read from memory once, block by block (_few_rows)
BLOCK_BYTES = 2 << 20  # weight bytes per block (256 rows at hidden 2048): measured best of 128 KiB-8 MiB blocks
PACK_MIN_ROWS = 2  # bf16 decoding of at least this many rows multiplies by packed weights (batch 1: no gain)
_PAIR_MIN_WEIGHT = 1 << 20  # weights smaller than this (elements) fit in cache anyway: one sgemm


_SELECTED: ContextVar[bool] = ContextVar("rudalle_pipe_cpu_decoding", default=False)  # set by cpu_decoding


@dataclass
class _Packs:
    """The packed bf16 weights of one :func:`cpu_decoding` block, packed for ``rows`` rows: ``weights`` maps a
    weight's memory (pointer, shape, strides) to ``(the weight, its packed copy)``."""

    rows: int
    weights: dict = field(default_factory=dict)


_PACKED: ContextVar[Optional[_Packs]] = ContextVar("rudalle_pipe_packed", default=None)  # set by cpu_decoding


def _eligible(device: torch.device, dtype: torch.dtype, rows: int) -> bool:
    return device.type == "cpu" and dtype == torch.float32 and 0 < rows <= SMALL_ROWS


def uses_numpy_blas(device: torch.device, dtype: torch.dtype, rows: int) -> bool:
    """Whether products of ``rows`` rows go through numpy's BLAS now: inside :func:`cpu_decoding`, on the
    CPU, in fp32, for at most ``SMALL_ROWS`` rows (see :func:`linear`)."""
    return _SELECTED.get() and _eligible(device, dtype, rows)


def _few_rows(weight: np.ndarray, flat: np.ndarray) -> np.ndarray:
    """``flat [r, in] @ weight[out, in].T`` for a few rows, reading each weight once from memory.

    One matrix-vector product (sgemv) per row and per block of about ``BLOCK_BYTES`` of weight rows: the
    second row's product finds the block still in cache. A plain sgemm with 2-4 columns packs the whole
    weight matrix first: a classifier-free-guidance pair (2 rows) at hidden 2048 took 2.69x one row's
    step that way, 1.46x this way (``benchmarks/generation.py --guidance-only`` on a 2-core AMD EPYC)."""
    out = np.empty((flat.shape[0], weight.shape[0]), dtype=np.float32)
    step = max(1, BLOCK_BYTES // (weight.shape[1] * weight.itemsize))
    for start in range(0, weight.shape[0], step):
        block = weight[start:start + step]
        for r in range(flat.shape[0]):
            np.dot(block, flat[r], out=out[r, start:start + step])
    return out


@lru_cache(maxsize=None)
def _can_pack() -> bool:
    """Whether this torch and CPU multiply by packed bf16 weights, and get torch's product: checked once on a
    small product, so that a torch whose private oneDNN ops changed falls back to ``F.linear``."""
    try:
        if not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
            return False
        gen = torch.Generator().manual_seed(0)
        x, weight = (torch.randn(shape, generator=gen).bfloat16() for shape in ((2, 32), (48, 32)))
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, 2)
        got = torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
        return bool(torch.allclose(got.float(), F.linear(x.float(), weight.float()), rtol=0, atol=0.1))
    except (AttributeError, RuntimeError, TypeError, NotImplementedError):
        return False


def _packed_linear(packs: _Packs, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                   rows: int) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for ``rows`` rows of bf16 ``x [..., in]``, through a copy of ``weight`` that
    oneDNN keeps in its blocked layout for ``packs.rows`` rows. The copy is made on the weight's first use
    and kept in ``packs.weights``, keyed by the weight's memory, which the entry holds on to so that the key stays
    unique (a row slice such as the image part of the head is a weight of its own)."""
    key = (weight.data_ptr(), tuple(weight.shape), tuple(weight.stride()))
    entry = packs.weights.get(key)
    if entry is None:
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), packs.rows)
        entry = packs.weights[key] = (weight, packed)
    out = torch.ops.mkldnn._linear_pointwise(x.reshape(rows, x.shape[-1]), entry[1], bias, "none", [], "")
    return out.reshape(*x.shape[:-1], weight.shape[0])


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``; inside :func:`cpu_decoding` (fp32, CPU, no autograd, at most
    ``SMALL_ROWS`` rows) the product goes through numpy's BLAS instead (one row: sgemv; 2-``PAIR_ROWS`` rows with a
    large weight: blocked sgemv, see :func:`_few_rows`; more: sgemm). Inside a bf16 block of
    :func:`cpu_decoding`, bf16 products without autograd go through packed weights (:func:`_packed_linear`).
    An :class:`Int8Weight` (see :func:`rudalle_pipe.quantize_int8`) goes through its int8 kernel."""
    if isinstance(weight, Int8Weight):
        return weight.linear(x, bias)
    rows = x.numel() // x.shape[-1] if x.numel() else 0
    packs = _PACKED.get()
    if packs is not None and 0 < rows <= SMALL_ROWS and x.dtype == weight.dtype == torch.bfloat16 \
            and weight.dim() == 2 and not torch.is_grad_enabled() and x.device.type == "cpu" \
            and (bias is None or bias.dtype == torch.bfloat16):
        return _packed_linear(packs, x, weight, bias, rows)
    if torch.is_grad_enabled() or weight.dtype != x.dtype or not uses_numpy_blas(x.device, x.dtype, rows):
        return F.linear(x, weight, bias)
    flat = x.detach().reshape(rows, x.shape[-1]).numpy()
    w = weight.detach().numpy()
    if 2 <= rows <= PAIR_ROWS and w.size >= _PAIR_MIN_WEIGHT and w.flags.c_contiguous:
        out = torch.from_numpy(_few_rows(w, np.ascontiguousarray(flat)))  # (rows, out_features)
    else:
        out = torch.from_numpy(w @ flat.T).T  # (rows, out_features)
    if bias is not None:
        out = out + bias
    return out.reshape(*x.shape[:-1], weight.shape[0])


_INT8_KERNEL = getattr(torch, "_weight_int8pack_mm", None)  # PyTorch >= 2.3


@dataclass(frozen=True)
class Int8Weight:
    """A quantized ``[out, in]`` weight: ``weight ~= q * scales[:, None]``.

    ``q``: int8 ``[out, in]`` in ``[-127, 127]``; ``scales``: fp32 ``[out]``, > 0. Row slices
    (``w[a:b]``) stay quantized, so code that takes part of an output head works unchanged.
    """

    q: torch.Tensor
    scales: torch.Tensor

    @property
    def shape(self) -> torch.Size:
        return self.q.shape

    def __getitem__(self, rows) -> "Int8Weight":
        return Int8Weight(self.q[rows], self.scales[rows])

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The ``[out, in]`` weight in ``dtype``."""
        return self.q.to(dtype) * self.scales.to(dtype)[:, None]

    def linear(self, x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``x [..., in] @ weight.T + bias`` in ``x``'s dtype, accumulated in floating point."""
        if _INT8_KERNEL is not None and x.device.type == "cpu" and self.q.is_contiguous():
            flat = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
            out = _INT8_KERNEL(flat, self.q, self.scales.to(torch.bfloat16)).to(x.dtype)  # (rows, out)
            out = out.reshape(*x.shape[:-1], self.q.shape[0])
            return out if bias is None else out + bias
        return F.linear(x, self.dequantize(x.dtype), bias)


def quantize_weight(weight: torch.Tensor) -> Int8Weight:
    """Symmetric per-output-channel int8: ``scale = max|w_row| / 127``, ``q = round(w / scale)``."""
    w = weight.detach().float()
    scales = (w.abs().amax(dim=1) / 127.0).clamp_min(torch.finfo(torch.float32).tiny)
    q = torch.round(w / scales[:, None]).clamp_(-127, 127).to(torch.int8).contiguous()
    return Int8Weight(q, scales)


def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` for the attention of a decoding step; through numpy's BLAS on CPU in fp32 without
    autograd, for the same reason as :func:`linear` (the key/value cache is streamed once)."""
    if not _SELECTED.get() or a.device.type != "cpu" or a.dtype != torch.float32 or torch.is_grad_enabled() \
            or b.numel() < 1 << 16:
        return a @ b  # small products: torch's call overhead is lower
    return torch.from_numpy(np.matmul(a.detach().numpy(), b.detach().numpy()))


SINGLE_THREAD_BYTES = 4 << 20  # models whose largest linear weight is smaller decode on one BLAS thread
_CONTROLLER = None  # threadpoolctl's view of the loaded BLAS libraries, built on first use


def _linear_bytes(module) -> int:
    """Bytes of a linear layer's weight: an ``nn.Linear``'s, or the int8 one of a quantized layer."""
    weight = getattr(module, "weight", None)
    if isinstance(weight, Int8Weight):
        return weight.q.numel()
    return weight.numel() * weight.element_size() if isinstance(module, torch.nn.Linear) else 0


def _largest_linear_bytes(model) -> int:
    modules = model.modules() if hasattr(model, "modules") else ()
    return max(map(_linear_bytes, modules), default=0)


def _blas_threads(model):
    """One BLAS thread for a model whose weights fit in cache (as the demo's do), else no change. Splitting
    such small products over two threads gains nothing alone, and when another process holds a core, the
    waiting thread's spin stalls every product: beside one busy process, 16 demo images took 0.67 s on two
    BLAS threads and 0.28 s on one (0.23 s and 0.20 s alone; ``benchmarks/contention.py``, 2-core AMD EPYC;
    with two other jobs on the machine the two-thread run took 17 s)."""
    global _CONTROLLER
    if _largest_linear_bytes(model) >= SINGLE_THREAD_BYTES:
        return nullcontext()
    from threadpoolctl import ThreadpoolController

    _CONTROLLER = _CONTROLLER or ThreadpoolController()
    return _CONTROLLER.limit(limits=1, user_api="blas")


@contextmanager
def cpu_decoding(model, rows: Optional[int], *, packed: bool = True) -> Iterator[None]:
    """Select this backend while decoding ``rows`` sequences of ``model`` (anything with ``.device`` and
    ``.dtype``). In bf16 on a CPU that has bf16 instructions, for ``PACK_MIN_ROWS`` to ``SMALL_ROWS`` rows and
    with ``packed``, :func:`linear` multiplies by packed copies of the weights (see the module's docstring),
    dropped on the way out. In fp32 on a CPU, :func:`linear` and :func:`matmul` take the numpy path, and torch
    runs single-threaded so that its idle OpenMP workers do not spin against BLAS's threads (measured: 48 ms
    vs 16 ms per step for a hidden-2048 model on 2 cores), and a small model's BLAS products run on one
    thread (:func:`_blas_threads`); all of it is undone on the way out. ``rows=None``,
    another device or dtype, or more than ``SMALL_ROWS`` rows select nothing. A quantized model
    (:func:`rudalle_pipe.quantize_int8`) keeps torch's threads: its products run in torch's int8 kernel."""
    if packed and rows is not None and PACK_MIN_ROWS <= rows <= SMALL_ROWS and model.device.type == "cpu" \
            and model.dtype == torch.bfloat16 and _can_pack():
        packing = _PACKED.set(_Packs(rows))
        try:
            yield
        finally:
            _PACKED.reset(packing)
        return
    if rows is None or not _eligible(model.device, model.dtype, rows):
        yield
        return
    selected = _SELECTED.set(True)
    previous = torch.get_num_threads()
    if not getattr(model, "quantization", None):
        torch.set_num_threads(1)
    try:
        with _blas_threads(model):
            yield
    finally:
        torch.set_num_threads(previous)
        _SELECTED.reset(selected)


decoding_threads = cpu_decoding  # its name before the backend was selected explicitly


@contextmanager
def small_tensor_threads(largest_bytes: int) -> Iterator[None]:
    """torch on one thread while working on CPU tensors of at most ``largest_bytes`` each, when that is below
    ``SINGLE_THREAD_BYTES`` (casting and checking the demo's weights as it loads); else no change.

    Such element-wise passes gain nothing from a second thread, and when another process holds a core, the
    waiting OpenMP worker stalls every one: on the 2-core CPU shared with other jobs, loading the demo
    pipeline took 0.85 s on one thread and 3.4 s on two (``benchmarks/contention.py``)."""
    if largest_bytes >= SINGLE_THREAD_BYTES:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
