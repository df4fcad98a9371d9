"""Training code for the models of rudalle_pipe, kept apart from inference.

* :mod:`.common` - the shared data-parallel training loop on accelerate (``LoopConfig``, ``run_training``,
  ``Shard``);
* :mod:`.scenes` - the demo's training data: scenes, captions and renders of :mod:`rudalle_pipe.shapes`;
* :mod:`.bpe` - stage 1, a BPE trainer writing YouTokenToMe ``bpe.model`` files;
* :mod:`.vqgan` - stage 2, the VQGAN image tokenizer;
* :mod:`.dalle` - stage 3, the generator;
* :mod:`.clip` and :mod:`.realesrgan` - stages 4 and 5, the reranker and the x4 upscaler;
* :mod:`.demo` - runs all five for the embedded demo family: ``python -m rudalle_pipe.train demo --out DIR``.

Submodules are imported on demand (accelerate and open_clip are heavy).
"""
from .common import LoopConfig, run_training

__all__ = ["LoopConfig", "run_training"]
