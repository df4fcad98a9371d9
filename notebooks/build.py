"""Write the notebooks from the cell sources below (run after editing: ``python notebooks/build.py``).

Keeping the sources here keeps the notebooks reviewable as code and free of stored outputs; a test
checks that the committed ``.ipynb`` files match this script.

**Where the project lives** is :data:`REPO_URL`, the one place to change it: the Colab badges, the
install cells and ``setup.cfg``'s ``url`` all come from it (``python notebooks/build.py`` rewrites that
line of setup.cfg too, and a test checks that they agree). The PyPI name comes from ``setup.cfg``.
"""
from __future__ import annotations

import configparser
import re
import sys
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent
SETUP_CFG = HERE.parent / "setup.cfg"
REPO_URL = "https://github.com/rudalle-pipe/rudalle_pipe"  # THE place to change where the project is published


def _pypi_name() -> str:
    config = configparser.ConfigParser()
    config.read(SETUP_CFG, encoding="utf-8")
    return config["metadata"]["name"]


PYPI_NAME = _pypi_name()  # the name the package is (to be) published under on PyPI


def badge(name: str) -> str:
    url = f"https://colab.research.google.com/github/{REPO_URL.removeprefix('https://github.com/')}/blob/main/notebooks/{name}"
    return f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]({url})"


INSTALL = f'''# Install the package where it is missing (in CI it is already installed): from PyPI by its name,
# else (not published there yet) from the repository.
import importlib.util
import subprocess
import sys

if importlib.util.find_spec("rudalle_pipe") is None:
    pip = [sys.executable, "-m", "pip", "install", "-q"]
    if subprocess.call(pip + ["{PYPI_NAME}[train]"]) != 0:
        print("{PYPI_NAME} is not on PyPI: installing it from {REPO_URL}")
        subprocess.check_call(pip + ["{PYPI_NAME}[train] @ git+{REPO_URL}"])'''

CHOOSE = '''# Which model: the MODEL parameter (environment variable RUDALLE_PIPE_MODEL, as CI sets it), else
# Malevich from the Hugging Face Hub when there is a GPU and the Hub answers, else the embedded demo
# model, which needs neither. The reason for the demo is printed.
import os

import torch
from huggingface_hub import HfApi, constants

from rudalle_pipe import list_pretrained

MODEL = os.environ.get("RUDALLE_PIPE_MODEL", "auto")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def why_not_malevich() -> str | None:
    """Why Malevich cannot run here (None when it can): it needs a GPU and the Hub."""
    if DEVICE != "cuda":
        return "no GPU (on Colab: Runtime > Change runtime type > T4 GPU)"
    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    try:
        HfApi().model_info("sberbank-ai/rudalle-Malevich", timeout=10)
    except Exception as err:  # no network, a proxy, the Hub down: say which
        return f"the Hugging Face Hub did not answer ({type(err).__name__}: {str(err)[:120]})"
    return None


if MODEL == "auto":
    reason = why_not_malevich()
    MODEL = "demo" if reason else "Malevich"
    if reason:
        print(f"using the embedded demo model, not Malevich: {reason}")
DEMO = MODEL not in list_pretrained("dalle")  # the demo family (bundled or a local directory), not a Hub model
print(f"model: {MODEL}, device: {DEVICE}")'''

# What the Malevich chain downloads once into the Hugging Face cache: `python benchmarks/download_sizes.py`
# computes it from the original checkpoints' key lists (../shared/fixtures/manifests) and RUDALLE_FACTS.md.
DOWNLOADS = """**What Malevich downloads** (once, into the Hugging Face cache; tensor bytes of the original files, computed
from their key lists by `benchmarks/download_sizes.py` in the repository):

| file | parameters | size |
|---|---|---|
| generator `pytorch_model_v3.bin` (fp16) | 1310.4M | 2,625 MB |
| VQGAN `vqgan.gumbelf8-sber.model.ckpt` (fp32) | 69.0M | 276 MB (the file may hold more) |
| Real-ESRGAN `RealESRGAN_x4.pth` | 16.7M | 67 MB in fp32 (33 MB if stored in fp16) |
| CLIP reranker (open_clip `xlm-roberta-base-ViT-B-32`) | not computed here | see the Hub cache after the first run |

About 3 GB before the CLIP. Without a GPU, or when the Hub does not answer, the notebook says so and
uses the embedded demo model instead."""


