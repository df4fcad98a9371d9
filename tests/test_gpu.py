"""Devices and precisions: every check runs on the CPU here and in CI, and again on CUDA where there is one.

The CUDA variants are marked ``gpu`` and skipped without CUDA (``benchmarks/gpu_check.sh`` runs them on a
GPU machine). Bounds, measured on the CPU (fp16/bf16 there too) and stated here once:

- cached (dynamic or static) against full-sequence logits in the same dtype: max |diff| <= ``CACHED_TOL``
  of the largest |logit|;
- fp16/bf16 against fp32, teacher-forced on fp32's greedy sequence of the trained demo: the arg-max code
  agrees at >= ``ARGMAX_AGREE`` of positions and max |diff| <= ``LOWP_TOL`` of the largest |logit|
  (measured on CPU: fp16 100% and 0.05%, bf16 99.0% and 0.45%).
"""
from __future__ import annotations

import pytest
import torch

from rudalle_pipe import generate_images
from rudalle_pipe.pipeline import load_pipeline
from rudalle_pipe.static_decode import StaticDecoder, resolve_decoder
from rudalle_pipe.tokenizer import prepare_text

from tiny import tiny_dalle

HAS_CUDA = torch.cuda.is_available()
CUDA = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")])
DEVICES = ["cpu", CUDA]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
CACHED_TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2}
LOWP_TOL = {torch.float16: 1e-2, torch.bfloat16: 3e-2}
ARGMAX_AGREE = {torch.float16: 0.99, torch.bfloat16: 0.97}
PROMPTS = ["красный круг", "синий квадрат", "зелёный треугольник на белом фоне", "жёлтая звезда",
           "красный квадрат", "синий круг", "зелёная звезда", "жёлтый треугольник"]


def stepwise_logits(dalle, text: torch.Tensor, codes: torch.Tensor, decoder: str) -> torch.Tensor:
    """Image logits ``[B, n, V]`` of every position, fed one code at a time through the cache."""
    cache = dalle.init_cache(text.shape[0])
    first = dalle(text, past_key_values=cache, use_cache=True, image_logits_only=True, last_only=True).logits[:, -1]
    out = [first.float()]
    step = StaticDecoder(dalle, cache) if decoder == "static" else None
    for p in range(codes.shape[1] - 1):
        if step is not None:
            out.append(step(codes[:, p]).float().clone())
        else:
            out.append(dalle(codes[:, p : p + 1], past_key_values=cache, use_cache=True,
                             image_logits_only=True, last_only=True).logits[:, -1].float())
    return torch.stack(out, dim=1)


