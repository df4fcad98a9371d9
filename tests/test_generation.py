"""Sampling: the key/value cache, greedy decoding, the filters, seeds, and bad input."""
import numpy as np
import pytest
import torch
from PIL import Image

from rudalle_pipe import GenerationOutput, filter_logits, generate_images
from rudalle_pipe.generation import sample_codes
from rudalle_pipe.tokenizer import YTTMTokenizer
from tiny import IMAGE_VOCAB, SIDE, TEXT_LEN, tiny_dalle, tiny_vae

TEXT = torch.tensor([2, 5, 7, 3, 0, 0, 0, 0])


@pytest.mark.parametrize("version", ["v3", "v2"])
def test_cached_step_logits_equal_full_forward(version):
    model = tiny_dalle(version)
    ids = torch.cat([TEXT, torch.randint(0, IMAGE_VOCAB, (SIDE * SIDE,))])[None].repeat(2, 1)
    ids[1, TEXT_LEN:] = torch.randint(0, IMAGE_VOCAB, (SIDE * SIDE,))
    n_ids = ids.shape[1] - (1 if version == "v2" else 0)  # v2 never feeds the last code
    with torch.no_grad():
        full = model(ids[:, :n_ids]).logits  # (2, L, V)
        cache = model.init_cache(2)
        steps = [model(ids[:, :TEXT_LEN], past_key_values=cache, use_cache=True).logits]
        for p in range(TEXT_LEN, n_ids):
            out = model(ids[:, p : p + 1], past_key_values=cache, use_cache=True)
            assert out.logits.shape[1] == 1  # only the new position went through the layers
            steps.append(out.logits)
    stepped = torch.cat(steps, dim=1)
    assert stepped.shape == full.shape
    assert torch.allclose(stepped, full, atol=1e-5, rtol=0)
    assert cache.length == full.shape[1]


@pytest.mark.parametrize("version", ["v3", "v2"])
def test_greedy_is_argmax_continuation_of_full_model(version):
    model = tiny_dalle(version)
    codes, _ = sample_codes(model, TEXT, seeds=[0, 1], top_k=1, top_p=1.0, progress=False)
    ids = TEXT[None]
    with torch.no_grad():
        for _ in range(SIDE * SIDE):
            next_code = model(ids).logits[0, -1, model.config.vocab_size :].argmax()
            ids = torch.cat([ids, next_code.view(1, 1)], dim=1)
    assert torch.equal(codes[0], ids[0, TEXT_LEN:])
    assert torch.equal(codes[1], codes[0])  # greedy ignores the seed


def test_cache_and_no_cache_sample_the_same_codes():
    model = tiny_dalle()
    kwargs = dict(seeds=[3, 4, 5], top_k=20, top_p=0.9, temperature=0.8, progress=False)
    cached, ppl_cached = sample_codes(model, TEXT, use_cache=True, **kwargs)
    full, ppl_full = sample_codes(model, TEXT, use_cache=False, **kwargs)
    assert torch.equal(cached, full)
    assert torch.allclose(ppl_cached, ppl_full, atol=1e-5)


def test_same_seed_same_images_whatever_batch_size():
    model = tiny_dalle()
    seeds = list(range(10, 17))
    results = [sample_codes(model, TEXT, seeds=seeds, top_k=30, top_p=0.95, batch_size=b, progress=False)[0]
               for b in (1, 3, 7)]
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])
    assert not torch.equal(results[0][0], results[0][1])  # different seeds differ


def test_only_image_codes_are_sampled():
    model = tiny_dalle()
    with torch.no_grad():  # make the text vocabulary overwhelmingly likely
        model.to_logits[1].bias[: model.config.vocab_size] += 1e4
    codes, _ = sample_codes(model, TEXT, seeds=[0, 1], top_k=IMAGE_VOCAB, top_p=1.0, progress=False)
    assert codes.dtype == torch.long and codes.shape == (2, SIDE * SIDE)
    assert int(codes.min()) >= 0 and int(codes.max()) < IMAGE_VOCAB


def test_forced_positions_are_copied_not_sampled():
    model = tiny_dalle()
    prompt = torch.randint(0, IMAGE_VOCAB, (SIDE * SIDE,))
    mask = torch.zeros(SIDE * SIDE, dtype=torch.bool)
    mask[:SIDE] = True  # the first image row is given, like an image prompt
    mask[-1] = True
    codes, _ = sample_codes(model, TEXT, seeds=[0, 1, 2], top_k=10, top_p=1.0, forced_codes=prompt,
                            forced_mask=mask, progress=False)
    assert torch.equal(codes[:, mask], prompt[mask].expand(3, -1))


