"""Classifier-free guidance (one doubled batch, one cache) and prompt lists (per-row texts, seeds)."""
import pytest
import torch

import rudalle_pipe.generation as generation
from rudalle_pipe import empty_text_ids, generate_images
from rudalle_pipe.generation import sample_codes, seeds_for
from rudalle_pipe.tokenizer import YTTMTokenizer, prepare_text
from tiny import IMAGE_VOCAB, SIDE, TEXT_LEN, tiny_dalle, tiny_vae

N = SIDE * SIDE
TEXT = torch.tensor([2, 5, 7, 3, 0, 0, 0, 0])
OTHER = torch.tensor([2, 9, 3, 0, 0, 0, 0, 0])
# sample_codes(tiny_dalle(), TEXT, seeds=[11, 12, 13], top_k=20, top_p=0.9, temperature=0.8, batch_size=2)
# as computed by the code on main before guidance existed (commit c8be166)
BEFORE = [[48, 6, 17, 17, 41, 16, 48, 42, 49, 16, 32, 28, 1, 1, 28, 19],
          [49, 15, 28, 35, 28, 44, 33, 25, 49, 42, 1, 32, 28, 32, 13, 11],
          [17, 5, 19, 7, 49, 46, 19, 48, 1, 11, 18, 22, 28, 13, 18, 12]]
BEFORE_PPL = [30.492938995361328, 29.81224250793457, 29.892629623413086]
ARGS = dict(top_k=20, top_p=0.9, temperature=0.8, progress=False)


@pytest.fixture(scope="module")
def model():
    return tiny_dalle()


@pytest.fixture(scope="module")
def pipeline(fixtures_dir):
    return YTTMTokenizer.from_file(fixtures_dir / "tokenizer" / "bpe.model"), tiny_dalle(), tiny_vae()


def rows_seen(model, monkeypatch):
    """Record the batch rows of every forward call and the batch size of every new cache."""
    calls, caches = [], []
    handle = model.register_forward_pre_hook(lambda mod, args: calls.append(args[0].shape[0]))
    real_init = model.init_cache
    monkeypatch.setattr(model, "init_cache", lambda b: caches.append(b) or real_init(b))
    return calls, caches, handle


def reference_greedy(model, text, uncond, scale, forced_mask=None, forced_codes=None):
    """Guided greedy decoding without a cache: full forward of the text and of the unconditional
    text at every step, argmax of u + s (c - u)."""
    V = model.config.vocab_size
    codes = []
    with torch.no_grad():
        for p in range(N):
            if forced_mask is not None and forced_mask[p]:
                codes.append(int(forced_codes[p]))
                continue
            seen = torch.tensor(codes, dtype=torch.long)
            c = model(torch.cat([text, seen])[None]).logits[0, -1, V:]
            u = model(torch.cat([uncond, seen])[None]).logits[0, -1, V:]
            codes.append(int((u + scale * (c - u)).argmax()))
    return torch.tensor(codes)


# ------------------------------------------------------------------------------------ guidance
def test_scale_one_gives_the_codes_of_before_guidance(model):
    codes, ppl = sample_codes(model, TEXT, seeds=[11, 12, 13], batch_size=2, guidance_scale=1.0, **ARGS)
    assert codes.tolist() == BEFORE
    assert ppl.tolist() == pytest.approx(BEFORE_PPL, rel=1e-6)


