"""An HTTP server for distillery's models: `distillery serve MODEL [MODEL ...]`.

    from distillery.serve import ServeSettings, create_app, load_served_model
    app = create_app([load_served_model("distilgpt2")], ServeSettings())

Three dialects over one continuous-batching scheduler: Text Generation Inference (`tgi`), the
Hugging Face Inference API (`hf_api`) and OpenAI's (`openai_api`). `app` builds the FastAPI
application, `scheduler` runs the models, `served_models` loads and names them.
"""

from distillery.serve.app import create_app
from distillery.serve.served_models import ServedModel, load_served_model
from distillery.serve.server import ServeSettings

__all__ = ["ServeSettings", "ServedModel", "create_app", "load_served_model"]
