"""A reward computed by another process over HTTP, and the server side (`raft-diffusion serve-reward`).

The protocol, JSON both ways, one POST per batch of at most `batch_size` samples:

    POST /score  {"prompts": [...], "images": [base64 PNG, ...]}   (or "texts": [...] instead of "images")
    reply        {"scores": [float | null, ...]}                    (one per prompt, in order)

A null or NaN score drops that sample (as any non-finite score does). Connection errors, 5xx replies
and timeouts are retried with a backoff; after the last retry the call raises, so that compose's rules
apply (the samples are dropped, every sample failing stops the run). A reply of the wrong length or
that is not JSON raises at once. Every request has the timeout, and a whole reply must arrive within
twice it: nothing waits forever on a server that hangs. Only the standard library is used.
"""

from __future__ import annotations

import base64
import io
import json
import math
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any

from ..errors import UserError

READS_CHOICES = ("images", "texts")
MAX_REPLY_BYTES = 64 * 2**20
BACKOFF_S = 0.25  # before retry k (0-based): BACKOFF_S * 2**k seconds, at most MAX_BACKOFF_S
MAX_BACKOFF_S = 5.0


class HttpRewardError(Exception):
    """A call of the http reward that failed: the server unreachable, or its reply unusable."""


class _Retryable(Exception):
    """A failure that may pass; `down`: the server did not answer at all (no connection, no reply)."""

    def __init__(self, message: str, down: bool = True):
        super().__init__(message)
        self.down = down


def check_reads_option(reads: Any, field: str) -> str:
    if reads not in READS_CHOICES:
        raise UserError(f"{field}.reads", f"{reads!r} is not one of {', '.join(READS_CHOICES)}",
                        "reads: images for pictures, texts for a text backend")
    return reads


def _check_options(url: Any, timeout: float, batch_size: int, retries: int, field: str) -> None:
    if not isinstance(url, str) or not url.startswith(("http://", "https://")) or len(url.split("://", 1)[1]) == 0:
        raise UserError(f"{field}.url", f"{url!r} is not an http:// or https:// address",
                        "e.g. url: http://127.0.0.1:8000/score (start one with raft-diffusion serve-reward)")
    if not math.isfinite(timeout) or timeout <= 0:
        raise UserError(f"{field}.timeout", f"{timeout!r} is not a positive number of seconds", "e.g. timeout: 60")
    if batch_size < 1:
        raise UserError(f"{field}.batch_size", f"{batch_size} is not a positive batch size", "e.g. batch_size: 16")
    if not 0 <= retries <= 100:
        raise UserError(f"{field}.retries", f"{retries} is outside 0..100", "e.g. retries: 2")


def encode_png(images) -> list[str]:
    """(N, 3, H, W) floats in [0, 1] -> N base64 PNG strings (uint8, rounded as the jpeg rewards do)."""
    from PIL import Image

    from .jpeg import to_uint8

    out = []
    for array in to_uint8(images):
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="PNG")
        out.append(base64.b64encode(buffer.getvalue()).decode("ascii"))
    return out


def decode_png(items: Sequence[Any]):
    """N base64 PNG strings -> (N, 3, H, W) float32 in [0, 1]; ValueError on anything else."""
    import numpy as np
    import torch
    from PIL import Image

    arrays = []
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise ValueError(f"images[{i}] is not a base64 string")
        try:
            with Image.open(io.BytesIO(base64.b64decode(item, validate=True))) as picture:
                arrays.append(np.asarray(picture.convert("RGB")))
        except Exception as e:  # noqa: BLE001 - any undecodable picture is the client's mistake
            raise ValueError(f"images[{i}] is not a base64 PNG: {type(e).__name__}") from None
    if not arrays:
        return torch.zeros(0, 3, 1, 1)
    if len({a.shape for a in arrays}) > 1:
        raise ValueError("the images differ in size")
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255


def parse_scores(body: bytes, n: int) -> list[float]:
    """A reply's scores as n floats, NaN for null; HttpRewardError for non-JSON or the wrong shape."""
    try:
        reply = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        start = body[:60].decode("utf-8", "replace").splitlines()
        raise HttpRewardError(f"the reply is not JSON: {(start or [''])[0]!r}") from None
    scores = reply.get("scores") if isinstance(reply, dict) else None
    if not isinstance(scores, list):
        raise HttpRewardError('the reply has no "scores" list')
    if len(scores) != n:
        raise HttpRewardError(f"the reply has {len(scores)} scores for {n} samples")
    out = []
    for v in scores:
        if v is None:
            out.append(math.nan)
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out.append(float(v))
        else:
            raise HttpRewardError(f"the reply has a score that is not a number or null: {v!r:.40}")
    return out


