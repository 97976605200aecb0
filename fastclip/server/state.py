"""The per-app service state: the model, its two micro-batchers, the encoder thread, readiness."""
from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image

from .batcher import MicroBatcher, ShuttingDown
from .config import ServerConfig
from .metrics import Metrics

log = logging.getLogger("fastclip.server")
_CLASS_CACHE = 64


def _probe_image(size: int = 32) -> Image.Image:
    ramp = np.linspace(0, 255, size, dtype=np.float32)
    rgb = np.stack([ramp[None, :].repeat(size, 0), ramp[:, None].repeat(size, 1), np.full((size, size), 128.0)], -1)
    return Image.fromarray(rgb.astype(np.uint8))


class ServiceState:
    """What the routes share. ``model`` needs ``embed_texts``, ``embed_images``, ``classifier_weights``,
    ``tokenizer``, ``cfg.embed_dim``, ``logit_scale`` and ``logit_bias`` (a fastclip ``CLIP`` has them).

    The encoder runs in one dedicated thread: one encoder call at a time (torch parallelises inside
    each call with its own intra-op threads).
    """

    def __init__(self, model, cfg: ServerConfig):
        self.model, self.cfg = model, cfg
        self.name = cfg.model_name or getattr(getattr(model, "cfg", None), "name", None) or "fastclip"
        self.dim = int(model.cfg.embed_dim)
        self.preprocess = getattr(model, "preprocess", None)  # request images decode under its budget (inputs.py)
        self.metrics = Metrics()
        self.executor: ThreadPoolExecutor | None = None
        self.text: MicroBatcher | None = None
        self.image: MicroBatcher | None = None
        self.http = None
        self.ready, self.ready_reason = False, "starting"
        self._probe_task: asyncio.Task | None = None
        self._class_cache: OrderedDict = OrderedDict()
        self._stopped = False

    # ------------------------------------------------------------------ lifecycle
    @property
    def started(self) -> bool:
        return self.executor is not None

    def start(self) -> None:
        """Create the encoder thread and the batchers on the running loop and start the readiness probe
        (idempotent; also called lazily by the first request when the app is mounted elsewhere)."""
        if self.started:
            return
        if self._stopped:
            raise RuntimeError("this fastclip app was shut down; create a new one")
        cfg, model = self.cfg, self.model
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fastclip-encoder")
        common = dict(max_batch=cfg.max_batch, max_wait_ms=cfg.max_wait_ms, max_queue=cfg.max_queue,
                      metrics=self.metrics)
        self.text = MicroBatcher("text", lambda xs: model.embed_texts(xs, batch_size=len(xs)), self.executor, **common)
        self.image = MicroBatcher("image", lambda xs: model.embed_images(xs, batch_size=len(xs)), self.executor,
                                  **common)
        self.text.start()
        self.image.start()
        if cfg.allow_url_hosts:
            import httpx

            self.http = httpx.AsyncClient(follow_redirects=False, trust_env=False)
        self._probe_task = asyncio.get_running_loop().create_task(self._probe())

    async def _probe(self) -> None:
        """One real inference per modality through the batchers; /ready answers OK only after it passed."""
        try:
            rows = [await self.image.submit([_probe_image()])]
            if self.model.tokenizer is not None:
                rows.append(await self.text.submit(["a photo of a cat"]))
            for r in rows:
                if r.shape != (1, self.dim) or not np.isfinite(r).all():
                    raise RuntimeError(f"probe returned shape {r.shape} or non-finite values")
            self.ready, self.ready_reason = True, "ready"
        except Exception as e:  # keep the process up, report it on /ready
            log.exception("fastclip readiness probe failed")
            self.ready, self.ready_reason = False, f"probe failed: {type(e).__name__}: {e}"

    async def stop(self) -> None:
        """Drain both queues (queued items are still encoded and answered), then stop the encoder."""
        self._stopped = True
        if not self.started:
            return
        self.ready, self.ready_reason = False, "shutting down"
        if self._probe_task is not None:
            await asyncio.gather(self._probe_task, return_exceptions=True)
        await asyncio.gather(self.text.close(), self.image.close())
        self.executor.shutdown(wait=True)
        if self.http is not None:
            await self.http.aclose()

    def is_ready(self) -> tuple[bool, str]:
        if self.started and not (self.text.alive and self.image.alive):
            return False, "encoder worker stopped"
        return self.ready, self.ready_reason

    # ------------------------------------------------------------------ model helpers
    def count_tokens(self, texts: list[str]) -> int:
        """Tokens the text encoder sees per text (with start/end markers, capped at the context length)."""
        tok = self.model.tokenizer
        specials = 2 if hasattr(tok, "sot_token_id") else 1
        length = getattr(tok, "context_length", None) or 10 ** 9
        return sum(min(len(tok.encode(t)) + specials, length) for t in texts)

    async def class_weights(self, labels: list[str], templates: list[str] | None) -> np.ndarray:
        """(C, E) zero-shot class embeddings (``model.classifier_weights``), cached per label set;
        computed on the encoder thread, between batches."""
        if self._stopped:
            raise ShuttingDown("the server is shutting down")
        key = (tuple(labels), tuple(templates) if templates else None)
        if key in self._class_cache:
            self._class_cache.move_to_end(key)
            return self._class_cache[key]
        loop = asyncio.get_running_loop()
        weights = await loop.run_in_executor(self.executor, self.model.classifier_weights, labels, templates)
        self._class_cache[key] = weights
        while len(self._class_cache) > _CLASS_CACHE:
            self._class_cache.popitem(last=False)
        return weights

    def probabilities(self, image_emb: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """(N, E) x (C, E) -> (N, C): softmax over labels (CLIP) or per-label sigmoid (SigLIP),
        exactly as ``model.classify``."""
        model = self.model
        with torch.inference_mode():
            logits = model.logit_scale.detach().float().cpu() * torch.from_numpy(image_emb) @ torch.from_numpy(weights).T
            if model.logit_bias is not None:
                return torch.sigmoid(logits + model.logit_bias.detach().float().cpu()).numpy()
            return torch.softmax(logits, dim=-1).numpy()
