"""Issue 10, loading and saving: no code runs from any file, every file a model or pipeline folder
names stays inside it, NaN/inf weights are refused, explicit paths win over bundled/Hub names,
offline fails fast, and every save is atomic (interrupts and full disks at every write)."""
from __future__ import annotations

import ast
import errno
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import rudalle_pipe
from conftest import REPO_ROOT, add_to_hub_cache
from rudalle_pipe import DalleModel, get_rudalle_model, get_vae, load_pipeline, save_pipeline
from rudalle_pipe.cli import EXIT_FAILURE, main
from rudalle_pipe.clip import get_clip
from rudalle_pipe.files import UnsafePathError
from rudalle_pipe.hub import read_checkpoint
from rudalle_pipe.realesrgan import get_realesrgan, load_rrdbnet
from rudalle_pipe.tokenizer import YTTMTokenizer
from tiny import tiny_dalle, tiny_pipeline, tiny_upscaler, tiny_vae

PACKAGE = Path(rudalle_pipe.__file__).parent


# ------------------------------------------------------------------------------------------ helpers
class _Evil:
    """Unpickling this creates the folder ``marker``: stands for arbitrary code."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def hostile_pickle(path: Path, marker: Path) -> Path:
    """A torch.save file that runs code (creates ``marker``) when unpickled without weights_only."""
    torch.save({"weight": torch.zeros(2), "payload": _Evil(marker)}, path)
    return path


@pytest.fixture
def oldest_defaults(monkeypatch):
    """The loaders' defaults as in the oldest dependencies setup.cfg allows: torch 2.1-2.5 unpickles
    everything unless told ``weights_only=True``; huggingface_hub 0.34-1.20's
    ``load_state_dict_from_file`` / ``load_torch_model`` default to ``weights_only=False``.
    Records the keyword arguments of every ``torch.load`` call."""
    import huggingface_hub

    real_load = torch.load
    calls: list[dict] = []

    def old_torch_load(*args, **kwargs):
        calls.append(dict(kwargs))
        kwargs.setdefault("weights_only", False)
        return real_load(*args, **kwargs)

    def old_hub_loader(checkpoint_file, map_location=None, weights_only=False, mmap=False, **_):
        return old_torch_load(checkpoint_file, map_location=map_location, weights_only=weights_only)

    monkeypatch.setattr(torch, "load", old_torch_load)
    monkeypatch.setattr(huggingface_hub, "load_state_dict_from_file", old_hub_loader)
    monkeypatch.setattr(huggingface_hub, "load_torch_model", old_hub_loader)
    return calls


@pytest.fixture(scope="module")
def saved_pipe(fixtures_dir, tmp_path_factory) -> Path:
    """A saved tiny pipeline with CLIP and upscaler (copy it before changing it)."""
    tmp = tmp_path_factory.mktemp("saved")
    return save_pipeline(tiny_pipeline(fixtures_dir, tmp), tmp / "pipe")


def copy_of(folder: Path, target: Path) -> Path:
    shutil.copytree(folder, target, symlinks=True)
    return target


def index_naming(folder: Path, shard: str) -> None:
    """Replace ``folder/model.safetensors`` by an index whose every tensor lives in ``shard``."""
    keys = load_file(folder / "model.safetensors").keys()
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {},
                                                                     "weight_map": {k: shard for k in keys}}))


# ------------------------------------------------------------------------- case 1: no code runs
def test_hostile_pickles_never_run_in_any_loader(saved_pipe, tmp_path, oldest_defaults, capsys):
    marker = tmp_path / "pwned"
    bad = hostile_pickle(tmp_path / "evil.bin", marker)

    pipe = copy_of(saved_pipe, tmp_path / "pipe")  # dalle/ index names a pickled pytorch_model.bin
    shutil.copy(bad, pipe / "dalle" / "pytorch_model.bin")
    index_naming(pipe / "dalle", "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"'pytorch_model\.bin' is not a \.safetensors file"):
        load_pipeline(str(pipe))
    with pytest.raises(ValueError, match=r"not a \.safetensors file"):
        get_rudalle_model(str(pipe / "dalle"))
    code = main(["generate", "кот", "--model", str(pipe), "--out", str(tmp_path / "out"), "--no-progress"])
    assert code == EXIT_FAILURE and "not a .safetensors file" in capsys.readouterr().err

    for load in (lambda: read_checkpoint(bad),
                 lambda: get_vae(checkpoint_path=bad),
                 lambda: load_rrdbnet(bad),
                 lambda: get_realesrgan("x4", checkpoint_path=bad, num_feat=8, num_block=1, num_grow_ch=4)):
        with pytest.raises(ValueError):
            load()

    clip = copy_of(saved_pipe / "clip", tmp_path / "clip")
    (clip / "open_clip_model.safetensors").unlink()
    shutil.copy(bad, clip / "open_clip_pytorch_model.bin")
    with pytest.raises(ValueError, match="could not load the CLIP checkpoint"):
        get_clip(f"local-dir:{clip}", None)
    assert not marker.exists()


def test_every_torch_load_passes_weights_only(fixtures_dir, saved_pipe, tmp_path, oldest_defaults):
    """Benign pickled checkpoints still load, and every torch.load call says weights_only=True."""
    vae = tiny_vae()
    torch.save({"state_dict": vae.state_dict()}, tmp_path / "vqgan.ckpt")
    get_vae(checkpoint_path=tmp_path / "vqgan.ckpt", **{k: getattr(vae.config, k) for k in (
        "ch", "ch_mult", "num_res_blocks", "attn_resolutions", "z_channels", "resolution", "n_embed", "embed_dim")})
    torch.save({"params_ema": tiny_upscaler().state_dict()}, tmp_path / "x4.pth")
    load_rrdbnet(tmp_path / "x4.pth")
    get_realesrgan("x4", checkpoint_path=tmp_path / "x4.pth", num_feat=8, num_block=1, num_grow_ch=4)
    get_rudalle_model("Malevich", checkpoint_path=fixtures_dir / "dalle_v3" / "pytorch_model.bin",
                      num_layers=4, hidden_size=64, num_attention_heads=4)
    clip = copy_of(saved_pipe / "clip", tmp_path / "clip")
    state = load_file(clip / "open_clip_model.safetensors")
    (clip / "open_clip_model.safetensors").unlink()
    torch.save(state, clip / "open_clip_pytorch_model.bin")
    loaded = get_clip(f"local-dir:{clip}", None)
    assert all(torch.equal(loaded.model.state_dict()[k], v) for k, v in state.items())
    folder = tmp_path / "dalle"  # a saved generator whose index names a (benign) pickle: refused unread
    tiny_dalle().save_pretrained(folder)
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    index_naming(folder, "pytorch_model.bin")
    with pytest.raises(ValueError, match="not a .safetensors file"):
        DalleModel.from_pretrained(folder)
    assert len(oldest_defaults) >= 5
    assert all(call.get("weights_only") is True for call in oldest_defaults), oldest_defaults


def test_source_never_uses_unsafe_loaders():
    """No huggingface_hub torch loader (weights_only=False in some allowed releases), and every
    torch.load call in the package passes weights_only=True literally."""
    unsafe = {"load_state_dict_from_file", "load_torch_model"}
    for path in sorted(PACKAGE.rglob("*.py")):
        source = path.read_text(encoding="utf-8")
        for node in ast.walk(ast.parse(source)):
            used = {a.name for a in node.names} if isinstance(node, (ast.Import, ast.ImportFrom)) else \
                {node.attr} if isinstance(node, ast.Attribute) else {node.id} if isinstance(node, ast.Name) else set()
            assert not used & unsafe, f"{path}:{node.lineno} uses huggingface_hub.{(used & unsafe).pop()}"
            if isinstance(node, ast.Call) and ast.unparse(node.func) in ("torch.load", "load"):
                flags = {k.arg: k.value for k in node.keywords}
                assert isinstance(flags.get("weights_only"), ast.Constant) and flags["weights_only"].value is True, \
                    f"{path}:{node.lineno}: {ast.unparse(node)}"


# ------------------------------------------------------------------ case 2: a folder is a sandbox
def _sharded_dalle(tmp_path: Path) -> Path:
    model = tiny_dalle()
    model.save_pretrained(tmp_path / "dalle", max_shard_size="20KB")
    return tmp_path / "dalle"


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink"])
def test_index_entries_outside_the_folder_are_refused(tmp_path, how):
    folder = _sharded_dalle(tmp_path)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[0]
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.move(folder / shard, outside / shard)  # a real shard, elsewhere on disk
    if how == "symlink":
        (folder / shard).symlink_to(outside / shard)
        entry = shard
    else:
        entry = f"../elsewhere/{shard}" if how == "dotdot" else str(outside / shard)
        index["weight_map"] = {k: entry if v == shard else v for k, v in index["weight_map"].items()}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(UnsafePathError) as err:
        DalleModel.from_pretrained(folder)
    assert repr(entry) in str(err.value)


def test_pipeline_subfolders_stay_inside(saved_pipe, tmp_path):
    outside = copy_of(saved_pipe, tmp_path / "other")
    for part in ("dalle", "vae", "tokenizer/bpe.model", "upscaler"):
        pipe = copy_of(saved_pipe, tmp_path / part.replace("/", "_"))
        target = pipe / part
        shutil.rmtree(target) if target.is_dir() else target.unlink()
        target.symlink_to(outside / part)
        with pytest.raises(UnsafePathError, match=part.split("/")[-1]):
            load_pipeline(str(pipe))


def _yttm_clip(saved_pipe: Path, tmp_path: Path, tokenizer: str) -> Path:
    clip = copy_of(saved_pipe / "clip", tmp_path / "clip")
    config = json.loads((clip / "open_clip_config.json").read_text())
    config["rudalle_pipe"] = {"tokenizer": tokenizer, "context_length": 8}
    (clip / "open_clip_config.json").write_text(json.dumps(config))
    return clip


@pytest.mark.parametrize("entry", ["/etc/passwd", "../../../../../../etc/passwd", "link.model"])
def test_clip_tokenizer_path_stays_inside(saved_pipe, tmp_path, entry):
    clip = _yttm_clip(saved_pipe, tmp_path, entry)
    (clip / "link.model").symlink_to("/etc/passwd")
    with pytest.raises(UnsafePathError) as err:
        get_clip(f"local-dir:{clip}", None)
    assert repr(entry) in str(err.value) and "root:" not in str(err.value)


@pytest.mark.parametrize("hf_name", ["/etc", "../../outside"])
def test_clip_text_tower_folder_stays_inside(saved_pipe, tmp_path, hf_name):
    clip = copy_of(saved_pipe / "clip", tmp_path / "clip")
    config = json.loads((clip / "open_clip_config.json").read_text())
    config["model_cfg"]["text_cfg"]["hf_model_name"] = hf_name
    (clip / "open_clip_config.json").write_text(json.dumps(config))
    with pytest.raises(UnsafePathError, match="hf_model_name"):
        get_clip(f"local-dir:{clip}", None)


@pytest.mark.slow
def test_bpe_model_reads_are_bounded(tmp_path):
    huge = tmp_path / "huge.model"
    with open(huge, "wb") as f:
        f.truncate(64 * 2**20 + 1)  # sparse: costs no disk
    with pytest.raises(ValueError, match="at most 67108864"):
        YTTMTokenizer.from_file(huge)
    # /dev/zero behind a symlink: refused at once (run apart, with a memory cap, so a regression cannot hang)
    (tmp_path / "zero.model").symlink_to("/dev/zero")
    probe = ("import os, resource, sys\nfrom rudalle_pipe.tokenizer import YTTMTokenizer\n"
             "used = int(open('/proc/self/statm').read().split()[0]) * os.sysconf('SC_PAGE_SIZE')\n"
             "resource.setrlimit(resource.RLIMIT_AS, (used + 2**30, used + 2**30))  # 1 GiB more, at most\n"
             f"try: YTTMTokenizer.from_file({str(tmp_path / 'zero.model')!r})\n"
             "except ValueError as e: print('refused:', e); sys.exit(0)\nsys.exit(1)")
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "not a regular file" in done.stdout, done.stdout + done.stderr


def test_parse_errors_name_file_and_line_without_contents(tmp_path):
    path = tmp_path / "bpe.model"
    path.write_text("2 0\n9601 4\nsecret-token 5\n1 0 2 3\n")
    with pytest.raises(ValueError, match=r"bpe\.model, line 3") as err:
        YTTMTokenizer.from_file(path)
    assert "secret" not in str(err.value)


def test_json_files_are_bounded(tmp_path):
    folder = tiny_dalle()
    folder.save_pretrained(tmp_path / "dalle")
    with open(tmp_path / "dalle" / "config.json", "wb") as f:
        f.truncate(8 * 2**20 + 1)
    with pytest.raises(ValueError, match="at most"):
        DalleModel.from_pretrained(tmp_path / "dalle")


def _blob_cache(cache: Path, repo_id: str, folder: Path) -> Path:
    """A Hugging Face cache laid out like hf_hub_download leaves it: snapshot files link to ../../blobs/."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = "0" * 40
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for i, file in enumerate(sorted(p for p in folder.rglob("*") if p.is_file())):
        blob = repo / "blobs" / f"{i:064x}"
        shutil.copy(file, blob)
        link = snapshot / file.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(Path(*[".."] * (len(link.relative_to(snapshot).parts) + 1), "blobs", blob.name))
    return snapshot


