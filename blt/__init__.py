"""blt: a tokenizer-free byte-level language model trainer (Byte Latent Transformer)."""

__version__ = "0.1.0"