def test_scale_one_does_not_double_the_batch_and_guidance_does(model, monkeypatch):
    calls, caches, handle = rows_seen(model, monkeypatch)
    try:
        sample_codes(model, TEXT, seeds=[1, 2, 3], batch_size=3, guidance_scale=1.0, **ARGS)
        assert calls == [1] + [3] * (N - 1) and caches == [1]  # one prefill of the one text, its cache copied
        calls.clear(), caches.clear()
        sample_codes(model, TEXT, seeds=[1, 2, 3], batch_size=3, guidance_scale=3.0, **ARGS)
        assert calls == [2] + [6] * (N - 1) and caches == [2]  # both halves in one batch, one cache
        calls.clear(), caches.clear()
        texts = torch.stack([TEXT, OTHER, TEXT])
        sample_codes(model, texts, seeds=[1, 2, 3], batch_size=3, guidance_scale=3.0, **ARGS)
        assert calls == [3] + [6] * (N - 1) and caches == [3]  # two texts and the empty one
        calls.clear(), caches.clear()
        sample_codes(model, TEXT, seeds=[1, 2], batch_size=3, guidance_scale=3.0, uncond_ids=OTHER, use_cache=False,
                     **ARGS)
        assert calls == [4] * N and caches == []  # without a cache every step is the whole sequence of all rows
    finally:
        handle.remove()


@torch.inference_mode()
def test_repeated_texts_are_prefilled_once_with_the_result_of_each_alone(model):
    from rudalle_pipe.sampling import _prefill

    prefix = torch.stack([TEXT, OTHER, TEXT, TEXT])
    logits, cache = _prefill(model, prefix, use_cache=True)
    assert logits.shape == (4, model.config.image_vocab_size) and cache.length == TEXT_LEN
    for row, text in enumerate(prefix):
        alone, own = _prefill(model, text[None], use_cache=True)
        assert torch.allclose(logits[row], alone[0], rtol=0, atol=1e-5)  # products of 2 rows round unlike 1's
        for k, v, k1, v1 in zip(cache.keys, cache.values, own.keys, own.values):
            assert k.shape[0] == 4 and torch.allclose(k[row], k1[0], rtol=0, atol=1e-5)
            assert torch.allclose(v[row], v1[0], rtol=0, atol=1e-5)
    assert torch.equal(logits[0], logits[2]) and torch.equal(logits[0], logits[3])  # one prefill, copied
    assert all(torch.equal(k[0], k[3]) and torch.equal(v[2], v[3]) for k, v in zip(cache.keys, cache.values))


@pytest.mark.parametrize("version", ["v3", "v2"])
@pytest.mark.parametrize("scale", [0.5, 3.0])
def test_guided_greedy_is_argmax_of_the_mix(version, scale):
    model = tiny_dalle(version)
    codes, _ = sample_codes(model, TEXT, seeds=[0, 1], top_k=1, top_p=1.0, guidance_scale=scale, progress=False)
    expected = reference_greedy(model, TEXT, empty_text_ids(TEXT_LEN), scale)
    assert torch.equal(codes[0], expected) and torch.equal(codes[1], expected)
    plain, _ = sample_codes(model, TEXT, seeds=[0], top_k=1, top_p=1.0, progress=False)
    assert not torch.equal(plain[0], expected)  # guidance changed the picture


def test_guided_cache_and_no_cache_agree_and_perplexity_is_conditional(model):
    kwargs = dict(seeds=[3, 4, 5], batch_size=2, guidance_scale=4.0, **ARGS)
    cached, ppl = sample_codes(model, TEXT, use_cache=True, **kwargs)
    full, ppl_full = sample_codes(model, TEXT, use_cache=False, **kwargs)
    assert torch.equal(cached, full) and torch.allclose(ppl, ppl_full, atol=1e-5)
    with torch.no_grad():  # the perplexity is the conditional model's, not the guided mix's
        logits = model(torch.cat([TEXT, cached[0]])[None]).logits[0, TEXT_LEN - 1 : -1, model.config.vocab_size :]
    ce = torch.nn.functional.cross_entropy(logits, cached[0], reduction="none")
    assert ppl[0] == pytest.approx(float(ce.exp().mean()), rel=1e-5)


def test_unconditional_equal_to_the_prompt_is_plain_sampling(model):
    plain, _ = sample_codes(model, TEXT, seeds=[5, 6], **ARGS)
    same, _ = sample_codes(model, TEXT, seeds=[5, 6], guidance_scale=5.0, uncond_ids=TEXT, **ARGS)
    other, _ = sample_codes(model, TEXT, seeds=[5, 6], guidance_scale=5.0, uncond_ids=OTHER, **ARGS)
    assert torch.equal(plain, same)  # u == c: u + s (c - u) == c
    assert not torch.equal(plain, other)


