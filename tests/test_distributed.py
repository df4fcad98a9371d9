"""Data-parallel training on 2 CPU processes (gloo) against 1 process with the concatenated batch.

Each launch is a real multi-process run (``torchrun`` or ``accelerate launch --multi_gpu``, never
``--cpu``, which silently starts one process); every test asserts the world size it got. Temporary
files, caches and torch's own scratch folders go under pytest's ``tmp_path``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
ACCELERATE_2 = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]
TORCHRUN_2 = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2"]


def launch_env(tmp_path: Path) -> dict[str, str]:
    """The environment of a launched run: this checkout's code, offline, every scratch folder under tmp_path."""
    scratch = tmp_path / "scratch"
    scratch.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "RANK", "WORLD_SIZE",
                                                                     "LOCAL_RANK", "MASTER_"))}
    env.update(PYTHONPATH=str(REPO), TMPDIR=str(scratch), HF_HOME=str(scratch / "hf"), HF_HUB_OFFLINE="1",
               TORCHINDUCTOR_CACHE_DIR=str(scratch / "inductor"), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    return env


def run(command: list[str], tmp_path: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    done = subprocess.run(command, cwd=tmp_path, env=launch_env(tmp_path), capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, f"{command} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def train_args(tmp_path: Path, name: str, launcher: list[str], worker_args: list[str]) -> tuple[dict, dict]:
    """Run tests/dist_train_worker.py under ``launcher``; its result.json and final weights."""
    out = tmp_path / name
    out.mkdir()
    run([*launcher, str(TESTS / "dist_train_worker.py"), str(out), *worker_args], tmp_path)
    result = json.loads((out / "result.json").read_text())
    return result, torch.load(out / "weights.pt")


def train(tmp_path: Path, name: str, launcher: list[str], batch_size: int, accumulation: int) -> tuple[dict, dict]:
    return train_args(tmp_path, name, launcher, [str(batch_size), str(accumulation)])


@pytest.mark.slow
def test_two_processes_train_like_one_with_the_concatenated_batch(tmp_path):
    one, one_weights = train(tmp_path, "one", [sys.executable], batch_size=4, accumulation=1)
    assert one["world_size"] == 1
    runs = {"torchrun": train(tmp_path, "torchrun", TORCHRUN_2, batch_size=2, accumulation=1),
            # 2 processes x 2 accumulated shards of 1 = the same 4 pairs per optimizer step
            "accelerate+accumulation": train(tmp_path, "accelerate", ACCELERATE_2, batch_size=1, accumulation=2)}
    for label, (result, weights) in runs.items():
        assert result["world_size"] == 2, f"{label} started {result['world_size']} process(es), not 2"
        assert len(result["losses"]) == len(one["losses"]) >= 5
        assert result["losses"] == pytest.approx(one["losses"], abs=1e-5), label
        assert weights.keys() == one_weights.keys()
        for key, value in weights.items():
            torch.testing.assert_close(value, one_weights[key], atol=1e-5, rtol=0, msg=f"{label}: {key}")
    assert one["losses"][-1] < one["losses"][0]  # it trained
    # only the main process wrote the loss log: one row per step, no duplicates from the second rank
    rows = (tmp_path / "torchrun" / "run" / "loss_log.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows] == ["step", *map(str, range(1, 7))]


def test_shards_split_the_global_batch_and_keep_single_process_batches():
    from rudalle_pipe.train.common import Shard, batch_indices

    # one process sees what it always saw: part 0 of 1 is the whole batch, with the old seed
    assert torch.equal(Shard().indices(5, 30, 4, seed=2), batch_indices(5, 30, 4, 2))
    assert Shard().seed(2, 5) == 2 * 1_000_003 + 5
    # 2 processes x 2 micro-steps of 3 = one process's batch of 12, in order micro-major
    shards = [Shard(rank, 2, micro, 2) for micro in range(2) for rank in range(2)]
    assert [s.part for s in shards] == [0, 1, 2, 3]
    assert torch.equal(torch.cat([s.indices(7, 50, 3, seed=1) for s in shards]), batch_indices(7, 50, 12, 1))
    assert len({s.seed(1, 7) for s in shards}) == 4  # every shard draws its own random choices
    a, b = Shard(0, 2).generator(1, 7), Shard(1, 2).generator(1, 7)
    assert not torch.equal(torch.rand(4, generator=a), torch.rand(4, generator=b))
    with pytest.raises(ValueError, match="rank"):
        Shard(2, 2)
    with pytest.raises(ValueError, match="micro"):
        Shard(0, 1, micro=1, accumulation=1)


def test_gradient_accumulation_is_validated_and_must_match_the_accelerator(tmp_path):
    from types import SimpleNamespace

    from rudalle_pipe.train.common import LoopConfig, run_training

    with pytest.raises(ValueError, match="gradient_accumulation_steps"):
        LoopConfig(steps=2, gradient_accumulation_steps=0)
    config = LoopConfig(steps=2, gradient_accumulation_steps=2)
    with pytest.raises(ValueError, match="accumulates 1 steps but gradient_accumulation_steps=2"):
        run_training("x", torch.nn.Linear(2, 2), lambda m, b: m(b).sum(), lambda s, shard: torch.ones(1, 2), config,
                     tmp_path, accelerator=SimpleNamespace(gradient_accumulation_steps=1))


MIXED_PRECISION_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from tiny import tiny_dalle
from rudalle_pipe.finetune import finetune
from rudalle_pipe.train.common import LoopConfig, make_accelerator
make_accelerator(LoopConfig(steps=1, mixed_precision="bf16"))  # as a first finetune(mixed_precision="bf16") does
try:
    finetune(tiny_dalle(), None, None, {missing!r}, out_dir={out!r}, steps=1, mixed_precision="no")
except ValueError as err:
    print("REFUSED:", err)
"""


@pytest.mark.slow
def test_a_second_finetune_with_another_mixed_precision_is_refused_early(tmp_path):
    """accelerate fixes mixed_precision once per process; the second finetune() names both values and
    stops before it reads any data (the data folder does not even exist)."""
    script = MIXED_PRECISION_SCRIPT.format(tests=str(TESTS), missing=str(tmp_path / "no-such-data"),
                                           out=str(tmp_path / "out"))
    done = run([sys.executable, "-c", script], tmp_path)
    assert "REFUSED: mixed_precision='no' asked" in done.stdout
    assert "mixed_precision='bf16'" in done.stdout and "new Python process" in done.stdout
    assert not (tmp_path / "out").exists()


EXAMPLES = REPO / "examples" / "accelerate"


def test_example_accelerate_configs_parse_and_name_real_settings():
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    from rudalle_pipe import dalle
    from rudalle_pipe.cli import build_parser

    lora = load_config_from_file(str(EXAMPLES / "multi_gpu_lora_kandinsky.yaml"))
    assert lora.distributed_type == DistributedType.MULTI_GPU and lora.num_processes == 8
    assert lora.mixed_precision == "fp16" and not lora.use_cpu
    # the command in its header parses with this package's finetune flags
    header = [line.lstrip("# ").rstrip(" \\") for line in (EXAMPLES / "multi_gpu_lora_kandinsky.yaml").read_text()
              .splitlines()[1:4]]
    argv = " ".join(header).split("-m rudalle_pipe ", 1)[1].split()
    args = build_parser().parse_args(argv)
    assert (args.lora_rank, args.mixed_precision, args.batch_size, args.gradient_checkpointing) == (16, "fp16", 2, True)
    fsdp = load_config_from_file(str(EXAMPLES / "fsdp_kandinsky.yaml"))
    assert fsdp.distributed_type == DistributedType.FSDP and fsdp.num_processes == 8
    assert fsdp.fsdp_config["fsdp_sharding_strategy"] == "FULL_SHARD"
    assert isinstance(getattr(dalle, fsdp.fsdp_config["fsdp_transformer_layer_cls_to_wrap"]), type)


@pytest.mark.slow
def test_the_memory_numbers_in_the_examples_are_estimate_memorys():
    from dataclasses import replace

    from rudalle_pipe import DalleConfig
    from rudalle_pipe.finetune import FinetuneConfig, estimate_memory
    from rudalle_pipe.registry import PRETRAINED

    kandinsky = DalleConfig(**PRETRAINED["Kandinsky"].config)
    lora = FinetuneConfig(lora_rank=16, train=("attention", "mlp"), gradient_checkpointing=True)
    text = (EXAMPLES / "multi_gpu_lora_kandinsky.yaml").read_text()
    for b in (1, 2, 4, 8):
        assert f"{b}: {estimate_memory(kandinsky, replace(lora, batch_size=b))['total_gib']:.1f} GiB" in text
    full = estimate_memory(kandinsky, FinetuneConfig(gradient_checkpointing=True))
    text = (EXAMPLES / "fsdp_kandinsky.yaml").read_text()
    assert f"total {full['total_gib']:.1f} GiB" in text and f"optimizer {full['optimizer_gib']:.2f} GiB" in text
    per_gpu = (full["trainable_weights_grads_gib"] + full["optimizer_gib"]) / 8 + full["activations_gib"]
    assert f"= {per_gpu:.1f} GiB per GPU" in text
    # the README's table: one row per model and setting, batch 1, 2, 4, 8
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    settings = {"everything (AdamW)": FinetuneConfig(gradient_checkpointing=True),
                "everything (Adafactor)": FinetuneConfig(gradient_checkpointing=True, optimizer="adafactor"),
                "LoRA r=16 on attention + MLP": lora}
    for model, label in (("Malevich", "Malevich 1.3B"), ("Kandinsky", "Kandinsky 12B")):
        config = DalleConfig(**PRETRAINED[model].config)
        for what, options in settings.items():
            cells = " | ".join(f"{estimate_memory(config, replace(options, batch_size=b))['total_gib']:.1f}"
                               for b in (1, 2, 4, 8))
            assert f"| {label}, {what} | {cells} |" in readme


def test_run_training_refuses_a_sharding_accelerator_before_any_work(tmp_path):
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from rudalle_pipe.train.common import LoopConfig, run_training

    fake = SimpleNamespace(gradient_accumulation_steps=1, distributed_type=DistributedType.FSDP)
    with pytest.raises(NotImplementedError, match="FSDP here.*--multi_gpu"):
        run_training("x", torch.nn.Linear(2, 2), lambda m, b: m(b).sum(), lambda s, shard: torch.ones(1, 2),
                     LoopConfig(steps=1), tmp_path / "run", accelerator=fake)
    assert not (tmp_path / "run" / "loss_log.csv").exists()


@pytest.mark.slow
def test_the_fsdp_config_on_two_cpu_processes_falls_back_to_plain_data_parallel(tmp_path):
    """What accelerate 1.15 does with the FSDP example on a machine without a GPU: FSDP needs a CUDA/XPU/NPU/...
    device (its plugin asks for the current device), and an Accelerator(cpu=True) is MULTI_CPU, so the two
    processes train data-parallel without sharding, and give the one-process losses."""
    config = (EXAMPLES / "fsdp_kandinsky.yaml").read_text()
    for old, new in (("num_processes: 8", "num_processes: 2"), ("mixed_precision: bf16", "mixed_precision: 'no'"),
                     ("fsdp_cpu_ram_efficient_loading: true", "fsdp_cpu_ram_efficient_loading: false"),
                     ("fsdp_sync_module_states: true", "fsdp_sync_module_states: false")):
        assert old in config
        config = config.replace(old, new)
    (tmp_path / "fsdp2.yaml").write_text(config)
    launcher = [str(BIN / "accelerate"), "launch", "--config_file", str(tmp_path / "fsdp2.yaml"),
                "--main_process_port", "0"]
    two, _ = train_args(tmp_path, "fsdp", launcher, ["2", "1", "none"])
    one, _ = train_args(tmp_path, "one", [sys.executable], ["4", "1", "none"])
    assert two["world_size"] == 2 and two["distributed_type"] == "MULTI_CPU"
    assert two["losses"] == pytest.approx(one["losses"], abs=1e-5)


@pytest.mark.slow
def test_the_finetune_command_runs_unchanged_under_accelerate_launch(tmp_path):
    """`accelerate launch ... -m rudalle_pipe finetune` with the same flags as one process: 2 processes (one
    RNG file each), one writer of the loss log, the finished model in final/."""
    from PIL import Image

    data = tmp_path / "data"
    data.mkdir()
    rows = ["file,caption"]
    for i, (colour, caption) in enumerate([((230, 40, 40), "красный круг"), ((40, 60, 230), "синий квадрат")] * 2):
        Image.new("RGB", (48, 48), colour).save(data / f"{i}.png")
        rows.append(f"{i}.png,{caption}")
    (data / "captions.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    done = run([*ACCELERATE_2, "-m", "rudalle_pipe", "finetune", str(data), "--out", str(tmp_path / "run"),
                "--model", "demo", "--steps", "3", "--batch-size", "1", "--gradient-accumulation-steps", "2",
                "--checkpoint-every", "2", "--lr", "1e-3", "--no-progress"], tmp_path)
    out = tmp_path / "run"
    assert done.stdout.count("finetuned demo") == 1, done.stdout  # one report, from the main process
    assert sorted(p.name for p in (out / "checkpoint").glob("random_states_*.pkl")) == [
        "random_states_0.pkl", "random_states_1.pkl"]  # two processes really trained
    # log_every defaults to 10: one row at the last step, written once (not once per process)
    assert [line.split(",")[0] for line in (out / "loss_log.csv").read_text().splitlines()[1:]] == ["3"]
    assert (out / "pipeline" / "pipeline.json").is_file()  # exported once, by the main process
    assert (out / "final").is_dir() and json.loads((out / "result.json").read_text())["steps"] == 3
    assert json.loads((out / "finetune.json").read_text())["settings"]["gradient_accumulation_steps"] == 2


@pytest.mark.slow
def test_the_demo_training_command_runs_unchanged_under_accelerate_launch(tmp_path):
    """`accelerate launch ... -m rudalle_pipe.train demo --quick`: all five stages on 2 processes (the tokenizer
    built once, each stage's final/ complete before the next stage reads it, the VQGAN's unused codebook
    tolerated during its autoencoder warm-up), and one pipeline."""
    out = tmp_path / "demo"
    run([*ACCELERATE_2, "-m", "rudalle_pipe.train", "demo", "--out", str(out), "--quick", "--no-progress"], tmp_path,
        timeout=600)
    assert (out / "pipeline" / "pipeline.json").is_file()
    for stage in ("vqgan", "dalle", "clip", "realesrgan"):
        assert (out / stage / "final").is_dir(), stage
        assert sorted(p.name for p in (out / stage / "checkpoint").glob("random_states_*.pkl")) == [
            "random_states_0.pkl", "random_states_1.pkl"], stage
        steps = [line.split(",")[0] for line in (out / stage / "loss_log.csv").read_text().splitlines()[1:]]
        assert steps and len(steps) == len(set(steps)), stage  # one writer