def test_hub_snapshot_with_blob_links_loads_but_links_out_are_refused(offline_hub, tmp_path):
    folder = _sharded_dalle(tmp_path)
    snapshot = _blob_cache(offline_hub, "someone/tiny-dalle", folder)
    model = get_rudalle_model("hf-hub:someone/tiny-dalle")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), tiny_dalle().state_dict().values()))
    shard = sorted(p.name for p in snapshot.glob("*.safetensors"))[0]
    (tmp_path / "outside.safetensors").write_bytes((snapshot / shard).read_bytes())
    (snapshot / shard).unlink()
    (snapshot / shard).symlink_to(tmp_path / "outside.safetensors")
    with pytest.raises(UnsafePathError, match=repr(shard)):
        get_rudalle_model("hf-hub:someone/tiny-dalle")


def test_pipeline_in_a_hub_snapshot_loads(saved_pipe, tmp_path):
    snapshot = _blob_cache(tmp_path / "cache", "someone/tiny-pipeline", saved_pipe)
    assert (snapshot / "dalle" / "config.json").is_symlink()
    loaded = load_pipeline(str(snapshot))
    assert loaded.name == "tiny" and loaded.clip is not None and loaded.upscaler is not None
    link = snapshot / "vae" / "model.safetensors"  # now a link out of the repo's cache folder
    shutil.copy(link, tmp_path / "outside.safetensors")
    link.unlink()
    link.symlink_to(tmp_path / "outside.safetensors")
    with pytest.raises(UnsafePathError, match="'model.safetensors'"):
        load_pipeline(str(snapshot))


