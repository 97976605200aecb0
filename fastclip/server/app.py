"""The ASGI app: OpenAI-compatible ``/v1/embeddings``, ``/v1/classify``, ``/v1/models``, and the
operational ``/health``, ``/ready``, ``/metrics`` (see docs/serve.md)."""
from __future__ import annotations

import asyncio
import base64
import secrets
import time
from contextlib import asynccontextmanager

import numpy as np
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response

from ..data.tokenizers import no_tokenizer_message
from .config import ServerConfig
from .errors import APIError, error_response, install_error_handlers
from .inputs import load_request_images
from .schemas import ClassifyRequest, EmbeddingRequest, Item
from .state import ServiceState

ENDPOINTS = ("/v1/embeddings", "/v1/classify", "/v1/models", "/health", "/ready", "/metrics")


class _Guard:
    """Pure ASGI middleware: request metrics (count, latency, in-flight) and the request-body limit
    (a body over ``max_body_bytes`` gets 413 before any parsing)."""

    def __init__(self, app, state: ServiceState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        m, limit = self.state.metrics, self.state.cfg.max_body_bytes
        path, root = scope.get("path", ""), scope.get("root_path", "")
        if root and path.startswith(root):  # mounted inside another app
            path = path[len(root):]
        endpoint = path if path in ENDPOINTS else "other"
        status, start = [500], time.perf_counter()

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        m.inflight.inc()
        try:
            if scope.get("method") in ("POST", "PUT", "PATCH"):
                body = await self._read_body(receive, scope, limit)
                if body is None:
                    resp = error_response(m, 413, f"request body is larger than the limit of {limit} bytes",
                                          code="body_too_large")
                    return await resp(scope, receive, send_status)
                receive = self._replay(body, receive)
            await self.app(scope, receive, send_status)
        finally:
            m.inflight.dec()
            m.latency.labels(endpoint).observe(time.perf_counter() - start)
            m.requests.labels(endpoint, str(status[0])).inc()

    @staticmethod
    async def _read_body(receive, scope, limit: int) -> bytes | None:
        for name, value in scope.get("headers", ()):
            if name == b"content-length" and value.isdigit() and int(value) > limit:
                return None
        chunks, total = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > limit:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)

    @staticmethod
    def _replay(body: bytes, receive):
        sent = [False]

        async def replay():
            if not sent[0]:
                sent[0] = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return replay


def _check_model(state: ServiceState, requested: str | None) -> None:
    if requested is not None and requested != state.name:
        raise APIError(404, f"model {requested!r} is not served here; this server serves {state.name!r}",
                       param="model", code="model_not_found")


def _check_count(state: ServiceState, items: list[Item]) -> None:
    if len(items) > state.cfg.max_items:
        raise APIError(413, f"input has {len(items)} items; the limit is {state.cfg.max_items} per request",
                       param="input", code="too_many_items")


def _check_room(state: ServiceState, n_text: int, n_image: int) -> None:
    """Refuse (429) before any work when either queue cannot take this request's items."""
    state.text.check_room(n_text)
    state.image.check_room(n_image)


def _encode_rows(emb: np.ndarray, fmt: str) -> list:
    if fmt == "base64":
        return [base64.b64encode(row.astype("<f4").tobytes()).decode("ascii") for row in emb]
    return emb.tolist()


def _usage(tokens: int) -> dict:
    return {"prompt_tokens": tokens, "total_tokens": tokens}