def test_perplexity_is_mean_exp_cross_entropy():
    model = tiny_dalle()
    codes, ppl = sample_codes(model, TEXT, seeds=[7], top_k=5, top_p=1.0, progress=False)
    with torch.no_grad():
        logits = model(torch.cat([TEXT, codes[0]])[None]).logits[0, TEXT_LEN - 1 : -1, model.config.vocab_size :]
    ce = torch.nn.functional.cross_entropy(logits, codes[0], reduction="none")
    assert torch.allclose(ppl[0], ce.exp().mean(), rtol=1e-5)


# --------------------------------------------------------------------------------------- filters
def test_filter_order_temperature_then_top_k_then_top_p():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    out = filter_logits(logits, top_k=3, top_p=1.0, temperature=2.0)
    assert torch.equal(out, torch.tensor([[2.0, 1.5, 1.0, -float("inf"), -float("inf")]]))
    # probabilities 0.5, 0.25, 0.125, 0.125 (logs): cumulative 0.5, 0.75, 0.875, 1.0
    probs = torch.tensor([[0.5, 0.25, 0.125, 0.125]]).log()
    kept = filter_logits(probs, top_k=4, top_p=0.6).isfinite()
    assert kept.tolist() == [[True, True, False, False]]  # the token crossing p stays
    kept = filter_logits(probs, top_k=4, top_p=0.74).isfinite()
    assert kept.tolist() == [[True, True, False, False]]
    kept = filter_logits(probs, top_k=4, top_p=0.76).isfinite()  # mass before the 3rd token is 0.75
    assert kept.tolist() == [[True, True, True, False]]
    # top-k runs before top-p: after top_k=2 the renormalised masses are 2/3 and 1/3, so the best
    # token alone crosses 0.6 (top-p first, on the raw 0.5, 0.25, ..., would have kept two)
    kept = filter_logits(probs, top_k=2, top_p=0.6).isfinite()
    assert kept.tolist() == [[True, False, False, False]]


def test_filters_always_keep_the_best_token():
    logits = torch.tensor([[0.0, 10.0, 1.0], [5.0, 5.0, -1.0]])
    out = filter_logits(logits, top_k=1, top_p=1.0)
    assert out.isfinite().tolist() == [[False, True, False], [True, True, False]]  # ties with k-th kept
    out = filter_logits(logits, top_k=3, top_p=1e-6)  # top-p alone keeps exactly the best token
    assert out.isfinite().sum(dim=1).tolist() == [1, 1]
    assert out[0].argmax() == 1 and torch.isfinite(out[0, 1])


def test_filters_keep_order_per_row_and_permutation():
    torch.manual_seed(0)
    logits = torch.randn(4, 100)
    perm = torch.randperm(100)
    a = filter_logits(logits, top_k=40, top_p=0.8, temperature=0.7)
    b = filter_logits(logits[:, perm], top_k=40, top_p=0.8, temperature=0.7)
    assert torch.equal(a[:, perm], b)


# ------------------------------------------------------------------------------- generate_images
@pytest.fixture(scope="module")
def pipeline(fixtures_dir):
    return YTTMTokenizer.from_file(fixtures_dir / "tokenizer" / "bpe.model"), tiny_dalle(), tiny_vae()