# -------------------------------------------------------------------- case 6: NaN/inf refused
def _poison(path: Path, key_part: str, value: float) -> str:
    state = load_file(path)
    key = sorted(k for k in state if key_part in k and state[k].is_floating_point())[0]
    state[key] = state[key].clone()
    state[key].view(-1)[0] = value
    save_file(state, str(path))
    return key


@pytest.mark.parametrize("part,loader", [
    ("dalle", lambda p: DalleModel.from_pretrained(p / "dalle")),
    ("vae", lambda p: load_pipeline(str(p))),
    ("upscaler", lambda p: load_pipeline(str(p))),
    ("clip", lambda p: get_clip(f"local-dir:{p / 'clip'}", None)),
])
def test_non_finite_weights_are_refused_by_name(saved_pipe, tmp_path, part, loader):
    pipe = copy_of(saved_pipe, tmp_path / "pipe")
    file = "open_clip_model.safetensors" if part == "clip" else "model.safetensors"
    key = _poison(pipe / part / file, "weight", float("nan") if part != "vae" else float("inf"))
    with pytest.raises(ValueError, match="NaN/inf") as err:
        loader(pipe)
    assert repr(key) in str(err.value)


def test_non_finite_original_checkpoints_are_refused(tmp_path):
    state = tiny_upscaler().state_dict()
    state["conv_first.weight"][0, 0, 0, 0] = float("inf")
    torch.save({"params_ema": state}, tmp_path / "x4.pth")
    with pytest.raises(ValueError, match="'conv_first.weight'.*NaN/inf"):
        load_rrdbnet(tmp_path / "x4.pth")
    model = tiny_dalle()
    model.save_pretrained(tmp_path / "dalle")
    key = _poison(tmp_path / "dalle" / "model.safetensors", "weight", 1e6)  # finite in fp32, inf in fp16
    DalleModel.from_pretrained(tmp_path / "dalle")
    with pytest.raises(ValueError, match=f"'{key}'.*float16"):
        DalleModel.from_pretrained(tmp_path / "dalle", dtype=torch.float16)