def quickstart() -> list:
    return [
        new_markdown_cell(f"""# rudalle_pipe: quickstart

{badge("quickstart.ipynb")}

Text to pictures the ruDALL-E way: **generate** candidates with the transformer, **rerank** them with
CLIP, **upscale** the best with Real-ESRGAN. On a GPU with Hub access this notebook loads ruDALL-E
Malevich (1.3B, fp16); anywhere else it runs the tiny demo model that ships inside the package (it draws
coloured shapes on plain backgrounds, offline, on a CPU).

""" + DOWNLOADS),
        new_code_cell(INSTALL),
        new_code_cell(CHOOSE),
        new_markdown_cell("""## Load the chain

`load_pipeline` returns the tokenizer, generator, VQGAN, CLIP reranker and x4 upscaler together. The
generator goes to the GPU in fp16 (about 2.6 GB for Malevich); the other models stay fp32."""),
        new_code_cell('''from rudalle_pipe import load_pipeline

pipe = load_pipeline(MODEL, device=DEVICE, dtype=torch.float16 if DEVICE == "cuda" else torch.float32)
cfg = pipe.dalle.config
print(f"{sum(p.numel() for p in pipe.dalle.parameters()) / 1e6:.1f}M parameters, "
      f"{cfg.image_tokens_per_dim}x{cfg.image_tokens_per_dim} codes from a {cfg.image_vocab_size}-code VQGAN")'''),
        new_markdown_cell("""## Generate

Each image is sampled code by code. Two filters decide which codes may be drawn at every step:

* **top-k** keeps the *k* most likely codes;
* **top-p** (nucleus) keeps the smallest set whose probabilities add up to *p*.

Lower values give safer, more uniform pictures; higher ones give variety and more failures. The
original authors recommend the pairs **2048 / 0.995**, **1536 / 0.99** and **1024 / 0.99** for
Malevich. The demo model has only 512 codes, so *k* is capped at the vocabulary. `seed` makes the
run reproducible: image *i* uses seed + *i*, whatever the batch size."""),
        new_code_cell('''from rudalle_pipe import generate_images, show

TEXT = "большой красный круг в центре на сером фоне" if DEMO else "рыжий котик"
TOP_K, TOP_P = min(2048, cfg.image_vocab_size), 0.995
out = generate_images(TEXT, pipe.tokenizer, pipe.dalle, pipe.vae, top_k=TOP_K, top_p=TOP_P,
                      num_images=16 if DEMO else 8, seed=42)
show(out.images, nrow=8);'''),
        new_markdown_cell("""## Rerank with CLIP

`cherry_pick_by_clip` scores every candidate against the text (cosine similarity) and keeps the best."""),
        new_code_cell('''from rudalle_pipe import cherry_pick_by_clip

best = cherry_pick_by_clip(out.images, TEXT, pipe.clip, top_n=4)
print("best candidates:", best.indices, "scores:", [round(s, 3) for s in best.scores])
show(best.images);'''),
        new_markdown_cell("""## Upscale

Real-ESRGAN x4 works in tiles, so memory stays bounded whatever the picture size."""),
        new_code_cell('''from rudalle_pipe import super_resolution

big = super_resolution(best.images, pipe.upscaler)
grid = show(big, nrow=4, save_dir="quickstart_out", overwrite=True)
print("upscaled to", big[0].size, "- saved in quickstart_out/")'''),
        new_markdown_cell("""## Next

* `demo_offline.ipynb`: how top-k, top-p and temperature change the pictures, and the rerank scores.
* `finetune.ipynb`: teach the model your own pictures.
* The same chain from a terminal: `rudalle-pipe generate "рыжий котик" --model Malevich`."""),
    ]


