"""Generation: sampling bytes from a trained model, with per-component KV caches.

generator.py    Generator (load, generate, stream) and stream_text (UTF-8 as it completes)
sampling.py     temperature / top-k / top-p sampling and the options' ranges
incremental.py  IncrementalBLT / IncrementalByteLM: the whole model fed bytes as they arrive
steps.py        the incremental forward of the model's blocks (the model keeps the training one)
kv_cache.py     one cache per Transformer (bytes or patches), rows of different lengths

from blt.generation import Generator
Generator.load("exports/tiny").generate(["ROMEO."], max_bytes=100, temperature=0.8, seed=0)
"""

from blt.generation.generator import Generator, stream_text

__all__ = ["Generator", "stream_text"]