def full_logits(dalle, text: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """The same logits from one full-sequence forward (no cache)."""
    first = dalle.config.text_offset - 1  # the position whose logits predict image code 0
    return dalle(torch.cat((text, codes), 1), image_logits_only=True).logits[:, first : first + codes.shape[1]].float()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("decoder", ["dynamic", "static"])
@pytest.mark.parametrize("version", ["v3", "v2"])
@torch.inference_mode()
def test_cached_logits_match_full_sequence(device, dtype, decoder, version):
    dalle = tiny_dalle(version).to(device=device, dtype=dtype)
    cfg = dalle.config
    g = torch.Generator().manual_seed(1)
    text = torch.randint(1, cfg.vocab_size - cfg.text_seq_length, (3, cfg.text_seq_length), generator=g)
    text[:, -2:] = 0  # pads
    n = cfg.image_seq_length - (1 if version == "v2" else 0)  # v2: the last code never enters the model
    codes = torch.randint(0, cfg.image_vocab_size, (3, n), generator=g)
    text, codes = text.to(device), codes.to(device)
    want = full_logits(dalle, text, codes)
    got = stepwise_logits(dalle, text, codes, decoder)
    assert got.shape == want.shape == (3, n, cfg.image_vocab_size)
    assert torch.isfinite(got).all()
    err, scale = (got - want).abs().max().item(), want.abs().max().item()
    assert err <= CACHED_TOL[dtype] * scale, f"{decoder} {dtype} on {device}: max|diff| {err:.3g} vs scale {scale:.3g}"


def _small_buckets(monkeypatch, dtype: torch.dtype, seed: int):
    """``(static_decode module, tiny dalle in dtype, text [2, T], codes [2, n])`` with BUCKET = 5, so that the
    static step's span changes many times over one image."""
    import rudalle_pipe.static_decode as static_decode

    monkeypatch.setattr(static_decode, "BUCKET", 5)
    dalle = tiny_dalle().to(dtype)
    cfg = dalle.config
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(1, 200, (2, cfg.text_seq_length), generator=g)
    codes = torch.randint(0, cfg.image_vocab_size, (2, cfg.image_seq_length), generator=g)
    return static_decode, dalle, text, codes


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@torch.inference_mode()
def test_static_step_spans_the_cache_in_buckets(dtype, monkeypatch):
    """Without a graph the static step attends over the filled cache rounded up to BUCKET positions:
    with a small BUCKET the spans change many times over one image, and the logits still match."""
    static_decode, dalle, text, codes = _small_buckets(monkeypatch, dtype, seed=4)
    cfg = dalle.config
    spans = []
    original = static_decode.StaticDecoder._span
    monkeypatch.setattr(static_decode.StaticDecoder, "_span", lambda self: spans.append(original(self)) or spans[-1])
    want = full_logits(dalle, text, codes)
    got = stepwise_logits(dalle, text, codes, "static")
    assert sorted(set(spans)) == [10, 15, 20, cfg.total_seq_length]  # 9 filled -> 10, ..., then capped at S = 24
    assert (got - want).abs().max() <= CACHED_TOL[dtype] * want.abs().max()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@torch.inference_mode()
def test_static_step_on_cpu_attends_over_contiguous_copies_that_follow_the_cache(dtype, monkeypatch):
    """Without a graph, a low-precision step attends over contiguous copies of the span (PyTorch's CPU matmul
    would copy the strided slice for every product). Each new key/value reaches the cache too, and copies that
    no longer match the cache (a plain cached step wrote into it in between, or its rows were reordered) are
    made again."""
    static_decode, dalle, text, codes = _small_buckets(monkeypatch, dtype, seed=5)
    cfg = dalle.config
    want = full_logits(dalle, text, codes)
    cache = dalle.init_cache(2)
    got = [dalle(text, past_key_values=cache, use_cache=True, image_logits_only=True, last_only=True).logits[:, -1]]
    step, copied, order = StaticDecoder(dalle, cache), 0, torch.tensor([0, 1])
    for p in range(codes.shape[1] - 1):
        if p == 10:  # the rows swap places mid-bucket, after a static step: only the cache tensors tell
            order = torch.tensor([1, 0])
            cache.reorder(order)
        if p % 3 == 2:  # the plain cached step writes this position itself
            got.append(dalle(codes[order, p : p + 1], past_key_values=cache, use_cache=True, image_logits_only=True,
                             last_only=True).logits[order, -1])
            continue
        got.append(step(codes[order, p])[order].clone())
        if static_decode.bucket_span(cache.length, cfg.total_seq_length) < cfg.total_seq_length:
            copied += 1  # a span short of S: the step read copies, and they hold what the cache holds
            assert step._work and all(k.is_contiguous() for k, _ in step._work)
            n = cache.length
            for (k, v), cache_k, cache_v in zip(step._work, cache.keys, cache.values):
                assert torch.equal(k[:, :, :n], cache_k[:, :, :n]) and torch.equal(v[:, :, :n], cache_v[:, :, :n])
    got = torch.stack([t.float() for t in got], dim=1)
    assert copied >= 6 and (got - want).abs().max() <= CACHED_TOL[dtype] * want.abs().max()


@pytest.fixture(scope="module")
def demo_greedy():
    """fp32 CPU greedy codes of the trained demo for PROMPTS, with their text ids."""
    pipe = load_pipeline("demo", clip=False, upscaler=False)
    out = generate_images(PROMPTS, pipe.tokenizer, pipe.dalle, pipe.vae, top_k=1, top_p=1.0, num_images=1,
                          seed=0, progress=False)
    T = pipe.dalle.config.text_seq_length
    text = torch.stack([pipe.tokenizer.encode_text(prepare_text(t), T) for t in PROMPTS])
    with torch.inference_mode():
        logits = full_logits(pipe.dalle, text, out.codes)
    return text, out.codes, logits


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@torch.inference_mode()
def test_lower_precision_agrees_with_fp32(device, dtype, demo_greedy):
    text, codes, want = demo_greedy
    dalle = load_pipeline("demo", clip=False, upscaler=False, device=device, dtype=dtype).dalle
    got = full_logits(dalle, text.to(device), codes.to(device)).cpu()
    agree = (got.argmax(-1) == want.argmax(-1)).float().mean().item()
    err, scale = (got - want).abs().max().item(), want.abs().max().item()
    assert agree >= ARGMAX_AGREE[dtype], f"{dtype} on {device}: arg-max agrees at {agree:.1%} of positions"
    assert err <= LOWP_TOL[dtype] * scale, f"{dtype} on {device}: max|diff| {err:.3g} vs scale {scale:.3g}"


@pytest.mark.parametrize("device", DEVICES)
def test_generator_on_the_models_device(device):
    pipe = load_pipeline("demo", clip=False, upscaler=False, device=device)
    runs = [generate_images("красный круг", pipe.tokenizer, pipe.dalle, pipe.vae, top_k=32, top_p=0.99,
                            num_images=3, generator=torch.Generator(device=device).manual_seed(7), progress=False)
            for _ in range(2)]
    assert runs[0].seeds == runs[1].seeds and len(set(runs[0].seeds)) == 3
    assert torch.equal(runs[0].codes, runs[1].codes)
    with pytest.raises(TypeError, match="torch.Generator"):
        generate_images("красный круг", pipe.tokenizer, pipe.dalle, pipe.vae, top_k=32, top_p=0.99,
                        num_images=1, generator=7, progress=False)


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("decoder", ["dynamic", "static"])
def test_same_seed_same_image(device, decoder):
    """The same seed and batch size give the same codes on every device. Across batch sizes the CPU
    is exact; CUDA may round differently per shape, so there the bound is on positions that agree."""
    pipe = load_pipeline("demo", clip=False, upscaler=False, device=device)
    args = dict(top_k=32, top_p=0.99, num_images=4, seed=11, progress=False, decoder=decoder, guidance_scale=2.0)
    a = generate_images(PROMPTS[:2], pipe.tokenizer, pipe.dalle, pipe.vae, batch_size=8, **args).codes
    b = generate_images(PROMPTS[:2], pipe.tokenizer, pipe.dalle, pipe.vae, batch_size=8, **args).codes
    c = generate_images(PROMPTS[:2], pipe.tokenizer, pipe.dalle, pipe.vae, batch_size=3, **args).codes
    assert torch.equal(a, b)
    if device == "cpu":
        assert torch.equal(a, c)
    else:
        assert (a == c).float().mean().item() >= 0.9


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_static_and_dynamic_decoders_draw_alike(device):
    pipe = load_pipeline("demo", clip=False, upscaler=False, device=device)
    args = dict(top_k=32, top_p=0.99, num_images=4, seed=3, progress=False)
    dyn = generate_images(PROMPTS[:4], pipe.tokenizer, pipe.dalle, pipe.vae, decoder="dynamic", **args)
    sta = generate_images(PROMPTS[:4], pipe.tokenizer, pipe.dalle, pipe.vae, decoder="static", **args)
    agree = (dyn.codes == sta.codes).float().mean().item()
    assert agree >= (1.0 if device == "cpu" else 0.9), f"static vs dynamic codes agree at {agree:.1%}"
    if device == "cpu":  # same codes, so the same perplexities up to float rounding
        assert torch.allclose(torch.tensor(dyn.perplexities), torch.tensor(sta.perplexities), rtol=1e-4)


def test_decoder_choice_is_checked():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_decoder("auto", cpu, True) == "dynamic"
    assert resolve_decoder("auto", cuda, True) == "static"
    assert resolve_decoder("auto", cuda, False) == "dynamic"
    assert resolve_decoder("auto", cpu, True, torch.bfloat16) == "static"
    assert resolve_decoder("auto", cpu, False, torch.bfloat16) == "dynamic"
    with pytest.raises(ValueError, match="'auto', 'dynamic', 'static'"):
        resolve_decoder("graph", cpu, True)
    with pytest.raises(ValueError, match="use_cache=True"):
        resolve_decoder("static", cpu, False)
    with pytest.raises(ValueError, match="CUDA"):
        StaticDecoder(tiny_dalle(), tiny_dalle().init_cache(1), graph=True)


def test_race_draw_is_multinomial():
    """The CUDA sampler's exponential race picks what ``torch.multinomial`` picks from the same
    generator state (checked on CPU, where both run), and so follows the distribution."""
    from rudalle_pipe.sampling import race_draw

    probs = torch.rand(5, 300).softmax(-1)
    for seed in range(20):
        gens = [torch.Generator().manual_seed(seed * 10 + i) for i in range(5)]
        want = torch.cat([torch.multinomial(probs[i], 1, generator=torch.Generator().manual_seed(seed * 10 + i))
                          for i in range(5)])
        assert torch.equal(race_draw(probs, gens), want)


@pytest.mark.parametrize("device", ["meta", "cpu", CUDA])
def test_masks_follow_the_default_device(device):
    """Built under ``with torch.device(...)``, the masks sit on that device (the loaders' meta build keeps
    them on the CPU, since meta tensors hold no values)."""
    from rudalle_pipe import DalleConfig, DalleModel

    with torch.device(device):
        model = DalleModel(DalleConfig(num_layers=1, hidden_size=32, num_attention_heads=4, vocab_size=300,
                                       image_vocab_size=50, text_seq_length=8, image_tokens_per_dim=4))
    want = "cpu" if device == "meta" else device
    assert {model.get_mask(k).device.type for k in ("row", "col", "conv")} == {want}
    if device != "meta":
        with torch.inference_mode():
            assert model.eval()(torch.ones(2, 12, dtype=torch.long, device=device)).logits.shape == (2, 12, 350)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_demo_chain_on_cuda():
    from rudalle_pipe import cherry_pick_by_clip, super_resolution

    pipe = load_pipeline("demo", device="cuda", dtype=torch.float16)
    out = generate_images("красный круг", pipe.tokenizer, pipe.dalle, pipe.vae, top_k=32, top_p=0.99,
                          num_images=4, seed=0, progress=False)
    ranked = cherry_pick_by_clip(out.images, "красный круг", pipe.clip, top_n=2)
    big = super_resolution(ranked.images, pipe.upscaler)
    assert len(big) == 2 and big[0].size[0] == 4 * out.images[0].size[0]
