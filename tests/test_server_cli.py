"""``fastclip serve`` from the command line: a real process on a loopback port, auth from the
environment, an embedding equal to the model's own, and a clean exit on SIGTERM."""
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest

import fastclip
from fastclip import tolerance
from fastclip.cli import build_parser
from helpers.upstream import save_tiny_openai_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A small OpenAI-layout CLIP checkpoint (architecture inferred from its shapes when loaded)."""
    return save_tiny_openai_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-serve.pt", embed_dim=32, width=64)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_flags_map_to_config():
    args = build_parser().parse_args(["serve", "--model", "m", "--no-batching", "--allow-url-host", "a.example",
                                      "--allow-url-host", "b.example:8080", "--max-items", "8"])
    assert args.no_batching and args.allow_url_host == ["a.example", "b.example:8080"] and args.max_items == 8
    assert (args.host, args.port, args.max_batch, args.max_wait_ms) == ("127.0.0.1", 8000, 32, 5.0)


def test_serve_process_answers_and_stops_on_sigterm(checkpoint):
    port = _free_port()
    env = dict(os.environ, FASTCLIP_API_KEY="cli-secret")
    proc = subprocess.Popen([sys.executable, "-m", "fastclip.cli", "serve", "--model", str(checkpoint),
                             "--host", "127.0.0.1", "--port", str(port), "--max-batch", "8", "--log-level", "info"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "server never became ready"
            try:
                if httpx.get(url + "/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        assert httpx.post(url + "/v1/embeddings", json={"input": "a cat"}).status_code == 401
        r = httpx.post(url + "/v1/embeddings", json={"input": ["a cat", "a dog"]},
                       headers={"Authorization": "Bearer cli-secret"}, timeout=30)
        assert r.status_code == 200, r.text
        got = np.array([d["embedding"] for d in r.json()["data"]], dtype=np.float32)
        np.testing.assert_allclose(got, fastclip.load(checkpoint).embed_texts(["a cat", "a dog"]),
                                   atol=tolerance.SAME_MODEL_ATOL)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        # uvicorn re-raises the signal after its graceful shutdown, so the exit status says SIGTERM
        assert proc.returncode in (0, -signal.SIGTERM), err
        assert "Application shutdown complete" in err and "Traceback" not in err, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
