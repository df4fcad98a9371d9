"""Step callbacks, cancellation (and that nothing leaks), and previews of partial code grids."""
import gc
import weakref

import numpy as np
import pytest
import torch

import rudalle_pipe.sampling as sampling
from rudalle_pipe import GenerationCancelled, generate_images, preview_images
from rudalle_pipe.generation import codes_to_images
from rudalle_pipe.tokenizer import YTTMTokenizer
from tiny import IMAGE_VOCAB, SIDE, tiny_dalle, tiny_vae

N = SIDE * SIDE
ARGS = dict(top_k=20, top_p=0.95, progress=False)


@pytest.fixture(scope="module")
def pipeline(fixtures_dir):
    return YTTMTokenizer.from_file(fixtures_dir / "tokenizer" / "bpe.model"), tiny_dalle(), tiny_vae()


def run(pipeline, **kwargs):
    tokenizer, dalle, vae = pipeline
    return generate_images(kwargs.pop("text", "кот"), tokenizer, dalle, vae, **{**ARGS, **kwargs})


# ------------------------------------------------------------------------------------ callbacks
@pytest.mark.parametrize("scale", [1.0, 2.0])
def test_callback_sees_each_batch_grow_and_changes_nothing(pipeline, scale):
    calls = []

    def spy(step, total, codes):
        calls.append((step, total, codes.clone()))
        codes.fill_(7)  # a copy: the generation must not see this

    plain = run(pipeline, num_images=3, batch_size=2, seed=4, guidance_scale=scale)
    seen = run(pipeline, num_images=3, batch_size=2, seed=4, guidance_scale=scale, callback=spy, callback_steps=5)
    assert torch.equal(plain.codes, seen.codes) and plain.perplexities == seen.perplexities
    assert [(s, t) for s, t, _ in calls] == [(5, N), (10, N), (15, N), (16, N)] * 2  # two batches, each from 1
    for i, (step, _, codes) in enumerate(calls):
        rows = seen.codes[:2] if i < 4 else seen.codes[2:]
        assert codes.shape == rows.shape and codes.dtype == torch.long
        assert torch.equal(codes[:, :step], rows[:, :step]) and not codes[:, step:].any()


def test_cancel_by_returning_false_keeps_the_partial_codes(pipeline):
    full = run(pipeline, text=["кот", "дом"], num_images=2, batch_size=3, seed=10)
    batches = []

    def stop_in_second_batch(step, total, codes):
        batches.append(step == 1)
        return not (sum(batches) == 2 and step == 7)

    with pytest.raises(GenerationCancelled, match="callback returned False") as info:
        run(pipeline, text=["кот", "дом"], num_images=2, batch_size=3, seed=10, callback=stop_in_second_batch)
    err = info.value
    assert err.step == 7 and err.num_complete == 3 and err.codes.shape == (4, N)
    assert torch.equal(err.codes[:3], full.codes[:3])  # the first batch is complete
    assert torch.equal(err.codes[3, :7], full.codes[3, :7]) and not err.codes[3, 7:].any()
    assert err.seeds == [10, 11, 12, 13] and err.prompts == ["кот", "кот", "дом", "дом"]


def test_cancel_by_raising_keeps_the_reason(pipeline):
    def stop(step, total, codes):
        if step == 3:
            raise GenerationCancelled("user pressed stop")

    with pytest.raises(GenerationCancelled, match="user pressed stop") as info:
        run(pipeline, num_images=2, seed=1, callback=stop)
    assert info.value.step == 3 and info.value.num_complete == 0 and info.value.codes.shape == (2, N)
    assert info.value.reason == "user pressed stop" and info.value.prompts == ["кот", "кот"]


class Boom(RuntimeError):
    pass