def demo_offline() -> list:
    return [
        new_markdown_cell(f"""# The embedded demo model, offline, on a CPU

{badge("demo_offline.ipynb")}

The package ships a complete tiny model family trained by the project itself (tokenizer, VQGAN,
generator, CLIP and x4 Real-ESRGAN, about 10 MB). It draws one coloured shape on a plain background,
described in Russian, e.g. *большая жёлтая звезда слева на сером фоне*. Nothing here needs a GPU or the
network. An automatic detector (`rudalle_pipe.shapes.detect`) reads the shape, colour, size, position
and background back from every picture, so we can *measure* what the sampling settings do."""),
        new_code_cell(INSTALL),
        new_code_cell('''import os
import time

import torch

from rudalle_pipe import cherry_pick_by_clip, generate_images, load_pipeline, shapes, show, super_resolution

MODEL = os.environ.get("RUDALLE_PIPE_MODEL", "demo")  # a demo-family pipeline: "demo" or a directory
pipe = load_pipeline(MODEL)
TEXT = "большая жёлтая звезда слева на сером фоне"
target = shapes.parse_caption(TEXT)
V = pipe.dalle.config.image_vocab_size  # image codes (512 for the demo model)
print(target)'''),
        new_code_cell('''def accuracy(images) -> float:
    """Fraction of images whose five detected attributes all match the text."""
    return shapes.score(images, [target] * len(images))["all"]


def sample(n=8, **settings):
    return generate_images(TEXT, pipe.tokenizer, pipe.dalle, pipe.vae, num_images=n, seed=0,
                           progress=False, **settings)'''),
        new_markdown_cell("""## top-k

`top_k=1` is greedy decoding: the single most likely code every time, so every seed gives the same
picture. Larger *k* lets more codes through."""),
        new_code_cell('''rows = []
for k in (1, 8, 64, V):
    out = sample(top_k=k, top_p=1.0)
    rows += out.images
    print(f"top_k={k:3d}: all attributes right in {accuracy(out.images):.0%} of 8")
show(rows, nrow=8);'''),
        new_markdown_cell("""## top-p and temperature

Temperature divides the logits before the filters: below 1 sharpens the distribution, above 1
flattens it. High temperature with no nucleus filter produces noise; a top-p filter reins it in."""),
        new_code_cell('''rows = []
for temperature, top_p in ((0.7, 1.0), (1.0, 1.0), (1.5, 1.0), (1.5, 0.9)):
    out = sample(top_k=V, top_p=top_p, temperature=temperature)
    rows += out.images
    print(f"temperature={temperature}, top_p={top_p}: all attributes right in {accuracy(out.images):.0%}; "
          f"mean perplexity {sum(out.perplexities) / len(out.perplexities):.2f}")
show(rows, nrow=8);'''),
        new_markdown_cell("""## Rerank scores

Sixteen candidates, sorted by CLIP. The detector's verdict is printed next to each score: the
reranker should push the pictures that match the text to the top."""),
        new_code_cell('''out = sample(n=16, top_k=V, top_p=0.995)
ranked = cherry_pick_by_clip(out.images, TEXT, pipe.clip, progress=False)
for rank, (index, score, image) in enumerate(zip(ranked.indices, ranked.scores, ranked.images)):
    found = shapes.detect(image)
    ok = all(shapes.attribute_matches(found, target).values())
    print(f"{rank:2d}. candidate {index:2d}  score {score:.3f}  {'matches' if ok else 'differs'}: "
          f"{found.size} {found.color} {found.shape} {found.position} / {found.background}")
show(ranked.images, nrow=8);'''),
        new_markdown_cell("""## The whole chain, timed"""),
        new_code_cell('''start = time.perf_counter()
out = sample(n=16, top_k=V, top_p=0.995)
best = cherry_pick_by_clip(out.images, TEXT, pipe.clip, top_n=4, progress=False)
big = super_resolution(best.images, pipe.upscaler, progress=False)
print(f"16 candidates -> rerank -> x4 of the best 4: {time.perf_counter() - start:.1f} s on "
      f"{torch.get_num_threads()} CPU threads")
show(big);'''),
    ]


