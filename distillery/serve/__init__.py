"""An HTTP server for distillery's models: `distillery serve MODEL [MODEL ...]`.

    from distillery.serve import ServeSettings, create_app, load_served_model
    app = create_app([load_served_model("distilgpt2")], ServeSettings())

Three dialects over one continuous-batching scheduler: Text Generation Inference (`tgi`), the
Hugging Face Inference API (`hf_api`) and OpenAI's (`openai_api`). `app` builds the FastAPI
application, `scheduler` runs the models, `served_models` loads and names them.

FastAPI and uvicorn (the `serve` extra) are imported on first use, so the rest of the command
line does not need them.
"""

__all__ = ["ServeSettings", "ServedModel", "create_app", "load_served_model"]


def __getattr__(name: str):
    if name == "create_app":
        from distillery.serve.app import create_app

        return create_app
    if name in ("ServedModel", "load_served_model"):
        from distillery.serve import served_models

        return getattr(served_models, name)
    if name == "ServeSettings":
        from distillery.serve.server import ServeSettings

        return ServeSettings
    raise AttributeError(f"module 'distillery.serve' has no attribute {name!r}")
