"""The CPU decoding path (rudalle_pipe.backend): numpy products equal torch's, the few-row path is taken
for large weights, and torch's thread count is restored."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from rudalle_pipe import backend

CPU_FP32 = SimpleNamespace(device=torch.device("cpu"), dtype=torch.float32)  # what cpu_decoding reads of a model


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 16])
def test_linear_matches_torch_and_takes_the_few_row_path_for_large_weights(rows, monkeypatch):
    calls = []
    original = backend._few_rows
    monkeypatch.setattr(backend, "_few_rows", lambda w, x: calls.append(x.shape[0]) or original(w, x))
    torch.manual_seed(rows)
    out = backend.BLOCK_BYTES // (1024 * 4) * 3 + 7  # three blocks and a ragged one
    weight, bias = torch.randn(out, 1024), torch.randn(out)
    assert weight.numel() >= backend._PAIR_MIN_WEIGHT  # a ragged last block too
    x = torch.randn(rows, 1, 1024)
    with torch.inference_mode(), backend.cpu_decoding(CPU_FP32, rows):
        got = backend.linear(x, weight, bias)
    want = torch.nn.functional.linear(x.double(), weight.double(), bias.double())
    assert got.shape == (rows, 1, weight.shape[0]) and got.dtype == torch.float32
    assert torch.allclose(got.double(), want, rtol=0, atol=1e-3)
    assert calls == ([rows] if 2 <= rows <= backend.PAIR_ROWS else [])
    with torch.enable_grad(), backend.cpu_decoding(CPU_FP32, rows):  # training: plain torch, with autograd
        w = weight.clone().requires_grad_()
        backend.linear(x, w, bias).sum().backward()
    assert w.grad is not None and calls == ([rows] if 2 <= rows <= backend.PAIR_ROWS else [])


def test_small_weights_and_wide_batches_use_one_product(monkeypatch):
    monkeypatch.setattr(backend, "_few_rows", lambda w, x: pytest.fail("blocked path for a small weight"))
    with torch.inference_mode(), backend.cpu_decoding(CPU_FP32, 2):
        x, weight = torch.randn(2, 64), torch.randn(32, 64)
        assert torch.allclose(backend.linear(x, weight), x @ weight.T, atol=1e-5)


def test_decoding_threads_restores_the_thread_count():
    class Model:
        device, dtype = torch.device("cpu"), torch.float32

    before = torch.get_num_threads()
    with pytest.raises(RuntimeError):
        with backend.decoding_threads(Model(), 2):
            assert torch.get_num_threads() == 1
            raise RuntimeError("stop")
    assert torch.get_num_threads() == before
    with backend.decoding_threads(Model(), None):  # None: nothing changes
        assert torch.get_num_threads() == before


def test_the_backend_is_selected_only_inside_cpu_decoding():
    cpu, fp32 = torch.device("cpu"), torch.float32
    assert not backend.uses_numpy_blas(cpu, fp32, 1)  # a plain forward is the model alone
    with backend.cpu_decoding(CPU_FP32, 1):
        assert backend.uses_numpy_blas(cpu, fp32, 1) and not backend.uses_numpy_blas(cpu, torch.bfloat16, 1)
    assert not backend.uses_numpy_blas(cpu, fp32, 1)
    with backend.cpu_decoding(CPU_FP32, backend.SMALL_ROWS + 1):  # too many rows: nothing is selected
        assert not backend.uses_numpy_blas(cpu, fp32, 1)
    quantized = SimpleNamespace(device=cpu, dtype=fp32, quantization="int8")
    before = torch.get_num_threads()
    with backend.cpu_decoding(quantized, 1):  # int8 products run in torch: its threads stay
        assert torch.get_num_threads() == before and backend.uses_numpy_blas(cpu, fp32, 1)


def _blas_threads_now() -> set[int]:
    from threadpoolctl import threadpool_info

    return {lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"}


@pytest.mark.parametrize("width,int8", [(64, False), (1100, False), (64, True), (2200, True)])
def test_small_models_decode_on_one_blas_thread(width, int8):
    """Largest linear weight 16 KB (one thread) or 4.8 MB (unchanged); int8 weights count their own
    bytes: 4 KB (one thread) or 4.8 MB (unchanged, as for a quantized Malevich)."""
    from rudalle_pipe.quantize import Int8Linear

    model = torch.nn.Sequential(torch.nn.Linear(width, width))
    if int8:
        model[0] = Int8Linear(model[0])
    model.device, model.dtype = torch.device("cpu"), torch.float32
    before = _blas_threads_now()
    with backend.cpu_decoding(model, 1):
        inside = _blas_threads_now()
    assert _blas_threads_now() == before
    if width * width * (1 if int8 else 4) < backend.SINGLE_THREAD_BYTES:
        assert inside == {1}
    else:
        assert inside == before


@pytest.mark.parametrize("threshold", [None, 0])
def test_small_models_load_on_one_torch_thread(threshold, monkeypatch):
    """The weights of a model whose largest tensor is under SINGLE_THREAD_BYTES are cast and checked on one
    torch thread (threshold 0: every model is large, the thread count stays); the count is restored after."""
    from rudalle_pipe import hub

    if threshold is not None:
        monkeypatch.setattr(backend, "SINGLE_THREAD_BYTES", threshold)
    seen = []
    real = hub.check_finite
    monkeypatch.setattr(hub, "check_finite", lambda *a, **k: (seen.append(torch.get_num_threads()), real(*a, **k)))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.device("meta"):
            module = torch.nn.Linear(8, 4)
        hub.load_state_dict_lazily(module, {"weight": torch.randn(4, 8), "bias": torch.randn(4)}, what="t",
                                   dtype=torch.float16)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert seen == ([1, 1] if threshold is None else [2, 2])
    assert module.weight.dtype == torch.float16 and module.weight.device.type == "cpu"


CPU_BF16 = SimpleNamespace(device=torch.device("cpu"), dtype=torch.bfloat16)
needs_packing = pytest.mark.skipif(not backend._can_pack(), reason="this torch or CPU has no oneDNN bf16 products")


@needs_packing
@pytest.mark.parametrize("rows", [2, 3, 8])
def test_bf16_products_inside_cpu_decoding_use_packed_weights_made_once(rows):
    torch.manual_seed(rows)
    head, bias = torch.randn(96, 256).bfloat16(), torch.randn(96).bfloat16()
    x = torch.randn(rows, 1, 256).bfloat16()
    want = torch.nn.functional.linear(x.double(), head[32:].double(), bias[32:].double())
    with torch.inference_mode(), backend.cpu_decoding(CPU_BF16, rows):
        packs = backend._PACKED.get()
        got = backend.linear(x, head[32:], bias[32:])  # a row slice, as the image part of the head is
        (entry,) = packs.weights.values()
        again = backend.linear(x, head[32:], bias[32:])
        assert list(packs.weights.values()) == [entry]  # packed once, found again
        backend.linear(x, head[:32])
        assert len(packs.weights) == 2 and packs.rows == rows  # another weight: another copy
        assert entry[1].is_mkldnn and entry[0].data_ptr() == head[32:].data_ptr()
    assert backend._PACKED.get() is None  # the copies go with the block
    assert got.shape == (rows, 1, 64) and got.dtype == torch.bfloat16 and torch.equal(got, again)
    assert (got.double() - want).abs().max() <= 2e-2 * want.abs().max()


@needs_packing
def test_packing_is_chosen_only_for_bf16_decoding_without_autograd():
    for model, rows, packed in ((CPU_FP32, 2, True), (CPU_BF16, None, True), (CPU_BF16, 1, True),
                                (CPU_BF16, backend.SMALL_ROWS + 1, True), (CPU_BF16, 2, False),
                                (SimpleNamespace(device=torch.device("meta"), dtype=torch.bfloat16), 2, True)):
        with backend.cpu_decoding(model, rows, packed=packed):
            assert backend._PACKED.get() is None, (model, rows, packed)
    x, weight = torch.randn(2, 64).bfloat16(), torch.randn(32, 64).bfloat16()
    with backend.cpu_decoding(CPU_BF16, 2):
        w = weight.clone().requires_grad_()
        backend.linear(x, w).sum().backward()  # training: torch's product, with autograd
        assert w.grad is not None and len(backend._PACKED.get().weights) == 0
        with torch.inference_mode():
            assert torch.equal(backend.linear(x.float(), weight.float()), x.float() @ weight.float().T)
            assert len(backend._PACKED.get().weights) == 0  # fp32 products in a bf16 block are torch's


@pytest.mark.slow
@needs_packing
def test_bf16_greedy_codes_with_packed_weights_agree_with_torchs_products(monkeypatch):
    from rudalle_pipe import generate_images
    from rudalle_pipe.pipeline import load_pipeline

    pipe = load_pipeline("demo", clip=False, upscaler=False, dtype=torch.bfloat16)
    prompts = ["красный круг", "синий квадрат", "зелёный треугольник"]
    args = dict(top_k=1, top_p=1.0, num_images=2, seed=0, progress=False)  # 6 rows in one batch: packed
    packed = generate_images(prompts, pipe.tokenizer, pipe.dalle, pipe.vae, **args).codes
    monkeypatch.setattr(backend, "_can_pack", lambda: False)
    plain = generate_images(prompts, pipe.tokenizer, pipe.dalle, pipe.vae, **args).codes
    assert (packed == plain).float().mean() >= 0.99


def test_a_torch_whose_packed_product_fails_or_differs_keeps_torchs_product(monkeypatch):
    def broken(*args):
        raise RuntimeError("the op's schema changed")

    for replacement in (broken, lambda x, w, b, *rest: torch.zeros(x.shape[0], w.shape[0], dtype=x.dtype)):
        monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", replacement)
        backend._can_pack.cache_clear()
        try:
            assert not backend._can_pack()
            with backend.cpu_decoding(CPU_BF16, 8):
                assert backend._PACKED.get() is None
        finally:
            monkeypatch.undo()
            backend._can_pack.cache_clear()
