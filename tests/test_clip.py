"""Tests of rudalle_pipe.clip on tiny random open_clip models, all offline."""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from rudalle_pipe.clip import (
    DEFAULT_CLIP_MODEL,
    ClipBundle,
    RerankOutput,
    cherry_pick_by_clip,
    get_clip,
)
from rudalle_pipe.hub import WeightsNotFoundError

TINY_NAME = "rudalle-pipe-tiny-test-clip"
# A tiny ViT + the standard open_clip text transformer (SimpleTokenizer vocab, context 77).
TINY_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
TEXT_A, TEXT_B = "красный квадрат", "синий круг"


@pytest.fixture(scope="module")
def tiny_name(tmp_path_factory) -> str:
    """Register the tiny architecture with open_clip (a config file, as for built-in models)."""
    import open_clip

    path = tmp_path_factory.mktemp("clip_cfg") / f"{TINY_NAME}.json"
    path.write_text(json.dumps(TINY_CFG))
    open_clip.add_model_config(path)
    return TINY_NAME


@pytest.fixture()
def tiny_clip(tiny_name) -> ClipBundle:
    torch.manual_seed(0)
    return get_clip(tiny_name, None)


@pytest.fixture()
def offline(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def _noise_images(n: int, seed: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    sizes = [(32, 32), (48, 40), (20, 36)]
    return [
        Image.fromarray(rng.integers(0, 256, (*sizes[i % 3][::-1], 3), dtype=np.uint8))
        for i in range(n)
    ]


def _shape_image(kind: str, rng: random.Random) -> Image.Image:
    """A red square ("A") or a blue circle ("B") on a random grey background, 32x32 RGB."""
    grey = rng.randint(40, 220)
    image = Image.new("RGB", (32, 32), (grey, grey, grey))
    draw = ImageDraw.Draw(image)
    size = rng.randint(10, 18)
    x, y = rng.randint(0, 32 - size), rng.randint(0, 32 - size)
    if kind == "A":
        draw.rectangle([x, y, x + size, y + size], fill=(rng.randint(200, 255), 0, 0))
    else:
        draw.ellipse([x, y, x + size, y + size], fill=(0, 0, rng.randint(200, 255)))
    return image


def _by_hand_scores(clip: ClipBundle, images, prompts: list[str]) -> torch.Tensor:
    """Reference: one batch, normalized embeddings, mean over prompts, renormalized, cosine."""
    with torch.no_grad():
        pixels = torch.stack([clip.preprocess(im) for im in images])  # (N, 3, 32, 32)
        img = F.normalize(clip.model.encode_image(pixels), dim=-1)  # (N, D)
        txt = F.normalize(clip.model.encode_text(clip.tokenizer(prompts)), dim=-1)  # (T, D)
        txt = F.normalize(txt.mean(0), dim=-1)  # (D,)
    return img @ txt  # (N,)


# --------------------------------------------------------------------------------- get_clip


def test_get_clip_random_tiny(tiny_clip):
    assert tiny_clip.name == TINY_NAME and tiny_clip.pretrained is None
    assert not tiny_clip.model.training
    pixels = tiny_clip.preprocess(Image.new("L", (50, 20), 128))  # grey, non-square
    assert pixels.shape == (3, 32, 32) and pixels.dtype == torch.float32
    tokens = tiny_clip.tokenizer([TEXT_A, TEXT_B])
    assert tokens.shape == (2, 77) and tokens[0, 0] == 49406  # SimpleTokenizer start-of-text
    assert "model" not in repr(tiny_clip)  # the repr stays short


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_get_clip_local_checkpoint(tiny_name, tiny_clip, tmp_path, suffix):
    state = {k: v.clone() for k, v in tiny_clip.model.state_dict().items()}
    path = tmp_path / f"tiny{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save(state, path)
    torch.manual_seed(123)  # a different random init, which the checkpoint must overwrite
    loaded = get_clip(tiny_name, str(path))
    assert loaded.pretrained == str(path)
    for key, value in loaded.model.state_dict().items():
        assert torch.equal(value, state[key]), key
    other = get_clip(tiny_name, None)
    assert not torch.equal(other.model.text_projection, state["text_projection"])


def test_get_clip_checkpoint_of_wrong_architecture(tiny_name, tiny_clip, tmp_path):
    state = dict(tiny_clip.model.state_dict())
    state["text_projection"] = torch.zeros(64, 16)  # wrong embed_dim
    del state["logit_scale"]
    path = tmp_path / "wrong.pt"
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"wrong\.pt.*rudalle-pipe-tiny-test-clip") as info:
        get_clip(tiny_name, str(path))
    assert "logit_scale" in str(info.value) and "text_projection" in str(info.value)


def test_get_clip_unknown_model_name():
    with pytest.raises(ValueError, match=r"unknown open_clip model 'ViT-B/32'.*'ViT-B-32'"):
        get_clip("ViT-B/32", None)
    with pytest.raises(ValueError, match=r"xlm-roberta-base-ViT-B-32"):
        get_clip("no-such-model-at-all", None)


def test_get_clip_unknown_pretrained_tag_lists_tags(tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(ValueError, match=r"nope\.pt.*Tags for 'ViT-B-32'.*'openai'"):
        get_clip("ViT-B-32", str(missing))
    with pytest.raises(ValueError, match=r"'laion5b_s13b_b90k'"):
        get_clip(DEFAULT_CLIP_MODEL, "openai")


def test_get_clip_schema_name_rejects_explicit_pretrained():
    with pytest.raises(ValueError, match=r"hf-hub:someorg/tiny-clip.*pretrained='openai'"):
        get_clip("hf-hub:someorg/tiny-clip", "openai")


def test_get_clip_bad_types():
    with pytest.raises(TypeError, match="name must be a str"):
        get_clip(32, None)
    with pytest.raises(TypeError, match="pretrained must be"):
        get_clip("ViT-B-32", 5)


def test_default_model_offline_without_cache_names_the_repos(offline, tmp_path):
    """How fast this fails is measured by benchmarks/offline_clip.py, not here."""
    with pytest.raises(WeightsNotFoundError) as info:
        get_clip(cache_dir=tmp_path)
    message = str(info.value)
    assert "xlm-roberta-base-ViT-B-32" in message and "HF_HUB_OFFLINE is set" in message
    assert "hf download laion/CLIP-ViT-B-32-xlm-roberta-base-laion5B-s13B-b90k" in message
    assert "hf download xlm-roberta-base" in message and str(tmp_path) in message


# ----------------------------------------------------------------------------- hf-hub cache


def _fake_hub_repo(cache_dir, repo_id: str, files: dict[str, bytes | dict]) -> Path:
    """Lay out ``files`` like huggingface_hub's cache: refs/main -> snapshots/<commit>/..."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = cache_dir / f"models--{repo_id.replace('/', '--')}"
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    snapshot = repo_dir / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for filename, content in files.items():
        if isinstance(content, dict):  # a state dict
            if filename.endswith(".safetensors"):
                from safetensors.torch import save_file

                save_file(content, str(snapshot / filename))
            else:
                torch.save(content, snapshot / filename)
        else:
            (snapshot / filename).write_bytes(content)
    return snapshot


_HUB_CONFIG = json.dumps(
    {"model_cfg": TINY_CFG, "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}}
).encode()


@pytest.mark.parametrize("weights_file", ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"])
def test_get_clip_hf_hub_from_local_cache(offline, tiny_clip, tmp_path, weights_file):
    state = {k: v.clone() for k, v in tiny_clip.model.state_dict().items()}
    _fake_hub_repo(tmp_path, "someorg/tiny-clip", {"open_clip_config.json": _HUB_CONFIG, weights_file: state})
    torch.manual_seed(321)
    loaded = get_clip("hf-hub:someorg/tiny-clip", cache_dir=tmp_path)
    assert loaded.name == "hf-hub:someorg/tiny-clip" and loaded.pretrained is None
    for key, value in loaded.model.state_dict().items():
        assert torch.equal(value, state[key]), key
    white = loaded.preprocess(Image.new("RGB", (32, 32), (255, 255, 255)))
    assert torch.allclose(white, torch.full_like(white, 2.0))  # (1 - 0.5) / 0.25: preprocess_cfg used
    assert loaded.tokenizer([TEXT_A]).shape == (1, 77)


def test_get_clip_local_dir(tiny_clip, tmp_path):
    state = {k: v.clone() for k, v in tiny_clip.model.state_dict().items()}
    (tmp_path / "open_clip_config.json").write_bytes(_HUB_CONFIG)
    from safetensors.torch import save_file

    save_file(state, str(tmp_path / "open_clip_model.safetensors"))
    loaded = get_clip(f"local-dir:{tmp_path}", None)
    assert all(torch.equal(v, state[k]) for k, v in loaded.model.state_dict().items())
    with pytest.raises(ValueError, match=r"nowhere.*open_clip_config\.json does not exist"):
        get_clip(f"local-dir:{tmp_path / 'nowhere'}", None)
    (tmp_path / "open_clip_model.safetensors").unlink()
    with pytest.raises(ValueError, match=r"local-dir:"):  # open_clip alone would build a random model
        get_clip(f"local-dir:{tmp_path}", None)


def test_get_clip_pretrained_tag_from_cache_dir(offline, monkeypatch, tiny_name, tiny_clip, tmp_path):
    """A pretrained tag resolves to its Hub repo, read from cache_dir (a tag made up for the test)."""
    import open_clip.pretrained

    tag_cfg = {"url": "", "hf_hub": "someorg/tiny-tag/", "mean": (0.5,) * 3, "std": (0.25,) * 3}
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, tiny_name, {"tiny_tag": tag_cfg})
    state = {k: v.clone() for k, v in tiny_clip.model.state_dict().items()}
    with pytest.raises(WeightsNotFoundError, match=r"hf download someorg/tiny-tag open_clip_pytorch_model\.bin"):
        get_clip(tiny_name, "tiny_tag", cache_dir=tmp_path)
    _fake_hub_repo(tmp_path, "someorg/tiny-tag", {"open_clip_pytorch_model.bin": state})
    loaded = get_clip(tiny_name, "tiny_tag", cache_dir=tmp_path)
    assert all(torch.equal(v, state[k]) for k, v in loaded.model.state_dict().items())
    white = loaded.preprocess(Image.new("RGB", (32, 32), (255, 255, 255)))
    assert torch.allclose(white, torch.full_like(white, 2.0))  # the tag's mean/std


def test_get_clip_hf_hub_without_weights_is_an_error(offline, tmp_path):
    # open_clip alone would only warn and return a random model here.
    _fake_hub_repo(tmp_path, "someorg/no-weights", {"open_clip_config.json": _HUB_CONFIG})
    with pytest.raises(WeightsNotFoundError, match=r"(?s)hf-hub:someorg/no-weights.*hf download someorg/no-weights.*local-dir:"):
        get_clip("hf-hub:someorg/no-weights", cache_dir=tmp_path)


def test_get_clip_hf_hub_missing_repo_offline(offline, tmp_path):
    with pytest.raises(WeightsNotFoundError, match=r"(?s)hf-hub:someorg/absent.*HF_HUB_OFFLINE"):
        get_clip("hf-hub:someorg/absent", cache_dir=tmp_path)


def test_hf_text_tower_comes_from_cache_dir(offline, tiny_clip, tmp_path):
    """The default model's kind: a Hugging Face (XLM-RoBERTa) text tower, here tiny and fake.

    open_clip builds such towers with AutoConfig.from_pretrained(name), ignoring cache_dir;
    get_clip must still find the tower's config and tokenizer in cache_dir while offline.
    """
    import open_clip
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, XLMRobertaConfig

    snapshot = _fake_hub_repo(tmp_path, "someorg/tiny-xlmr", {})
    XLMRobertaConfig(
        vocab_size=16, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=80,  # 77 tokens + roberta's offset of 2
    ).save_pretrained(snapshot)
    vocab = {w: i for i, w in enumerate(["<s>", "<pad>", "</s>", "<unk>", *TEXT_A.split(), *TEXT_B.split()])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    ).save_pretrained(snapshot)
    name = "rudalle-pipe-tiny-xlmr-test-clip"
    cfg = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 32, "patch_size": 16},
        "text_cfg": {"hf_model_name": "someorg/tiny-xlmr", "hf_tokenizer_name": "someorg/tiny-xlmr",
                     "hf_pooler_type": "mean_pooler"},
    }
    (tmp_path / f"{name}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path / f"{name}.json")

    random_clip = get_clip(name, None, cache_dir=tmp_path)
    assert random_clip.tokenizer([TEXT_A])[0, :4].tolist() == [4, 5, 1, 1]  # the fake vocab: красный квадрат <pad>
    path = tmp_path / "tiny_xlmr.pt"
    torch.save(random_clip.model.state_dict(), path)
    loaded = get_clip(name, str(path), cache_dir=tmp_path)
    text = loaded.tokenizer([TEXT_A, TEXT_B])
    with torch.no_grad():
        assert torch.equal(loaded.model.encode_text(text), random_clip.model.encode_text(text))
    images = _noise_images(5, seed=4)
    expected = _by_hand_scores(loaded, images, [TEXT_A])  # through the XLM-R text tower loaded from the cache
    assert expected.sort().values.diff().min() > 1e-6  # distinct scores: the order is well defined
    out = cherry_pick_by_clip(images, TEXT_A, loaded, progress=False)
    assert out.indices == torch.argsort(expected, descending=True).tolist()
    assert torch.allclose(torch.tensor(out.scores), expected[out.indices], atol=1e-5)


# ------------------------------------------------------------------------------- reranking


def test_ranking_matches_by_hand(tiny_clip):
    images = _noise_images(7, seed=1)
    expected = _by_hand_scores(tiny_clip, images, [TEXT_A])
    gaps = expected.sort().values.diff()
    assert gaps.min() > 1e-5  # distinct scores, so the order is well defined
    order = torch.argsort(expected, descending=True, stable=True).tolist()

    out = cherry_pick_by_clip(images, TEXT_A, tiny_clip, batch_size=3, progress=False)
    assert isinstance(out, RerankOutput)
    assert out.indices == order
    assert torch.allclose(torch.tensor(out.scores), expected[order], atol=1e-5)
    assert all(out.images[k] is images[i] for k, i in enumerate(order))
    assert out.scores == sorted(out.scores, reverse=True)

    top = cherry_pick_by_clip(images, TEXT_A, tiny_clip, top_n=3, progress=False)
    assert top.indices == order[:3] and len(top.images) == len(top.scores) == 3
    assert cherry_pick_by_clip(images, TEXT_A, tiny_clip, top_n=7, progress=False).indices == order


def test_templates_average_matches_by_hand(tiny_clip):
    images = _noise_images(5, seed=2)
    templates = ["изображение {}", "фото {}", "{}"]
    prompts = [t.replace("{}", TEXT_B) for t in templates]
    expected = _by_hand_scores(tiny_clip, images, prompts)
    out = cherry_pick_by_clip(images, TEXT_B, tiny_clip, templates=templates, progress=False)
    assert torch.allclose(torch.tensor(out.scores), expected[out.indices], atol=1e-5)
    assert out.indices == torch.argsort(expected, descending=True, stable=True).tolist()
    plain = cherry_pick_by_clip(images, TEXT_B, tiny_clip, progress=False)
    assert not torch.allclose(torch.tensor(sorted(plain.scores)), torch.tensor(sorted(out.scores)))


def test_ties_keep_input_order(tiny_clip):
    a, b = _noise_images(2, seed=3)
    images = [a, b, a.copy(), b.copy(), a.copy()]
    # batch_size=1: identical images take the same kernel path, so their scores are exactly equal (in a
    # batch, BLAS may round rows differently depending on their position and the thread count)
    out = cherry_pick_by_clip(images, TEXT_A, tiny_clip, batch_size=1, progress=False)
    scores = dict(zip(out.indices, out.scores))
    assert scores[0] == scores[2] == scores[4] and scores[1] == scores[3] and scores[0] != scores[1]
    assert out.indices == ([0, 2, 4, 1, 3] if scores[0] > scores[1] else [1, 3, 0, 2, 4])


def test_trained_tiny_clip_ranks_matching_images_first(tiny_clip):
    """Train the tiny CLIP to tell red squares from blue circles, then rerank a shuffled mix."""
    rng = random.Random(0)
    tokens = tiny_clip.tokenizer([TEXT_A, TEXT_B])  # (2, 77)
    model = tiny_clip.model.train()
    # The 49408-row token table is left frozen: Adam over it is most of the step time.
    params = [p for name, p in model.named_parameters() if name != "token_embedding.weight"]
    optimizer = torch.optim.Adam(params, lr=2e-3)
    for step in range(300):  # a fresh batch every step, so the model cannot memorize
        kinds = ["A", "B"] * 16
        pixels = torch.stack([tiny_clip.preprocess(_shape_image(k, rng)) for k in kinds])  # (32, 3, 32, 32)
        labels = torch.tensor([0 if k == "A" else 1 for k in kinds])  # (32,)
        img = F.normalize(model.encode_image(pixels), dim=-1)  # (32, D)
        txt = F.normalize(model.encode_text(tokens), dim=-1)  # (2, D)
        loss = F.cross_entropy(model.logit_scale.exp() * img @ txt.T, labels)  # image -> caption
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if loss.item() < 0.01:
            break
    model.eval()

    test_rng = random.Random(1)
    test_kinds = ["A"] * 6 + ["B"] * 6
    test_rng.shuffle(test_kinds)
    images = [_shape_image(k, test_rng) for k in test_kinds]
    a_positions = {i for i, k in enumerate(test_kinds) if k == "A"}
    out_a = cherry_pick_by_clip(images, TEXT_A, tiny_clip, batch_size=5, progress=False)
    assert set(out_a.indices[:6]) == a_positions, (loss.item(), out_a.scores)
    out_b = cherry_pick_by_clip(images, TEXT_B, tiny_clip, top_n=6, progress=False)
    assert set(out_b.indices) == set(range(12)) - a_positions


# ----------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        ({"images": []}, ValueError, "images is empty"),
        ({"images": "img"}, TypeError, "images must be a list"),
        ({"images": Image.new("RGB", (8, 8))}, TypeError, "images must be a list"),
        ({"images": [Image.new("RGB", (8, 8))] * 2 + [np.zeros((8, 8, 3))]}, TypeError, r"images\[2\].*ndarray"),
        ({"text": 5}, TypeError, "text must be a str.*int"),
        ({"text": [TEXT_A]}, TypeError, "text must be a str.*list"),
        ({"clip": "ViT-B-32"}, TypeError, "clip must be a ClipBundle"),
        ({"top_n": 0}, ValueError, "top_n must be >= 1.*0"),
        ({"top_n": 4}, ValueError, r"top_n=4 .*number of images \(3\)"),
        ({"top_n": 1.5}, TypeError, "top_n must be an int"),
        ({"batch_size": 0}, ValueError, "batch_size must be >= 1"),
        ({"batch_size": 2.0}, TypeError, "batch_size must be an int"),
        ({"templates": []}, ValueError, "templates is empty"),
        ({"templates": ["фото {}", "без места"]}, ValueError, r"templates\[1\] = 'без места'.*'\{\}'"),
        ({"templates": "фото {}"}, TypeError, "templates must be a list"),
    ],
)
def test_bad_inputs(tiny_clip, kwargs, error, pattern):
    args = {"images": [Image.new("RGB", (8, 8))] * 3, "text": TEXT_A, "clip": tiny_clip} | kwargs
    images, text, clip = args.pop("images"), args.pop("text"), args.pop("clip")
    with pytest.raises(error, match=pattern):
        cherry_pick_by_clip(images, text, clip, progress=False, **args)
