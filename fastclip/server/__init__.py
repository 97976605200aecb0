"""``fastclip serve``: an HTTP embedding service (FastAPI + uvicorn) with dynamic micro-batching.

    from fastclip.server import create_app
    app = create_app(fastclip.load("ViT-B-32", pretrained="laion2b_s34b_b79k"), max_batch=32)

See docs/serve.md for the endpoints, the input scheme, limits and metrics.
"""
from .app import create_app
from .config import ServerConfig

__all__ = ["create_app", "ServerConfig"]