@pytest.mark.parametrize("how", ["false", "cancel", "other"])
@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_nothing_leaks_when_the_callback_stops(pipeline, monkeypatch, how, scale):
    _, dalle, _ = pipeline
    caches, bars, during = [], [], []
    real_init = dalle.init_cache
    monkeypatch.setattr(dalle, "init_cache", lambda b: (c := real_init(b), caches.append(weakref.ref(c)))[0])

    class SpyBar(sampling.tqdm):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.closed = False
            bars.append(self)

        def close(self):
            self.closed = True
            super().close()

    monkeypatch.setattr(sampling, "tqdm", SpyBar)
    boom = Boom("callback bug")

    def callback(step, total, codes):
        during.append(torch.get_num_threads())
        if step == 5:
            if how == "false":
                return False
            raise GenerationCancelled() if how == "cancel" else boom

    previous = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        with pytest.raises((GenerationCancelled, Boom)) as info:
            run(pipeline, num_images=2, seed=0, guidance_scale=scale, callback=callback)
        assert torch.get_num_threads() == 3 and set(during) == {1}  # single-threaded while decoding, then restored
    finally:
        torch.set_num_threads(previous)
    assert info.value is boom if how == "other" else isinstance(info.value, GenerationCancelled)
    assert len(bars) == 1 and bars[0].closed
    assert len(caches) == 1  # one cache per batch
    gc.collect()
    assert info.value.__traceback__ is not None and caches[0]() is None  # the kept traceback holds no cache


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(callback=lambda s, t, c: "yes"), TypeError, "callback must return None, True .* or False .*got 'yes'"),
    (dict(callback="print"), TypeError, "callback must be callable as fn\\(step, total_steps, codes\\), got str"),
    (dict(callback_steps=4), ValueError, "callback_steps=4 has no effect without a callback"),
    (dict(callback=print, callback_steps=0), ValueError, r"callback_steps must be in \[1, 16\], got 0"),
    (dict(callback=print, callback_steps=17), ValueError, r"callback_steps must be in \[1, 16\], got 17"),
])
def test_bad_callback_arguments(pipeline, kwargs, error, match):
    with pytest.raises(error, match=match):
        run(pipeline, num_images=1, seed=0, **kwargs)


# ------------------------------------------------------------------------------------- previews
def grid_codes(seed=0, rows=2):
    return torch.randint(0, IMAGE_VOCAB, (rows, N), generator=torch.Generator().manual_seed(seed))


def test_full_preview_is_the_decoded_image():
    vae = tiny_vae()
    codes = grid_codes()
    for got, want in zip(preview_images(codes, vae, N), codes_to_images(vae, codes)):
        assert got.size == want.size == (SIDE * 8, SIDE * 8) and got.tobytes() == want.tobytes()


@pytest.mark.parametrize("step", [0, 1, 5, 8, 15])
def test_partial_preview_depends_on_drawn_codes_only_and_greys_the_rest(step):
    vae = tiny_vae()
    codes = grid_codes()
    other = codes.clone()
    other[:, step:] = grid_codes(seed=9)[:, step:]  # different undrawn codes
    a, b = preview_images(codes, vae, step), preview_images(other, vae, step)
    assert [im.tobytes() for im in a] == [im.tobytes() for im in b]
    pixels = torch.from_numpy(np.array(a[0])).long()  # (H, W, 3)
    cells = pixels.view(SIDE, 8, SIDE, 8, 3).permute(0, 2, 1, 3, 4).reshape(N, 8 * 8 * 3)
    grey = (cells == 128).all(dim=1)
    assert grey[step:].all() and not grey[:step].any()
    if step:  # the drawn part is what the drawn codes decode to, not grey, and changes with them
        changed = codes.clone()
        changed[:, :step] = (changed[:, :step] + 1) % IMAGE_VOCAB
        assert preview_images(changed, vae, step)[0].tobytes() != a[0].tobytes()


@pytest.mark.parametrize("codes,step,error,match", [
    (torch.zeros(2, N), 3, TypeError, "codes must be an integer tensor, got dtype torch.float32"),
    ([[0] * N], 3, TypeError, "codes must be a \\[batch, positions\\] integer tensor, got list"),
    (torch.zeros(N, dtype=torch.long), 3, ValueError, r"codes must be \[batch, side\*side\], got shape \(16,\)"),
    (torch.zeros(1, 15, dtype=torch.long), 3, ValueError, r"got shape \(1, 15\)"),
    (torch.zeros(1, N, dtype=torch.long), 17, ValueError, r"step must be in \[0, 16\], got 17"),
    (torch.zeros(1, N, dtype=torch.long), -1, ValueError, r"step must be in \[0, 16\], got -1"),
    (torch.zeros(1, N, dtype=torch.long), 2.0, TypeError, "step must be an int"),
    (torch.full((1, N), IMAGE_VOCAB), 3, ValueError, rf"drawn codes must be in \[0, {IMAGE_VOCAB}\), got values in"),
])
def test_bad_preview_arguments(codes, step, error, match):
    with pytest.raises(error, match=match):
        preview_images(codes, tiny_vae(), step)
