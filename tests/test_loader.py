"""The real download code against a local Hub cache (HF_HUB_OFFLINE=1), the Hugging Face
save/load layout, and the errors for bad names and bad files."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import add_to_hub_cache
from rudalle_pipe import (
    DalleConfig,
    DalleModel,
    WeightsNotFoundError,
    get_rudalle_model,
    get_tokenizer,
    get_vae,
    list_pretrained,
)
from rudalle_pipe.registry import PRETRAINED

TINY = dict(num_layers=4, hidden_size=64, num_attention_heads=4)


def test_list_pretrained_names_every_preset():
    assert list_pretrained("dalle") == ["Malevich", "Malevich_v2", "Emojich", "Surrealist_XL", "Kandinsky"]
    assert {"tokenizer", "vqgan", "vqgan_dwt", "x2", "x4", "x8"} <= set(list_pretrained())
    with pytest.raises(ValueError, match="unknown kind 'gan'.*dalle"):
        list_pretrained("gan")


def test_everything_loads_from_the_hub_cache_offline(fixtures_dir, offline_hub):
    utils = {"bpe.model": fixtures_dir / "tokenizer" / "bpe.model",
             "vqgan.gumbelf8-sber.model.ckpt": fixtures_dir / "vqgan" / "model.ckpt"}
    add_to_hub_cache(offline_hub, "shonenkov/rudalle-utils", utils)
    add_to_hub_cache(offline_hub, "sberbank-ai/rudalle-Malevich",
                     {"pytorch_model_v3.bin": fixtures_dir / "dalle_v3" / "pytorch_model.bin"})
    tokenizer = get_tokenizer()  # default cache = HF_HUB_CACHE
    assert tokenizer.vocab_size == 229
    vae = get_vae(cache_dir=offline_hub, ch=32, n_embed=1024)
    cases = load_file(fixtures_dir / "vqgan" / "cases.safetensors")
    assert torch.allclose(vae.decode(cases["codes"]), cases["decoded"], atol=1e-4)
    dalle = get_rudalle_model("Malevich", cache_dir=offline_hub, **TINY)
    cases = load_file(fixtures_dir / "dalle_v3" / "cases.safetensors")
    with torch.no_grad():
        last = dalle(cases["input_ids"][:, :128]).logits[:, -1]
    assert torch.allclose(last, cases["logits_text_only_last"], atol=1e-4)


def test_missing_weights_offline_name_the_file(offline_hub):
    with pytest.raises(WeightsNotFoundError, match=r"pytorch_model\.bin.*shonenkov-AI/Kandinsky.*HF_HUB_OFFLINE"):
        get_rudalle_model("Kandinsky", cache_dir=offline_hub)
    with pytest.raises(WeightsNotFoundError, match=r"bpe\.model.*hf download shonenkov/rudalle-utils bpe\.model"):
        get_tokenizer(cache_dir=offline_hub)
    with pytest.raises(WeightsNotFoundError, match="vqgan.gumbelf8-sber-dwt.model.ckpt"):
        get_vae(dwt=True, cache_dir=offline_hub)


def test_revision_is_honoured(fixtures_dir, offline_hub):
    add_to_hub_cache(offline_hub, "shonenkov/rudalle-utils",
                     {"bpe.model": fixtures_dir / "tokenizer" / "bpe.model"}, revision="v1.0")
    assert get_tokenizer(cache_dir=offline_hub, revision="v1.0").vocab_size == 229
    with pytest.raises(WeightsNotFoundError):
        get_tokenizer(cache_dir=offline_hub)  # "main" was never cached


def test_save_pretrained_round_trip_sharded(fixtures_dir, tmp_path):
    model = get_rudalle_model("Malevich", checkpoint_path=fixtures_dir / "dalle_v3" / "pytorch_model.bin", **TINY)
    out = tmp_path / "saved"
    model.save_pretrained(out, max_shard_size="1MB")
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 1 and (out / "model.safetensors.index.json").exists()
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "rudalle" and config["num_layers"] == 4
    again = get_rudalle_model(str(out))
    assert again.config == model.config
    for (k, a), (k2, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    with pytest.raises(FileExistsError, match="already holds a saved model"):
        model.save_pretrained(out)  # never overwrites


def test_hf_hub_prefix_loads_saved_layout_from_cache(fixtures_dir, tmp_path, offline_hub):
    model = get_rudalle_model("Malevich_v2", checkpoint_path=fixtures_dir / "dalle_v2" / "pytorch_model.bin",
                              **TINY)
    model.save_pretrained(tmp_path / "saved")
    files = {p.name: p for p in (tmp_path / "saved").iterdir()}
    add_to_hub_cache(offline_hub, "someone/rudalle-finetuned", files)
    loaded = get_rudalle_model("hf-hub:someone/rudalle-finetuned", cache_dir=offline_hub)
    assert loaded.config.hf_version == "v2"
    ids = torch.randint(0, 8192, (1, 140))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    with pytest.raises(WeightsNotFoundError, match="someone/missing"):
        get_rudalle_model("hf-hub:someone/missing", cache_dir=offline_hub)


def test_unknown_names_list_valid_ones():
    with pytest.raises(ValueError, match=r"unknown dalle model 'Malevitch'\. Available: Malevich, Malevich_v2"):
        get_rudalle_model("Malevitch")
    with pytest.raises(TypeError, match="name must be a str"):
        get_rudalle_model(3)
    with pytest.raises(TypeError, match=r"unknown config override\(s\) n_layers.*valid names: num_layers"):
        get_rudalle_model("Malevich", pretrained=False, n_layers=2)
    with pytest.raises(TypeError, match="unknown config override"):
        get_vae(pretrained=False, channels=3)


def _bad_checkpoint(fixtures_dir, tmp_path, edit):
    state = torch.load(fixtures_dir / "dalle_v3" / "pytorch_model.bin", weights_only=True)
    edit(state)
    path = tmp_path / "edited.bin"
    torch.save(state, path)
    return path


def test_checkpoint_key_problems_are_listed(fixtures_dir, tmp_path):
    def drop(s):
        del s["transformer.layers.2.mlp.dense_4h_to_h.bias"]

    def extra(s):
        s["transformer.layers.9.attention.dense.weight"] = torch.zeros(2)

    def reshape(s):
        s["image_col_embeddings.weight"] = torch.zeros(31, 64)

    for edit, match in [(drop, r"missing keys \(1\): transformer\.layers\.2\.mlp\.dense_4h_to_h\.bias"),
                        (extra, r"unexpected keys \(1\): transformer\.layers\.9\.attention\.dense\.weight"),
                        (reshape, r"mis-shaped keys \(1\): image_col_embeddings\.weight: checkpoint \(31, 64\) vs model \(32, 64\)")]:
        with pytest.raises(ValueError, match=match):
            get_rudalle_model("Malevich", checkpoint_path=_bad_checkpoint(fixtures_dir, tmp_path, edit), **TINY)
    # the wrong preset size is caught the same way
    with pytest.raises(ValueError, match="mis-shaped keys"):
        get_rudalle_model("Malevich", checkpoint_path=fixtures_dir / "dalle_v3" / "pytorch_model.bin",
                          num_layers=4, hidden_size=128, num_attention_heads=4)


def test_truncated_and_corrupt_files(fixtures_dir, tmp_path):
    data = (fixtures_dir / "dalle_v3" / "pytorch_model.bin").read_bytes()
    for name, content in [("truncated.bin", data[: len(data) // 2]), ("garbage.bin", b"not a checkpoint" * 10),
                          ("empty.bin", b"")]:
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(ValueError, match=f"{name}.*(truncated|corrupt|empty)"):
            get_rudalle_model("Malevich", checkpoint_path=path, **TINY)
    with pytest.raises(FileNotFoundError, match="nowhere.bin"):
        get_rudalle_model("Malevich", checkpoint_path=tmp_path / "nowhere.bin", **TINY)


def test_unsafe_pickles_are_refused(tmp_path):
    path = tmp_path / "evil.bin"
    torch.save({"weights": torch.zeros(1), "payload": object()}, path)  # needs full unpickling
    with pytest.raises(ValueError, match="could not read checkpoint"):
        get_rudalle_model("Malevich", checkpoint_path=path, **TINY)


def _file_mappings(path) -> list[tuple[int, int]]:
    """Address ranges of this process that map ``path`` (Linux: /proc/self/maps)."""
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] == str(path):
            low, high = (int(a, 16) for a in fields[0].split("-"))
            ranges.append((low, high))
    return ranges


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads the memory map of the process (Linux)")
@pytest.mark.parametrize("file_dtype", [torch.float32, torch.float16])
def test_loading_never_makes_a_second_copy(tmp_path, monkeypatch, file_dtype):
    """The property behind "a 12B model is never in RAM twice", checked exactly rather than by peak
    memory (which benchmarks/loading_memory.py measures): the generator is built on the meta device (no
    random weights are ever allocated) and the checkpoint is memory-mapped. An fp32 file's tensors become
    the parameters as they are: every parameter lies in the file's mapping, no byte copied. An fp16 file
    is converted once per tensor: every parameter is its own fp32 tensor, none left in the mapping."""
    import rudalle_pipe.loader as loader

    config = dict(num_layers=2, hidden_size=64, num_attention_heads=4)
    path = tmp_path / "model.bin"
    torch.save(DalleModel(DalleConfig(**config)).to(file_dtype).state_dict(), path)
    built, mapped = [], []
    init = DalleModel.__init__

    def spy_init(self, cfg):
        init(self, cfg)
        built.append({p.device.type for p in self.parameters()})

    read = loader.read_checkpoint

    def spy_read(file):
        state = read(file)
        mapped.extend(_file_mappings(Path(file).resolve()))
        return state

    monkeypatch.setattr(DalleModel, "__init__", spy_init)
    monkeypatch.setattr(loader, "read_checkpoint", spy_read)
    model = get_rudalle_model("Malevich", checkpoint_path=path, dtype=torch.float32, **config)
    assert built == [{"meta"}]
    assert mapped, "the checkpoint was not memory-mapped"
    in_file = [any(low <= p.data_ptr() < high for low, high in mapped) for p in model.parameters()]
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in model.parameters())
    assert in_file == [file_dtype == torch.float32] * len(in_file)
    pointers = [p.data_ptr() for p in model.parameters()]
    assert len(set(pointers)) == len(pointers)  # no two parameters share (or were merged into) one buffer


def test_registry_entries_are_read_only():
    with pytest.raises(TypeError):
        PRETRAINED["Malevich"].config["num_layers"] = 2
    with pytest.raises(TypeError):
        PRETRAINED["NewModel"] = PRETRAINED["Malevich"]


def test_push_to_hub_uploads_the_saved_layout(fixtures_dir, monkeypatch):
    import huggingface_hub

    calls = {}

    class FakeApi:
        def __init__(self, token=None):
            calls["token"] = token

        def create_repo(self, repo_id, private=False, exist_ok=False):
            calls["create"] = (repo_id, private, exist_ok)

        def upload_folder(self, repo_id, folder_path, commit_message):
            from pathlib import Path

            calls["files"] = sorted(p.name for p in Path(folder_path).iterdir())
            calls["config"] = json.loads((Path(folder_path) / "config.json").read_text())
            return f"https://hub.example/{repo_id}"

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    model = get_rudalle_model("Malevich", checkpoint_path=fixtures_dir / "dalle_v3" / "pytorch_model.bin", **TINY)
    url = model.push_to_hub("me/tiny-malevich", token="hf_x", private=True)
    assert url.endswith("me/tiny-malevich")
    assert calls["create"] == ("me/tiny-malevich", True, True) and calls["token"] == "hf_x"
    assert calls["files"] == ["config.json", "model.safetensors"]
    assert calls["config"]["hidden_size"] == 64


def test_kandinsky_falls_back_to_the_older_repo(fixtures_dir, offline_hub):
    state = torch.load(fixtures_dir / "dalle_v3" / "pytorch_model.bin", weights_only=True)
    add_to_hub_cache(offline_hub, "sberbank-ai/rudalle-Kandinsky",
                     {"pytorch_model.bin": fixtures_dir / "dalle_v3" / "pytorch_model.bin"})
    model = get_rudalle_model("Kandinsky", cache_dir=offline_hub, **TINY)
    assert torch.equal(model.text_embeddings.weight, state["text_embeddings.weight"].float())