def finetune_nb() -> list:
    return [
        new_markdown_cell(f"""# Finetune on your own pictures

{badge("finetune.ipynb")}

Teach the generator a style or a subject from a folder of pictures, as Emojich and the "Looking
Glass" notebooks did for ruDALL-E. The pictures are encoded by the VQGAN once; then the transformer is
trained with the original loss (text and image cross-entropy, weighted 1 : 7).

* On **Colab with a GPU** this finetunes **Malevich** with LoRA adapters, fp16 autocast and gradient
  checkpointing, well inside a 16 GB T4 (see the memory table below).
* **Anywhere else** (and in CI) it finetunes the embedded demo model on a few rendered pictures of a
  colour-shape pair the demo model never saw in training (a yellow diamond), on the CPU.

To use your own pictures, put them in a folder with a `captions.csv` (columns `file,caption`), or a
`<name>.txt` caption beside each image, or give one `CAPTION` for all, and set `DATA_DIR`."""),
        new_code_cell(INSTALL),
        new_code_cell(CHOOSE),
        new_markdown_cell("""## Will it fit? The memory arithmetic for Malevich

`estimate_memory` counts the parameters on the meta device (nothing is allocated) and adds the
weights, gradients, optimizer states and activations for each set of options."""),
        new_code_cell('''from rudalle_pipe import DalleConfig
from rudalle_pipe.finetune import FinetuneConfig, estimate_memory
from rudalle_pipe.registry import PRETRAINED

malevich = DalleConfig(**PRETRAINED["Malevich"].config)
options = {
    "full, AdamW": FinetuneConfig(),
    "full, AdamW, checkpointing": FinetuneConfig(gradient_checkpointing=True),
    "full, 8-bit AdamW, checkpointing": FinetuneConfig(gradient_checkpointing=True, optimizer="adamw8bit"),
    "full, Adafactor, checkpointing": FinetuneConfig(gradient_checkpointing=True, optimizer="adafactor"),
    "LoRA r=16 attention+MLP, checkpointing": FinetuneConfig(lora_rank=16, train=("attention", "mlp"),
                                                             gradient_checkpointing=True),
}
print(f"{'options (batch 1, fp16 frozen weights)':42s} {'trainable':>10s} {'GiB':>6s}  T4 16 GB")
for name, opts in options.items():
    m = estimate_memory(malevich, opts)
    print(f"{name:42s} {m['parameters_trainable_m']:8.1f} M {m['total_gib']:6.1f}  "
          f"{'fits' if m['total_gib'] < 14.5 else 'does not fit'}")'''),
        new_markdown_cell("""## The pictures

**Your own pictures on Colab:** Colab uploads files, not folders. Zip the folder on your computer (the
pictures with a `captions.csv`, columns `file,caption`, or a `<name>.txt` caption beside each), upload
the zip in the Files pane on the left (or run `from google.colab import files; files.upload()`), and
set `ZIP` to its name, e.g. `"my_pictures.zip"`: the cell unpacks it (a zip of the folder itself works
too). In a local Jupyter, set `DATA_DIR` to the folder instead.

With neither, the cell writes an example set, 12 renders of yellow diamonds in various sizes and
places, and zips and unpacks it the same way."""),
        new_code_cell('''import csv
import random
import shutil
from pathlib import Path

from rudalle_pipe import shapes

ZIP = None           # on Colab: an uploaded zip of your pictures, e.g. "my_pictures.zip"
DATA_DIR = None      # in a local Jupyter: the folder of your pictures (then ZIP is not needed)
CAPTION = None       # one caption for every picture, or None to read captions.csv / <name>.txt

if DATA_DIR is None:
    if ZIP is None:  # the example set, zipped as you would upload your own
        example = Path("finetune_example")
        example.mkdir(exist_ok=True)
        rng = random.Random(0)
        rows = [("file", "caption")]
        for i in range(12):
            scene = shapes.Scene("ромб", "жёлтый", rng.choice(shapes.SIZES), rng.choice(shapes.POSITIONS),
                                 rng.choice(["чёрный", "серый", "синий"]))
            shapes.render(scene, 256).save(example / f"{i:02d}.png")
            rows.append((f"{i:02d}.png", shapes.caption(scene, rng)))
        with open(example / "captions.csv", "w", newline="", encoding="utf-8") as f:
            csv.writer(f).writerows(rows)
        ZIP = shutil.make_archive("finetune_example", "zip", root_dir=".", base_dir=example.name)
    DATA_DIR = Path(Path(ZIP).stem + "_unzipped")
    shutil.unpack_archive(ZIP, DATA_DIR)  # the same as `!unzip -o my_pictures.zip -d my_pictures_unzipped`
    inside = [p for p in DATA_DIR.iterdir() if not p.name.startswith((".", "__MACOSX"))]
    if len(inside) == 1 and inside[0].is_dir():  # the zip held the folder itself
        DATA_DIR = inside[0]
print(DATA_DIR, sorted(p.name for p in Path(DATA_DIR).iterdir())[:5], "...")'''),
        new_markdown_cell("""## Before"""),
        new_code_cell('''from rudalle_pipe import generate_images, load_pipeline, show

pipe = load_pipeline(MODEL, device=DEVICE, dtype=torch.float16 if DEVICE == "cuda" else torch.float32,
                     clip=False, upscaler=False)
PROMPT = "большой жёлтый ромб в центре на чёрном фоне"
TOP_K = min(2048, pipe.dalle.config.image_vocab_size)
before = generate_images(PROMPT, pipe.tokenizer, pipe.dalle, pipe.vae, top_k=TOP_K, top_p=0.995,
                         num_images=8, seed=0, progress=False)
show(before.images, nrow=8);'''),
        new_markdown_cell("""## Finetune

`finetune` runs on Hugging Face accelerate (so the same call works on a CPU, a GPU, or several GPUs
under `accelerate launch`). It writes checkpoints to `OUT_DIR` as it goes. **Rerunning the cell resumes**
an interrupted run from its last checkpoint, and loads a finished one (`OUT_DIR/final`) instead of
training again; to start over, delete `OUT_DIR` or choose another. `finetune` trains the generator it
is given, so the cell loads fresh base weights each time: a resume checks that they are the same. The
result loads like any other model: `get_rudalle_model(OUT_DIR + "/final")`."""),
        new_code_cell('''import json
import time

from rudalle_pipe import get_rudalle_model
from rudalle_pipe.finetune import finetune

OUT_DIR = "finetune_run"
DTYPE = torch.float16 if DEVICE == "cuda" else torch.float32
if DEMO:   # 1.9M parameters on a CPU: train everything
    settings = dict(steps=int(os.environ.get("FINETUNE_STEPS", 60)), lr=1e-3, batch_size=8,
                    checkpoint_every=30)
else:      # Malevich on one 16 GB GPU: LoRA + fp16 autocast + gradient checkpointing
    settings = dict(steps=300, lr=1e-4, batch_size=2, lora_rank=16, train=("attention", "mlp"),
                    gradient_checkpointing=True, mixed_precision="fp16", checkpoint_every=100)
final = Path(OUT_DIR) / "final"
if final.exists():  # finished before: load the result
    tuned = get_rudalle_model(str(final), device=DEVICE, dtype=DTYPE)
    summary = json.loads((Path(OUT_DIR) / "result.json").read_text())
    print(f"{OUT_DIR} has finished: loaded {final}; loss on the pictures "
          f"{summary['loss_before']:.3f} -> {summary['loss_after']:.3f}")
else:      # train, or resume an interrupted run, from freshly loaded base weights
    pipe.dalle = None  # the "before" generator is not needed any more: free its memory first
    base = load_pipeline(MODEL, device=DEVICE, dtype=DTYPE, clip=False, upscaler=False).dalle
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = finetune(base, pipe.vae, pipe.tokenizer, DATA_DIR, caption=CAPTION, out_dir=OUT_DIR, **settings)
    tuned = result.model
    print(f"{settings['steps']} steps in {time.perf_counter() - start:.0f} s; loss on the pictures "
          f"{result.loss_before:.3f} -> {result.loss_after:.3f}")
    if DEVICE == "cuda":
        print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")'''),
        new_code_cell('''import csv

with open(f"{OUT_DIR}/loss_log.csv") as f:
    log = list(csv.DictReader(f))
rows = log[:: max(1, len(log) // 6)]
for row in rows + ([] if rows[-1] is log[-1] else log[-1:]):
    print(f"step {int(row['step']):4d}  loss {float(row['loss']):.3f}  lr {float(row['lr']):.1e}")'''),
        new_markdown_cell("""## After"""),
        new_code_cell('''after = generate_images(PROMPT, pipe.tokenizer, tuned, pipe.vae, top_k=TOP_K, top_p=0.995,
                        num_images=8, seed=0, progress=False)
show(before.images + after.images, nrow=8);  # top row before, bottom row after
if DEMO:  # the demo pictures can be checked automatically
    target = shapes.parse_caption(PROMPT)
    for name, images in (("before", before.images), ("after", after.images)):
        hits = shapes.score(images, [target] * len(images))
        print(f"{name}: colour right {hits['color']:.0%}, shape right {hits['shape']:.0%}, all {hits['all']:.0%}")'''),
    ]