def test_generate_images_end_to_end(pipeline):
    tokenizer, dalle, vae = pipeline
    out = generate_images("  Рыжий котик ", tokenizer, dalle, vae, top_k=20, top_p=0.99, num_images=3,
                          batch_size=2, seed=42, progress=False)
    assert isinstance(out, GenerationOutput)
    assert len(out.images) == 3 and all(isinstance(im, Image.Image) for im in out.images)
    assert out.images[0].size == (SIDE * 8, SIDE * 8) and out.images[0].mode == "RGB"
    assert out.codes.shape == (3, SIDE * SIDE) and out.seeds == [42, 43, 44]
    # each perplexity is the original's: mean over the codes of exp(cross-entropy) under the full model
    ids = tokenizer.encode_text("рыжий котик", TEXT_LEN)  # lowercased and stripped
    with torch.no_grad():
        logits = dalle(torch.cat([ids[None].expand(3, -1), out.codes], dim=1)).logits
    ce = torch.nn.functional.cross_entropy(logits[:, TEXT_LEN - 1:-1, dalle.config.vocab_size:].transpose(1, 2),
                                           out.codes, reduction="none")  # (3, SIDE * SIDE)
    assert torch.allclose(torch.tensor(out.perplexities), ce.exp().mean(dim=1), rtol=1e-5, atol=0)
    with torch.no_grad():  # and each image is the VQGAN's decoding of its codes
        decoded = vae.decode(out.codes)  # (3, 3, H, W) in [0, 1]
    pixels = torch.stack([torch.from_numpy(np.array(im)) for im in out.images]).permute(0, 3, 1, 2)
    assert (pixels.float() - decoded * 255).abs().max() <= 1.0
    # text is lowercased and stripped like the original pipeline
    same = generate_images("рыжий котик", tokenizer, dalle, vae, top_k=20, top_p=0.99, num_images=1,
                           seed=43, progress=False)
    assert torch.equal(same.codes[0], out.codes[1])
    # a generator gives reproducible seeds too
    g1 = generate_images("кот", tokenizer, dalle, vae, top_k=20, top_p=0.99, num_images=2,
                         generator=torch.Generator().manual_seed(5), progress=False)
    g2 = generate_images("кот", tokenizer, dalle, vae, top_k=20, top_p=0.99, num_images=2, batch_size=1,
                         generator=torch.Generator().manual_seed(5), progress=False)
    assert g1.seeds == g2.seeds and torch.equal(g1.codes, g2.codes)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(top_k=0), ValueError, r"top_k must be in \[1, 50\].*got 0"),
    (dict(top_k=51), ValueError, r"top_k must be in \[1, 50\]"),
    (dict(top_k=2.5), TypeError, "top_k must be an int"),
    (dict(top_p=0.0), ValueError, r"top_p must be a finite number in \(0, 1\], got 0.0"),
    (dict(top_p=1.5), ValueError, r"top_p must be a finite number in \(0, 1\], got 1.5"),
    (dict(temperature=0), ValueError, "temperature must be a finite number > 0, got 0"),
    (dict(temperature=-1.0), ValueError, "temperature must be a finite number > 0"),
    (dict(temperature=float("inf")), ValueError, "temperature must be a finite number > 0, got inf"),
    (dict(num_images=0), ValueError, r"num_images must be in \[1, 4096\], got 0"),
    (dict(batch_size=0), ValueError, r"batch_size must be in \[1, 4096\], got 0"),
    (dict(seed=1, generator=torch.Generator()), ValueError, "either seed or generator"),
    (dict(seed=-3), ValueError, r"seed must be in \[0, "),
    (dict(seed=2.0), TypeError, "seed must be an int"),
])
def test_bad_sampling_arguments(pipeline, kwargs, error, match):
    tokenizer, dalle, vae = pipeline
    args = {**dict(top_k=10, top_p=0.9, num_images=1, progress=False), **kwargs}
    with pytest.raises(error, match=match):
        generate_images("кот", tokenizer, dalle, vae, **args)


@pytest.mark.parametrize("text", [None, 42, b"bytes", {"set"}])
def test_non_str_text_is_rejected(pipeline, text):
    tokenizer, dalle, vae = pipeline
    with pytest.raises(TypeError, match="text must be a str"):
        generate_images(text, tokenizer, dalle, vae, top_k=10, top_p=0.9, num_images=1, progress=False)


@pytest.mark.parametrize("top_k,top_p,temperature", [(1, 1.0, 1.0), (7, 0.9, 0.7), (50, 0.5, 1.3), (64, 1.0, 1.0)])
def test_compact_candidates_equal_the_reference_filter(top_k, top_p, temperature):
    from rudalle_pipe.generation import filtered_candidates

    torch.manual_seed(top_k)
    logits = torch.randn(5, 64) * 3
    logits[0, :10] = 2.0  # ties around the k-th score force the full-sort path
    reference = filter_logits(logits, top_k=top_k, top_p=top_p, temperature=temperature)
    scores, index = filtered_candidates(logits, top_k=top_k, top_p=top_p, temperature=temperature)
    rebuilt = torch.full_like(reference, float("-inf")).scatter(1, index, scores)
    assert torch.equal(rebuilt.isfinite(), reference.isfinite())
    assert torch.allclose(rebuilt.softmax(-1), reference.softmax(-1))