def test_negative_prompt_is_the_unconditional_text(pipeline):
    tokenizer, dalle, vae = pipeline
    out = generate_images("кот", tokenizer, dalle, vae, num_images=2, seed=3, guidance_scale=3.0,
                          negative_prompt="Собака ", **ARGS)
    text = tokenizer.encode_text(prepare_text("кот"), TEXT_LEN)
    negative = tokenizer.encode_text(prepare_text("собака"), TEXT_LEN)
    direct, _ = sample_codes(dalle, text, seeds=[3, 4], guidance_scale=3.0, uncond_ids=negative, **ARGS)
    empty, _ = sample_codes(dalle, text, seeds=[3, 4], guidance_scale=3.0, **ARGS)
    assert torch.equal(out.codes, direct) and not torch.equal(out.codes, empty)


def test_image_prompt_with_guidance_feeds_kept_codes_to_both_rows():
    from rudalle_pipe import ImagePrompt

    model = tiny_dalle()
    mask = torch.zeros(N, dtype=torch.bool)
    mask[:SIDE] = True
    mask[-2] = True
    kept = torch.randint(0, IMAGE_VOCAB, (N,), generator=torch.Generator().manual_seed(1))
    prompt = ImagePrompt.from_codes(kept, mask)
    codes, _ = sample_codes(model, TEXT, seeds=[0], top_k=1, top_p=1.0, guidance_scale=2.5, forced_codes=prompt.codes,
                            forced_mask=prompt.mask, progress=False)
    expected = reference_greedy(model, TEXT, empty_text_ids(TEXT_LEN), 2.5, prompt.mask, prompt.codes)
    assert torch.equal(codes[0], expected) and torch.equal(codes[0, mask], kept[mask])


def test_empty_text_is_all_pads(model):
    empty = empty_text_ids(TEXT_LEN)
    assert empty.dtype == torch.long and empty.tolist() == [0] * TEXT_LEN
    cfg = model.config
    pads = list(range(cfg.vocab_size - TEXT_LEN, cfg.vocab_size))
    assert model._text_ids(empty[None])[0].tolist() == pads  # every position its own pad id, no BOS/EOS
    with pytest.raises(ValueError, match=r"length must be >= 1, got 0"):
        empty_text_ids(0)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(guidance_scale=0.0), ValueError, r"guidance_scale must be a finite number in \(0, 50.0\], got 0.0"),
    (dict(guidance_scale=-2), ValueError, r"guidance_scale must be a finite number in \(0, 50.0\]"),
    (dict(guidance_scale=51), ValueError, r"guidance_scale .*got 51.0"),
    (dict(guidance_scale=float("nan")), ValueError, r"guidance_scale .*got nan"),
    (dict(guidance_scale="3"), TypeError, "guidance_scale must be a finite number, got '3'"),
    (dict(negative_prompt="собака"), ValueError,
     r"negative_prompt 'собака' has no effect without guidance \(guidance_scale 1\): give guidance_scale a value"),
    (dict(negative_prompt="  ", guidance_scale=2.0), ValueError, "negative_prompt is blank; leave it out"),
    (dict(negative_prompt=["собака"], guidance_scale=2.0), TypeError, "negative_prompt must be a str or None, got list"),
])
def test_bad_guidance_arguments_fail_before_sampling(pipeline, monkeypatch, kwargs, error, match):
    tokenizer, dalle, vae = pipeline
    monkeypatch.setattr(generation, "sample_codes", lambda *a, **k: (_ for _ in ()).throw(AssertionError("sampled")))
    with pytest.raises(error, match=match):
        generate_images("кот", tokenizer, dalle, vae, num_images=1, seed=0, **{**ARGS, **kwargs})