def image_prompts_nb() -> list:
    return [
        new_markdown_cell(f"""# Image prompts: keep part of a picture, inpaint, outpaint

{badge("image_prompts.ipynb")}

The transformer draws a picture as a grid of VQGAN codes, row by row. An **image prompt** fixes some of
those codes in advance (taken from a picture you give) and lets the model draw only the rest, guided by
the caption. Three uses:

1. **keep the top** of a picture and draw the rest from a new caption (`ImagePrompt.from_borders`);
2. **inpaint**: cut a hole with a mask and let the model fill it (`ImagePrompt.from_mask`, then
   `paste_back` to restore the kept pixels exactly);
3. **outpaint**: extend a picture to the right, strip by strip, into a panorama (`outpaint`).

Anywhere without a GPU and the Hub (and in CI) this runs the embedded demo model on a CPU, on a
rendered picture of a coloured shape, so the results can be checked automatically. On a Hub model the
same cells work on your own photo: set `PHOTO` below (e.g. `Image.open("my_photo.jpg")`) and change the
captions to describe it."""),
        new_code_cell(INSTALL),
        new_code_cell(CHOOSE),
        new_markdown_cell("""## The model and the picture

`load_pipeline` without CLIP and the upscaler: this notebook only generates. The code grid is
`side x side` (8 x 8 for the demo model at 64 px, 32 x 32 for Malevich at 256 px); every kept or
generated region below is measured in codes, one code covering a `RES / side` px square."""),
        new_code_cell('''from PIL import Image

from rudalle_pipe import load_pipeline, shapes, show
from rudalle_pipe.images import prepare_image

pipe = load_pipeline(MODEL, device=DEVICE, dtype=torch.float16 if DEVICE == "cuda" else torch.float32,
                     clip=False, upscaler=False)
RES = pipe.vae.config.resolution           # the VQGAN's picture size, px
SIDE = pipe.dalle.config.image_tokens_per_dim  # codes per side
TOP_K, TOP_P = min(2048, pipe.dalle.config.image_vocab_size), 0.995

PHOTO = None  # on a Hub model: your own picture, e.g. Image.open("my_photo.jpg")
scene = shapes.Scene("круг", "красный", "большой", "снизу", "серый")
if PHOTO is None:
    PHOTO = shapes.render(scene, RES)  # a big red circle at the bottom on grey: its top quarter is background
PHOTO = prepare_image(PHOTO, RES)     # RGB, RES x RES (resize and centre crop): what the VQGAN sees
ZOOM = max(1, 128 // RES)             # show the 64 px demo pictures twice as big
TEXT = shapes.caption(scene)          # the caption of the picture as it is
print(f"{RES} px, {SIDE}x{SIDE} codes; the picture: {TEXT}")
show([PHOTO], size=RES * ZOOM);'''),
        new_markdown_cell("""## 1. Keep the top, draw the rest from a new caption

`ImagePrompt.from_borders(picture, vae, {"up": n})` encodes the picture and keeps its top `n` rows of
codes (`down`, `left`, `right` work the same way). Here the top quarter is only grey background, and
the new caption asks for a different object below it. The kept codes are copied into every result
unchanged, which the `assert` checks. On the demo, classifier-free guidance (`guidance_scale=2`) makes
the small model follow the new caption more closely."""),
        new_code_cell('''from rudalle_pipe import ImagePrompt, generate_images

top = ImagePrompt.from_borders(PHOTO, pipe.vae, {"up": SIDE // 4})
NEW_TEXT = "маленький жёлтый квадрат снизу на сером фоне"
GUIDANCE = 2.0 if DEMO else 1.0  # the demo follows a new caption better with guidance (benchmarks/demo_quality.py)
out = generate_images(NEW_TEXT, pipe.tokenizer, pipe.dalle, pipe.vae, top_k=TOP_K, top_p=TOP_P,
                      num_images=4, seed=0, image_prompt=top, guidance_scale=GUIDANCE, progress=False)
assert (out.codes[:, top.mask].cpu() == top.codes[top.mask]).all(), "the kept codes changed"
print(f"kept {top.num_kept} of {SIDE * SIDE} codes; input, then 4 results for: {NEW_TEXT}")
show([PHOTO] + out.images, nrow=5, size=out.images[0].width * ZOOM);
if DEMO:  # the demo pictures can be read back automatically
    found = [shapes.detect(image) for image in out.images]
    print("drawn:", [f"{d.size} {d.color} {d.shape} {d.position} / {d.background}" for d in found])'''),
        new_markdown_cell("""## 2. Inpaint a hole

A mask the size of the picture, white (255) where the picture is kept and black where the model should
draw: here a square hole over the middle of the picture, which takes the object's upper half.
`ImagePrompt.from_mask` keeps every code whose whole patch is white; we generate with the same caption,
so the model redraws the object.

The VQGAN round trip changes even the kept codes' pixels a little (its codes are a lossy summary), so
`paste_back` puts the kept pixels of the input back exactly, blending into the new part over
`feather` pixels. The `assert` checks that every kept pixel equals the input."""),
        new_code_cell('''import numpy as np

from rudalle_pipe import paste_back

keep = np.ones((RES, RES), dtype=bool)
a, b = RES * 7 // 32, RES * 25 // 32   # a square hole over the middle of the picture
keep[a:b, a:b] = False
mask = Image.fromarray(keep.astype(np.uint8) * 255, "L")
hole = ImagePrompt.from_mask(PHOTO, pipe.vae, mask)
out = generate_images(TEXT, pipe.tokenizer, pipe.dalle, pipe.vae, top_k=TOP_K, top_p=TOP_P,
                      num_images=4, seed=0, image_prompt=hole, progress=False)
fixed = paste_back(out.images, PHOTO, mask, feather=4)
px = fixed[0].width  # the decoded size: RES, or 2 * RES with a decoder that upsamples
source = np.asarray(prepare_image(PHOTO, px), dtype=int)
kept = np.asarray(mask.resize((px, px), Image.NEAREST)) > 0
for image in fixed:
    assert np.abs(np.asarray(image, dtype=int) - source)[kept].max() == 0, "paste_back changed a kept pixel"
masked = Image.composite(PHOTO, Image.new("RGB", (RES, RES), "black"), mask)
print(f"kept {hole.num_kept} of {SIDE * SIDE} codes; top: input, with the hole, then the 4 results as "
      "generated; bottom: pasted back")
show([PHOTO, masked] + out.images + [PHOTO, masked] + fixed, nrow=6, size=px * ZOOM);
if DEMO:
    print("filled in:", [shapes.detect(image).shape for image in fixed])'''),
        new_markdown_cell("""## 3. Outpaint to the right

`outpaint(picture, caption, ..., right=k, steps=3)` shifts the code grid `k` columns to the left,
keeps what is still inside and generates the `k` new columns on the right, three times over; each
step continues from the codes just generated. `stitched` is the panorama: the input picture followed
by the three new strips, so it is `RES + 3 * k * RES / side` px wide.

Only right and down are offered: the model draws in raster order, so a strip on the left or the top
would be drawn before the picture it should continue. (The demo model only ever saw one shape per
picture, so its new strips hold shape-like blobs in the caption's colour; a Hub model continues the
scene.)"""),
        new_code_cell('''from rudalle_pipe import outpaint

K = SIDE // 2
wide = outpaint(PHOTO, TEXT, pipe.tokenizer, pipe.dalle, pipe.vae, right=K, steps=3, top_k=TOP_K,
                top_p=TOP_P, num_images=2, seed=0)
panorama = wide.stitched[0]
px = wide.images[0].width  # the decoded size (RES for the demo VQGAN)
assert panorama.size == (px + 3 * K * px // SIDE, px), panorama.size
first = wide.codes[0, 0].view(SIDE, SIDE)
assert (first[:, : SIDE - K] == wide.input_codes.view(SIDE, SIDE)[:, K:]).all(), "the kept columns changed"
print(f"panoramas of {panorama.size[0]}x{panorama.size[1]} px ({K} codes added per step, 3 steps)")
show(wide.stitched, nrow=1, size=(panorama.width * ZOOM, panorama.height * ZOOM));'''),
        new_markdown_cell("""## Next

* `quickstart.ipynb`: plain text-to-picture generation, reranking and upscaling.
* Reusing codes from an earlier run: `ImagePrompt.from_codes(codes, mask)` takes a code grid and a
  keep mask directly (e.g. `out.codes[i]` from `generate_images`)."""),
    ]


