"""A Hugging Face Space running the rudalle-pipe web UI (the page of ``rudalle-pipe serve``).

It serves the bundled demo model, which runs on a free CPU Space. With a GPU it also offers ruDALL-E
Malevich in fp16 (a 2.6 GB download on first start); set ``RUDALLE_SPACE_MALEVICH=0`` to keep only the
demo. Locally: ``pip install "rudalle-pipe[web]" && python examples/space/app.py``.
"""
import os

import torch

from rudalle_pipe.web import build_app, launch, load_models

TITLE = "ruDALL-E (rudalle-pipe)"


def model_names() -> list[str]:
    """The demo, plus Malevich when a GPU is present (unless ``RUDALLE_SPACE_MALEVICH=0``)."""
    names = ["demo"]
    if torch.cuda.is_available() and os.environ.get("RUDALLE_SPACE_MALEVICH", "1") != "0":
        names.append("Malevich")
    return names


def create_app():
    """Load the models and lay the page out; nothing is launched."""
    cuda = torch.cuda.is_available()
    models = load_models(model_names(), device="cuda" if cuda else "cpu", dtype="float16" if cuda else "float32")
    return build_app(models, title=TITLE)


if __name__ == "__main__":
    # a Space reaches the app on 0.0.0.0:7860 (GRADIO_SERVER_NAME/PORT are set there)
    launch(create_app(), host=os.environ.get("GRADIO_SERVER_NAME", "0.0.0.0"),
           port=int(os.environ.get("GRADIO_SERVER_PORT", "7860")))
