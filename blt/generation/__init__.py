"""Generation: sampling bytes from a trained model, with per-component KV caches.

generator.py    Generator (load, generate, stream) and stream_text (UTF-8 as it completes)
engine.py       the one generation loop (rows with their own RNG, ends and context restarts),
                driven by Generator, the server's batcher and lm-eval's generate_until
sampling.py     temperature / top-k / top-p sampling and the options' ranges
cached.py       CachedState: the entropy model, patch-start rules and incremental model of a batch
incremental.py  IncrementalBLT / IncrementalByteLM: the whole model fed bytes as they arrive,
                through the model's own `step` methods (no model math here)
static_step.py  the compiled one-byte steps (the model's `step` at fixed shapes)
kv_cache.py     one cache per Transformer (bytes or patches), rows of different lengths; FixedSlots
paged.py        the paged KV cache (blocks from one pool per Transformer) and its MB budget

from blt.generation import Generator
Generator.load("exports/tiny").generate(["ROMEO."], max_bytes=100, temperature=0.8, seed=0)
"""

from blt.generation.generator import Generator, stream_text

__all__ = ["Generator", "stream_text"]