def _v1_routes(state: ServiceState) -> APIRouter:
    cfg = state.cfg

    async def auth(request: Request):
        if cfg.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), cfg.api_key.encode()):
            raise APIError(401, "missing or invalid API key (send 'Authorization: Bearer <key>')",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    async def started():
        state.start()
        return state

    router = APIRouter(prefix="/v1", dependencies=[Depends(auth)])

    @router.post("/embeddings")
    async def embeddings(req: EmbeddingRequest, st: ServiceState = Depends(started)):
        """OpenAI-compatible embeddings of texts and images, in input order."""
        _check_model(st, req.model)
        if req.dimensions is not None and req.dimensions != st.dim:
            raise APIError(400, f"dimensions={req.dimensions} is not supported; this model's embeddings have "
                                f"{st.dim} dimensions", param="dimensions", code="unsupported_dimensions")
        items = req.input
        _check_count(st, items)
        texts = [(i, it.value) for i, it in enumerate(items) if it.kind == "text"]
        refs = [(i, it.value) for i, it in enumerate(items) if it.kind == "image"]
        if texts and st.model.tokenizer is None:
            raise APIError(400, no_tokenizer_message(st.model, "embed texts"), param="input", code="no_tokenizer")
        for i, text in texts:
            if len(text) > cfg.max_text_chars:
                raise APIError(413, f"input[{i}]: text has {len(text)} characters; the limit is "
                                    f"{cfg.max_text_chars}", param=f"input[{i}]", code="text_too_long")
        _check_room(st, len(texts), len(refs))
        images = await load_request_images(refs, cfg, st.http, st.preprocess) if refs else []
        tokens = await asyncio.to_thread(st.count_tokens, [t for _, t in texts]) if texts else 0
        parts = await asyncio.gather(st.text.submit([t for _, t in texts]) if texts else _none(),
                                     st.image.submit(images) if images else _none())
        out = np.empty((len(items), st.dim), np.float32)
        if texts:
            out[[i for i, _ in texts]] = parts[0]
        if refs:
            out[[i for i, _ in refs]] = parts[1]
        data = [{"object": "embedding", "index": i, "embedding": e}
                for i, e in enumerate(_encode_rows(out, req.encoding_format))]
        return JSONResponse({"object": "list", "data": data, "model": st.name, "usage": _usage(tokens)})

    @router.post("/classify")
    async def classify(req: ClassifyRequest, st: ServiceState = Depends(started)):
        """Zero-shot classification: probabilities (N, C) over ``labels`` for each image."""
        _check_model(st, req.model)
        _check_count(st, req.input)
        n_prompts = len(req.labels) * len(req.templates or [None])
        if n_prompts > cfg.max_labels:
            raise APIError(413, f"labels x templates = {n_prompts} prompts; the limit is {cfg.max_labels}",
                           param="labels", code="too_many_labels")
        if st.model.tokenizer is None:
            raise APIError(400, no_tokenizer_message(st.model, "classify"), code="no_tokenizer")
        _check_room(st, 0, len(req.input))
        images = await load_request_images([(i, it.value) for i, it in enumerate(req.input)], cfg, st.http,
                                            st.preprocess)
        weights = await st.class_weights(req.labels, req.templates)
        probs = st.probabilities(await st.image.submit(images), weights)
        data = [{"object": "classification", "index": i, "label": req.labels[int(np.argmax(p))],
                 "probabilities": p.tolist()} for i, p in enumerate(probs)]
        prompts = [t.format(label) for label in req.labels for t in (req.templates or ["a photo of a {}."])]
        tokens = await asyncio.to_thread(st.count_tokens, prompts)
        return JSONResponse({"object": "list", "data": data, "labels": req.labels, "model": st.name,
                             "usage": _usage(tokens)})

    @router.get("/models")
    async def models():
        """The one model this server serves."""
        return {"object": "list", "data": [{"id": state.name, "object": "model", "created": 0,
                                            "owned_by": "fastclip", "dimensions": state.dim}]}

    return router


async def _none():
    return None


def create_app(model, config: ServerConfig | None = None, **overrides) -> FastAPI:
    """An ASGI app serving ``model`` (a fastclip model with tokenizer and preprocess attached).

    ``config`` is a ``ServerConfig``; keyword ``overrides`` change single fields of it (e.g.
    ``create_app(model, max_batch=16, api_key="...")``). Run it with uvicorn, or mount it in another
    app: the encoder starts on the first request, and the host app should enter
    ``app.router.lifespan_context(app)`` in its own lifespan so shutdown drains the queues.
    """
    cfg = (config or ServerConfig()).updated(**overrides) if overrides else (config or ServerConfig())
    for attr in ("embed_texts", "embed_images", "classifier_weights", "cfg", "tokenizer"):
        if not hasattr(model, attr):
            raise TypeError(f"create_app needs a fastclip model (missing attribute {attr!r}); got "
                            f"{type(model).__name__}")
    state = ServiceState(model, cfg)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.start()
        yield
        await state.stop()

    app = FastAPI(title="fastclip", summary=f"embeddings from {state.name}", lifespan=lifespan)
    app.state.fastclip = state
    app.state.retry_after_s = cfg.retry_after_s
    install_error_handlers(app, state.metrics)
    app.include_router(_v1_routes(state))

    @app.get("/health")
    async def health():
        """The process is alive (says nothing about the model)."""
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        """200 once the model answered a probe inference; 503 with the reason otherwise."""
        ok, reason = state.is_ready()
        return JSONResponse({"status": "ready" if ok else "not_ready", "reason": reason, "model": state.name},
                            status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics():
        body, content_type = state.metrics.render()
        return Response(body, media_type=content_type)

    app.add_middleware(_Guard, state=state)
    return app