def test_sample_codes_refuses_an_unconditional_without_guidance(model):
    with pytest.raises(ValueError, match="uncond_ids has no effect with guidance_scale=1"):
        sample_codes(model, TEXT, seeds=[0], uncond_ids=OTHER, **ARGS)
    with pytest.raises(ValueError, match=r"uncond_ids must have shape \[8\] or \[1, 8\].*\(7,\)"):
        sample_codes(model, TEXT, seeds=[0], uncond_ids=OTHER[:7], guidance_scale=2.0, **ARGS)


# -------------------------------------------------------------------------------- prompt lists
@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_same_seed_same_codes_whatever_the_batch_and_its_other_prompts(pipeline, scale):
    tokenizer, dalle, vae = pipeline
    args = dict(num_images=2, guidance_scale=scale, **ARGS)
    mixed = generate_images(["кот", "Собака"], tokenizer, dalle, vae, seed=20, batch_size=3, **args)
    assert mixed.seeds == [20, 21, 22, 23] and mixed.prompts == ["кот", "кот", "Собака", "Собака"]
    alone = generate_images("собака", tokenizer, dalle, vae, seed=22, batch_size=1, **args)  # seed 20 + 1 * 2 + 0
    first = generate_images(["кот"], tokenizer, dalle, vae, seed=20, batch_size=2, **args)
    assert torch.equal(mixed.codes[2:], alone.codes) and torch.equal(mixed.codes[:2], first.codes)
    assert mixed.perplexities[2:] == pytest.approx(alone.perplexities, rel=1e-5)
    assert not torch.equal(mixed.codes[0], mixed.codes[2])
    assert len(mixed.images) == 4 and alone.prompts == ["собака", "собака"]


def test_per_row_text_ids_equal_one_text_per_call(model):
    texts = torch.stack([TEXT, OTHER, TEXT, OTHER, OTHER])
    seeds = [7, 8, 9, 10, 11]
    mixed, ppl = sample_codes(model, texts, seeds=seeds, batch_size=2, guidance_scale=2.0, **ARGS)
    for text, rows in ((TEXT, [0, 2]), (OTHER, [1, 3, 4])):
        alone, ppl_alone = sample_codes(model, text, seeds=[seeds[r] for r in rows], guidance_scale=2.0, **ARGS)
        assert torch.equal(mixed[rows], alone) and torch.allclose(ppl[rows], ppl_alone, atol=1e-6)


def test_a_generator_draws_one_seed_per_image_of_every_prompt(pipeline):
    tokenizer, dalle, vae = pipeline
    out = generate_images(["кот", "собака", "дом"], tokenizer, dalle, vae, num_images=2,
                          generator=torch.Generator().manual_seed(5), **ARGS)
    assert out.seeds == seeds_for(6, None, torch.Generator().manual_seed(5)) and len(set(out.seeds)) == 6
    assert out.codes.shape == (6, N) and out.prompts == ["кот"] * 2 + ["собака"] * 2 + ["дом"] * 2


@pytest.mark.parametrize("text,kwargs,error,match", [
    ([], {}, ValueError, "text is an empty list: pass at least one prompt"),
    (["кот", 3], {}, TypeError, "text\\[1\\] must be a str, got int"),
    (("кот", b"x"), {}, TypeError, "text\\[1\\] must be a str, got bytes"),
    ({"кот"}, {}, TypeError, "text must be a str or a non-empty list of str, got set"),
    (["a", "b", "c"], dict(num_images=2000), ValueError, r"len\(text\) \* num_images must be in \[1, 4096\], got 6000"),
    (["a", "b"], dict(num_images=3, seed=2**63 - 1 - 5), ValueError, r"seed must be in \[0, 9223372036854775801\]"),
])
def test_bad_prompt_lists_fail_before_sampling(pipeline, monkeypatch, text, kwargs, error, match):
    tokenizer, dalle, vae = pipeline
    monkeypatch.setattr(generation, "sample_codes", lambda *a, **k: (_ for _ in ()).throw(AssertionError("sampled")))
    with pytest.raises(error, match=match):
        generate_images(text, tokenizer, dalle, vae, **{**dict(num_images=1, **ARGS), **kwargs})