def http_reward(url: str | None = None, timeout: float = 60.0, batch_size: int = 16, retries: int = 2,
                reads: str = "images", field: str = "options"):
    """Scores from a server speaking the protocol above (e.g. `raft-diffusion serve-reward`)."""
    _check_options(url, timeout, batch_size, retries, field)
    check_reads_option(reads, field)
    state = {"down_until": 0.0, "why": ""}
    lock = threading.Lock()

    def post(payload: dict[str, Any], n: int) -> list[float]:
        data = json.dumps(payload).encode("utf-8")
        with lock:
            if time.monotonic() < state["down_until"]:
                # The server just failed every retry: the samples compose now scores one by one fail
                # at once, instead of each waiting out the retries again.
                raise HttpRewardError(f"{url}: {state['why']} (a moment ago; not retried)")
        last, down = "", False
        for attempt in range(retries + 1):
            if attempt:
                time.sleep(min(BACKOFF_S * 2 ** (attempt - 1), MAX_BACKOFF_S))
            try:
                return parse_scores(_request(url, data, timeout), n)
            except _Retryable as e:
                last, down = str(e), e.down
        if down:
            with lock:
                state["down_until"], state["why"] = time.monotonic() + min(timeout, 10.0), last
        tries = f"{retries + 1} attempts" if retries else "1 attempt"
        raise HttpRewardError(f"{url}: {last} ({tries})")

    def reward(outputs, prompts: Sequence[str]) -> list[float]:
        prompts = list(prompts)
        scores: list[float] = []
        for i in range(0, len(prompts), batch_size):
            chunk = prompts[i:i + batch_size]
            if reads == "images":
                payload = {"prompts": chunk, "images": encode_png(outputs[i:i + batch_size])}
            else:
                payload = {"prompts": chunk, "texts": [str(t) for t in outputs[i:i + batch_size]]}
            scores.extend(post(payload, len(chunk)))
        return scores

    reward.reads = reads
    return reward


def _request(url: str, data: bytes, timeout: float) -> bytes:
    """One POST; the reply's body. _Retryable for what may pass (connection, 5xx, timeout)."""
    request = urllib.request.Request(url, data=data, method="POST",
                                     headers={"Content-Type": "application/json", "Accept": "application/json"})
    deadline = time.monotonic() + 2 * timeout
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 - http(s) checked
            parts, size = [], 0
            while True:
                part = response.read(2**16)
                if not part:
                    break
                parts.append(part)
                size += len(part)
                if size > MAX_REPLY_BYTES:
                    raise HttpRewardError(f"{url}: the reply is over {MAX_REPLY_BYTES // 2**20} MiB")
                if time.monotonic() > deadline:
                    raise _Retryable(f"the reply took longer than {2 * timeout:g} s")
            return b"".join(parts)
    except (HttpRewardError, _Retryable):
        raise
    except urllib.error.HTTPError as e:
        detail = _error_detail(e)
        if e.code >= 500:
            raise _Retryable(f"HTTP {e.code}{detail}", down=False) from None
        raise HttpRewardError(f"{url}: HTTP {e.code}{detail}") from None
    except urllib.error.URLError as e:
        reason = e.reason
        if isinstance(reason, TimeoutError) or "timed out" in str(reason):
            raise _Retryable(f"no reply within the timeout of {timeout:g} s") from None
        raise _Retryable(f"cannot connect: {reason}") from None
    except TimeoutError:
        raise _Retryable(f"no reply within the timeout of {timeout:g} s") from None
    except (ConnectionError, OSError) as e:  # reset, refused, the server gone mid-reply (RemoteDisconnected)
        raise _Retryable(f"connection failed: {type(e).__name__}: {e}") from None
    except Exception as e:  # http.client.IncompleteRead, BadStatusLine: a server that died mid-reply
        raise _Retryable(f"broken reply: {type(e).__name__}") from None


def _error_detail(e: urllib.error.HTTPError) -> str:
    try:
        body = json.loads(e.read(4096) or b"{}")
    except Exception:  # noqa: BLE001
        return ""
    message = body.get("error") if isinstance(body, dict) else None
    return f": {str(message).splitlines()[0][:200]}" if message else ""


# --- the server ----------------------------------------------------------------------------------

def make_server(reward: Callable, name: str, reads: str, host: str = "127.0.0.1", port: int = 0,
                device=None):
    """A ThreadingHTTPServer scoring POST /score with `reward` (one call at a time), GET /health."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    import torch

    score_lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format, *args):  # noqa: A002 - no line per request on stderr
            pass

        def _reply(self, code: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode("utf-8")
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):  # noqa: N802 - http.server's name
            if self.path.split("?")[0].rstrip("/") == "/health":
                self._reply(200, {"reward": name, "reads": reads})
            else:
                self._reply(404, {"error": "unknown path; POST /score or GET /health"})

        def do_POST(self):  # noqa: N802
            if self.path.split("?")[0].rstrip("/") != "/score":
                self._reply(404, {"error": "unknown path; POST /score"})
                return
            try:
                length = int(self.headers.get("Content-Length") or 0)
                if not 0 <= length <= 2**30:
                    raise ValueError("bad Content-Length")
                request = json.loads(self.rfile.read(length))
                prompts = request.get("prompts") if isinstance(request, dict) else None
                if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
                    raise ValueError('"prompts" must be a list of strings')
                items = request.get(reads)
                if not isinstance(items, list) or len(items) != len(prompts):
                    raise ValueError(f'"{reads}" must be a list, one per prompt')
                if reads == "images":
                    outputs = decode_png(items)
                    if device is not None:
                        outputs = outputs.to(device)
                else:
                    if not all(isinstance(t, str) for t in items):
                        raise ValueError('"texts" must be strings')
                    outputs = items
            except ValueError as e:
                self._reply(400, {"error": str(e)})
                return
            try:
                with score_lock, torch.inference_mode():
                    raw = reward(outputs, prompts) if prompts else []
                values = raw.detach().cpu().tolist() if isinstance(raw, torch.Tensor) else list(raw)
                values = [v[0] if isinstance(v, (list, tuple)) and len(v) == 1 else v for v in values]  # (n, 1)
                if len(values) != len(prompts):
                    raise ValueError(f"the reward returned {len(values)} scores for {len(prompts)} samples")
                scores = [float(v) if v is not None and math.isfinite(float(v)) else None for v in values]
            except Exception as e:  # noqa: BLE001 - the client drops these samples
                self._reply(500, {"error": f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"})
                return
            self._reply(200, {"scores": scores})

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    return server
