"""Generation: a decoding engine separate from the models (prefill, decode step, sampler, streaming).

    from distillery.generation import GenerationConfig, generate
    tokens = generate(model, input_ids, attention_mask, GenerationConfig(do_sample=True, max_new_tokens=20))
"""

from distillery.generation.config import GenerationConfig
from distillery.generation.engine import decode_step, generate, prefill, stream

__all__ = ["GenerationConfig", "decode_step", "generate", "prefill", "stream"]