# ---------------------------------------------------------- case 8: explicit paths win over names
def test_a_local_folder_wins_over_the_bundled_name(fixtures_dir, tmp_path, monkeypatch, caplog):
    from rudalle_pipe.cli import _resolve_model

    monkeypatch.chdir(tmp_path)
    save_pipeline(tiny_pipeline(fixtures_dir, tmp_path, clip=False, upscaler=False), "demo")
    with caplog.at_level("WARNING", logger="rudalle_pipe"):
        loaded = load_pipeline("demo", clip=False, upscaler=False)
    assert loaded.name == "tiny" and loaded.dalle.config == tiny_dalle().config
    assert "using the folder" in caplog.text
    assert _resolve_model("demo").kind == "directory"
    assert load_pipeline("./demo", clip=False, upscaler=False).name == "tiny"
    with pytest.raises(ValueError, match="is a path"):
        load_pipeline("./missing")


def test_a_local_generator_folder_wins_over_a_preset(offline_hub, tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    tiny_dalle().save_pretrained("Malevich")
    with caplog.at_level("WARNING", logger="rudalle_pipe"):
        model = get_rudalle_model("Malevich")
    assert model.config == tiny_dalle().config and "using the folder" in caplog.text
    with pytest.raises(ValueError, match="saved model folder"):  # not silently ignored
        get_rudalle_model("./Malevich", pretrained=False)


# ---------------------------------------------------------------------- case 9: offline is fast
class _RefusingServer:
    """A loopback TCP server that accepts and at once closes every connection, counting them."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self.sock.close()


def _offline_run(tmp_path: Path, body: str) -> tuple[subprocess.CompletedProcess, int]:
    """Run ``body`` in a fresh interpreter whose Hub endpoint is a loopback server that refuses
    every request, with an empty cache and HF_HUB_OFFLINE unset (huggingface_hub reads HF_ENDPOINT
    at import). ``body`` runs after torch and the package are imported and prints its own duration
    on stdout (benchmarks/offline_failure.py reports that time; tests only count connections)."""
    server = _RefusingServer()
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_ENDPOINT=f"http://127.0.0.1:{server.port}", HF_HUB_CACHE=str(tmp_path / "cache"),
               HF_HOME=str(tmp_path / "home"))
    (tmp_path / "cache").mkdir()
    script = ("import sys, time\nimport torch, open_clip\nimport rudalle_pipe.cli, rudalle_pipe.clip\n"
              "start = time.monotonic()\n" + body)
    try:
        done = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, env=env, capture_output=True,
                              text=True, timeout=300)
    finally:
        server.close()
    return done, server.connections


@pytest.mark.slow
def test_offline_generate_fails_fast_with_one_line(tmp_path):
    done, connections = _offline_run(tmp_path, (
        f"code = rudalle_pipe.cli.main(['generate', 'кот', '--model', 'Malevich', '--out', {str(tmp_path / 'o')!r}])\n"
        "print(time.monotonic() - start)\nsys.exit(code)"))
    assert done.returncode == EXIT_FAILURE, done.stderr
    assert done.stderr.count("\n") == 1, done.stderr
    assert "'bpe.model'" in done.stderr and "hf download shonenkov/rudalle-utils bpe.model" in done.stderr
    assert "could not be reached" in done.stderr
    assert connections <= 2  # no retries; the wall time is measured by benchmarks/offline_failure.py


@pytest.mark.slow
def test_offline_clip_fails_fast(tmp_path):
    """open_clip and transformers call huggingface_hub themselves: they are switched to the cache too."""
    done, connections = _offline_run(tmp_path, (
        "try:\n    rudalle_pipe.clip.get_clip()\nexcept rudalle_pipe.hub.WeightsNotFoundError as err:\n"
        "    print(time.monotonic() - start)\n    print(err, file=sys.stderr)\n"))
    assert done.returncode == 0 and "could not be reached" in done.stderr, done.stderr
    assert "hf download laion/CLIP-ViT-B-32-xlm-roberta-base-laion5B-s13B-b90k" in done.stderr
    assert connections <= 2  # no retries; the time is measured by benchmarks/offline_clip.py (offline)


# ------------------------------------------------------------------------- atomic saves
class _Faults:
    """Counts the writes of a save (file writes, fsyncs, safetensors files, renames) and fails the Nth."""

    def __init__(self, monkeypatch, fail_at: int | None, error: BaseException | None) -> None:
        import safetensors.torch

        self.count, self.fail_at, self.error = 0, fail_at, error
        for module, name in ((os, "fsync"), (os, "replace"), (os, "rename"), (safetensors.torch, "save_file")):
            monkeypatch.setattr(module, name, self._wrap(getattr(module, name)))

    def _wrap(self, real):
        def wrapper(*args, **kwargs):
            self.count += 1
            if self.count == self.fail_at:
                raise self.error
            return real(*args, **kwargs)
        return wrapper


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("error", [KeyboardInterrupt(), OSError(errno.ENOSPC, "No space left on device")],
                         ids=["interrupt", "disk-full"])
@pytest.mark.slow
def test_save_pipeline_is_atomic_at_every_write(fixtures_dir, tmp_path, monkeypatch, error):
    pipe = tiny_pipeline(fixtures_dir, tmp_path)
    with monkeypatch.context() as m:
        counter = _Faults(m, None, None)
        save_pipeline(pipe, tmp_path / "reference")
    reference, writes = _tree(tmp_path / "reference"), counter.count
    assert writes >= 10
    for n in range(1, writes + 1):
        target = tmp_path / f"run{n}"
        with monkeypatch.context() as m:
            _Faults(m, n, error)
            try:
                save_pipeline(pipe, target)
            except type(error):
                pass
            else:  # only a best-effort fsync of a folder may swallow the error, and the save is complete
                assert isinstance(error, OSError) and _tree(target) == reference, n
        assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")], n
        if target.exists():  # failed after the final rename (syncing the parent folder): complete, kept
            assert _tree(target) == reference, n
            with pytest.raises(FileExistsError):  # the rerun: a clear error, nothing overwritten
                save_pipeline(pipe, target)
        else:
            save_pipeline(pipe, target)  # the rerun succeeds and gives the same bytes
        assert _tree(target) == reference, n
        shutil.rmtree(target)
    loaded = load_pipeline(str(tmp_path / "reference"))
    assert all(torch.equal(a, b) for a, b in zip(loaded.dalle.state_dict().values(), pipe.dalle.state_dict().values()))


def _save_clip(pipe, target: Path) -> None:
    from rudalle_pipe.clip import save_clip

    save_clip(pipe.clip, target)


@pytest.mark.parametrize("save", [
    lambda pipe, target: pipe.dalle.save_pretrained(target, max_shard_size="20KB"),
    _save_clip,
    lambda pipe, target: pipe.tokenizer.save(target),
], ids=["save_pretrained", "save_clip", "tokenizer"])
def test_each_save_is_atomic_on_its_own(fixtures_dir, tmp_path, monkeypatch, save):
    """save_pretrained (used by finetune too), save_clip and the BPE writer, each at every write:
    the target is absent (or, for a file, the previous one) or complete, and a rerun is identical."""
    pipe = tiny_pipeline(fixtures_dir, tmp_path, upscaler=False)
    with monkeypatch.context() as m:
        counter = _Faults(m, None, None)
        save(pipe, tmp_path / "reference")
    snapshot = (lambda p: _tree(p) if p.is_dir() else p.read_bytes())
    reference, writes = snapshot(tmp_path / "reference"), counter.count
    assert writes >= 2  # at least an fsync and a rename: written under a temporary name, then renamed
    for n in range(1, writes + 1):
        target = tmp_path / f"run{n}"
        if not (tmp_path / "reference").is_dir():
            target.write_bytes(b"previous")
        with monkeypatch.context() as m:
            _Faults(m, n, KeyboardInterrupt())
            try:
                save(pipe, target)
            except KeyboardInterrupt:
                pass
        assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")], n
        if target.is_file():
            assert target.read_bytes() in (b"previous", reference), n
            save(pipe, target)
        elif not target.exists():
            save(pipe, target)
        assert snapshot(target) == reference, n