NOTEBOOKS = {"quickstart.ipynb": quickstart, "demo_offline.ipynb": demo_offline, "finetune.ipynb": finetune_nb,
             "image_prompts.ipynb": image_prompts_nb}


CPU_ONLY = {"demo_offline.ipynb"}  # Colab opens these without requesting a GPU


def build(name: str) -> nbformat.NotebookNode:
    nb = new_notebook(cells=NOTEBOOKS[name]())
    nb.metadata.update({"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
                        "language_info": {"name": "python"}, "colab": {"provenance": [], "name": name}})
    if name not in CPU_ONLY:
        nb.metadata["accelerator"] = "GPU"
    for i, cell in enumerate(nb.cells):
        cell["id"] = f"{Path(name).stem}-{i:02d}"
    return nb


def setup_cfg_text(text: str) -> str:
    """``setup.cfg``'s text with its ``url =`` line set to :data:`REPO_URL`."""
    updated, count = re.subn(r"(?m)^url = .*$", f"url = {REPO_URL}", text)
    if count != 1:
        raise ValueError(f"setup.cfg must have exactly one 'url = ' line, found {count}")
    return updated


def main() -> int:
    for name in NOTEBOOKS:
        nbformat.write(build(name), HERE / name)
    text = SETUP_CFG.read_text(encoding="utf-8")
    if setup_cfg_text(text) != text:
        SETUP_CFG.write_text(setup_cfg_text(text), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
