"""distillery: turn a big language model into a small, fast one, and run it.

    >>> import distillery
    >>> model = distillery.load_model("distilgpt2")
    >>> generator = distillery.pipeline("text-generation", model="distilgpt2")
"""

from distillery.models import (
    GPT2,
    BertConfig,
    ConfigError,
    DistilBertConfig,
    DistilleryError,
    GPT2Config,
    RobertaConfig,
    build_model,
    load_model,
)

__all__ = ["GPT2", "GPT2Config", "RobertaConfig", "BertConfig", "DistilBertConfig", "ConfigError",
           "DistilleryError", "build_model", "load_model", "load_tokenizer", "pipeline", "set_seed"]


def __getattr__(name: str):
    # Lazy, so `import distillery` stays light and subsystems import only what they use.
    if name == "load_tokenizer":
        from distillery.tokenizer import load_tokenizer

        return load_tokenizer
    if name == "pipeline":
        from distillery.pipelines import pipeline

        return pipeline
    if name == "set_seed":
        from distillery.pipelines import set_seed

        return set_seed
    raise AttributeError(f"module 'distillery' has no attribute {name!r}")
