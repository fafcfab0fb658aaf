"""Inference: latent KV cache, absorbed MLA, batched generation, MTP speculative decoding.

    from dsv3.inference import Generator, SamplingParams
    out = Generator(model).generate(prompt_ids, max_new_tokens=64, sampling=SamplingParams(temperature=0.7, seed=0))

Files, one concern each: cache.py (the latent cache), attention.py (absorbed and expanded MLA over it),
moe.py (sync-free MoE), moe_small.py (Triton experts for a few tokens), gemv.py (a few-row linear), forward.py (the model's forward over the cache), sampling.py, outputs.py (stop
tokens and limits on the device), compiled.py (torch.compile of steps), graphs.py (CUDA graphs),
engine.py (Generator), speculative.py (MTP drafts), and the `dsv3 generate` / `dsv3 chat` commands.
"""

from .cache import LatentCache
from .engine import GenerationOutput, Generator
from .sampling import SamplingParams

__all__ = ["GenerationOutput", "Generator", "LatentCache", "SamplingParams"]
