"""vla-serve: an exported policy behind HTTP (FastAPI + uvicorn), with dynamic batching and the safety layer.

Endpoints (all but /health need `Authorization: Bearer <token>` when the server has a token file):
  POST /act            OpenVLA's request and response (json_numpy arrays; {"encoded": ...} double-encoded)
  POST /v1/act         msgpack request -> msgpack response with the safe action, the raw action, the
                       gripper's raw value and command, the interventions, the batch size and latency
  GET  /health         {"status": "ok" | "estop"}
  GET  /info           action dim, chunk size, datasets, image size, safety settings and counts, batching
  POST /estop          every later request gets a zero-motion action ...
  POST /estop/reset    ... until this

Requests from all connections go into one bounded queue; one thread takes up to `max_batch` of them
(waiting at most `max_wait_ms` after the first) into one `predict_action_batch`, applies the safety
layer to each action and answers each request. A full queue answers 503 with Retry-After; a request not
answered within `request_timeout_s` gets 504 (and is dropped if it has not started). Bad input gets a 4xx
that names the field; nothing a client sends stops the server.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import queue
import threading
import time
from collections import Counter
from concurrent.futures import Future
from pathlib import Path

import msgpack
import numpy as np
import psutil
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from vla_train.config import ServeConfig
from vla_train.serving import wire
from vla_train.serving.safety import SafetyLayer
from vla_train.serving.wire import ActRequest, RequestError

RETRY_AFTER_S = 1


class Overloaded(RuntimeError):
    pass


class Batcher:
    """One thread that groups queued requests into batches for `run_batch(list[item]) -> list[result]`."""

    def __init__(self, run_batch, max_batch: int, max_wait_s: float, queue_size: int):
        self._run_batch = run_batch
        self.max_batch, self.max_wait_s = max_batch, max_wait_s
        self._queue: queue.Queue = queue.Queue(queue_size)
        self.batch_sizes: Counter[int] = Counter()
        self._thread = threading.Thread(target=self._loop, name="vla-batcher", daemon=True)
        self._thread.start()

    def submit(self, item) -> Future:
        future: Future = Future()
        try:
            self._queue.put_nowait((item, future))
        except queue.Full:
            raise Overloaded(
                f"{self._queue.maxsize} requests are waiting; retry in {RETRY_AFTER_S} s"
            ) from None
        return future

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop the thread after the requests queued so far (within timeout_s; it is a daemon thread)."""
        try:
            self._queue.put(None, timeout=timeout_s)
        except queue.Full:  # the model is stuck with a full queue: leave the thread to the process exit
            return
        self._thread.join(timeout=timeout_s)

    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            deadline = time.monotonic() + self.max_wait_s
            while len(batch) < self.max_batch:
                remaining = deadline - time.monotonic()
                try:
                    nxt = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._queue.put(None)  # seen again by the outer get
                    break
                batch.append(nxt)
            live = [(item, f) for item, f in batch if f.set_running_or_notify_cancel()]  # timed-out ones drop
            if not live:
                continue
            self.batch_sizes[len(live)] += 1
            try:
                results = self._run_batch([item for item, _ in live])
            except Exception as e:  # answered as 500 to this batch's requests; the server goes on
                for _, f in live:
                    f.set_exception(e)
                continue
            for (_, f), result in zip(live, results, strict=True):
                f.set_result(result)


class PolicyService:
    """The policy, its safety layers (one per dataset's bounds) and the batcher: everything but HTTP."""

    def __init__(self, policy, cfg: ServeConfig):
        self.policy, self.cfg = policy, cfg
        c = policy.model.config
        extras = [
            what
            for what, on in (
                (f"chunks of {c.chunk_size}", c.chunk_size > 1),
                (f"cameras {list(c.cameras)}", list(c.cameras) != ["primary"]),
                (f"proprio ({c.proprio_dim} values)", c.proprio_dim > 0),
            )
            if on
        ]
        if extras:  # the wire format and the safety layer take one frame and return one action
            raise ValueError(
                f"policy: vla-serve serves models of one camera that return one action; this one has "
                f"{', '.join(extras)}. Run it in-process (VLAPolicy.predict_action) for now"
            )
        stats = c.norm_stats
        self.datasets = sorted(stats)
        if cfg.unnorm_key and cfg.unnorm_key not in stats:
            raise ValueError(
                f"unnorm_key: '{cfg.unnorm_key}' is not among the model's datasets {self.datasets}"
            )
        self.default_key = cfg.unnorm_key or (self.datasets[0] if len(self.datasets) == 1 else None)
        self.safety = {key: SafetyLayer(cfg.safety, policy.action_stats(key)) for key in self.datasets}
        self.image_size = policy.processor.settings.image_size
        self.counts: Counter[str] = Counter()
        self.batcher = Batcher(self._run_batch, cfg.max_batch, cfg.max_wait_ms / 1000, cfg.queue_size)

    def prepare(self, request: ActRequest) -> tuple[ActRequest, np.ndarray, str]:
        """Checks that need the model (the dataset) and the resize to the model's frame size; runs in the
        request's thread, so that the batch thread only runs the model."""
        from vla_train.models.processor import resize_frames

        key = request.unnorm_key or self.default_key
        if key is None:
            raise RequestError(
                f"unnorm_key: this model has statistics for several datasets; name one of {self.datasets}"
            )
        if key not in self.safety:
            raise RequestError(f"unnorm_key: unknown dataset '{key}'; this model has {self.datasets}")
        image = request.image
        crop = self.policy.processor.settings.center_crop_area
        if image.shape[:2] != (self.image_size, self.image_size) or crop < 1.0:
            image = resize_frames(image[None], self.image_size, crop)[0]
        return request, image, key

    def _run_batch(self, items: list[tuple[ActRequest, np.ndarray, str]]) -> list[dict]:
        start = time.perf_counter()
        images = np.stack([image for _, image, _ in items])
        instructions = [r.instruction for r, _, _ in items]
        keys = [key for _, _, key in items]
        # the images are at model size: the processor's crop and resize already happened in prepare()
        actions = self.policy.predict_action_batch(images, instructions, keys, preprocessed=True)
        model_ms = (time.perf_counter() - start) * 1000
        out = []
        for (request, _, key), action in zip(items, actions, strict=True):
            safe = self.safety[key].apply(action, request.eef_position, request.session)
            out.append({**safe.to_dict(), "unnorm_key": key, "batch_size": len(items), "model_ms": model_ms})
        return out

    def estop(self, engage: bool) -> bool:
        """Engage (or reset) the e-stop of every dataset's safety layer; returns whether it is engaged."""
        for layer in self.safety.values():
            layer.engage_estop() if engage else layer.reset_estop()
        return self.estopped

    @property
    def estopped(self) -> bool:
        return any(layer.estopped for layer in self.safety.values())

    def info(self) -> dict:
        model = self.policy.model
        sizes = self.batcher.batch_sizes
        n = sum(sizes.values())
        return {
            "action_dim": model.config.action_dim,
            "chunk_size": 1,
            "datasets": self.datasets,
            "default_unnorm_key": self.default_key,
            "image_size": self.image_size,
            "center_crop_area": self.policy.processor.settings.center_crop_area,
            "quantization": self.cfg.quantization,
            "device": self.cfg.device,
            "num_parameters": sum(p.numel() for p in model.parameters()),
            "batching": {
                "max_batch": self.cfg.max_batch,
                "max_wait_ms": self.cfg.max_wait_ms,
                "queue_size": self.cfg.queue_size,
                "request_timeout_s": self.cfg.request_timeout_s,
                "num_batches": n,
                "mean_batch_size": sum(k * v for k, v in sizes.items()) / n if n else 0.0,
                "batch_sizes": {str(k): v for k, v in sorted(sizes.items())},
            },
            "requests": dict(self.counts),
            "rss_bytes": psutil.Process().memory_info().rss,
            "estop": self.estopped,
            "safety": {key: layer.info() for key, layer in self.safety.items()},
        }


def make_app(service: PolicyService, cfg: ServeConfig, token: str | None = None):
    app = FastAPI(title="vla-serve", docs_url=None, redoc_url=None, openapi_url=None)
    limit = int(cfg.max_body_mb * 2**20)

    def error(status: int, detail: str, headers: dict | None = None) -> JSONResponse:
        service.counts[f"{status // 100}xx"] += 1
        service.counts[str(status)] += 1
        return JSONResponse({"detail": detail}, status_code=status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc):
        return error(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc):
        return error(422, str(exc))

    def refused(request: Request) -> JSONResponse | None:
        """401 unless the request carries the server's bearer token (compared in constant time)."""
        if token is None:
            return None
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if hmac.compare_digest(given.strip().encode(), token.encode()) and scheme.lower() == "bearer":
            return None
        return error(401, "authorization: missing or wrong bearer token", {"WWW-Authenticate": "Bearer"})

    async def read_body(request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            raise RequestError(f"body: {declared} bytes, more than the server's {cfg.max_body_mb:g} MiB", 413)
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise RequestError(f"body: more than the server's {cfg.max_body_mb:g} MiB", 413)
            chunks.append(chunk)
        return b"".join(chunks)

    async def act(request: Request, parse) -> dict | JSONResponse:
        """The shared path of both protocols: read, parse, queue, wait. Returns the result or an error."""
        if denied := refused(request):
            return denied
        try:
            body = await read_body(request)
            parsed, extra = await run_in_threadpool(parse, body)
            prepared = await run_in_threadpool(service.prepare, parsed)
            future = service.batcher.submit(prepared)
        except RequestError as e:
            return error(e.status, str(e))
        except Overloaded as e:
            return error(503, str(e), {"Retry-After": str(RETRY_AFTER_S)})
        start = time.perf_counter()
        try:
            result = await asyncio.wait_for(asyncio.wrap_future(future), cfg.request_timeout_s)
        except asyncio.TimeoutError:
            return error(504, f"no answer within request_timeout_s = {cfg.request_timeout_s:g} s")
        except Exception as e:  # the model failed on this batch: the server stays up
            return error(500, f"the policy failed: {type(e).__name__}: {e}")
        service.counts["2xx"] += 1
        return {**result, "latency_ms": (time.perf_counter() - start) * 1000, "extra": extra}

    @app.post("/act")
    async def act_openvla(request: Request):
        result = await act(request, wire.parse_json_request)
        if isinstance(result, JSONResponse):
            return result
        action = wire.json_numpy_object(np.asarray(result["action"], np.float32))
        headers = {
            "X-VLA-Interventions": json.dumps(result["interventions"], separators=(",", ":"))[:4000],
            "X-VLA-Gripper": json.dumps([result["gripper_raw"], result["gripper_command"]]),
        }
        content = json.dumps(action) if result["extra"] else action  # double-encoded in, double-encoded out
        return JSONResponse(content, headers=headers)

    @app.post("/v1/act")
    async def act_msgpack(request: Request):
        result = await act(request, lambda body: (wire.parse_msgpack_request(body), None))
        if isinstance(result, JSONResponse):
            return result
        result.pop("extra")
        for key in ("action", "raw_action"):
            result[key] = wire.encode_array(np.asarray(result[key], np.float32))
        return Response(msgpack.packb(result, use_bin_type=True), media_type="application/msgpack")

    @app.get("/health")
    async def health():
        return {"status": "estop" if service.estopped else "ok"}

    @app.get("/info")
    async def info(request: Request):
        return refused(request) or service.info()

    @app.post("/estop")
    async def estop(request: Request):
        return refused(request) or {"estop": service.estop(True)}

    @app.post("/estop/reset")
    async def estop_reset(request: Request):
        return refused(request) or {"estop": service.estop(False)}

    return app


def load_service(cfg: ServeConfig) -> PolicyService:
    from vla_train.models.policy import VLAPolicy

    policy = VLAPolicy.from_dir(cfg.policy, cfg.device, cfg.quantization)
    return PolicyService(policy, cfg)


def serve(cfg: ServeConfig) -> None:
    """Load the policy and serve until interrupted."""
    import uvicorn

    token = Path(cfg.token_file).read_text().strip() if cfg.token_file else None
    service = load_service(cfg)
    app = make_app(service, cfg, token)
    safety = "on" if cfg.safety.enabled else "OFF (bounds, translation, rotation and workspace rules skipped)"
    print(
        f"vla-serve: {cfg.policy} on http://{cfg.host}:{cfg.port} (datasets {service.datasets}, "
        f"safety {safety}, token {'required' if token else 'none'}, max_batch {cfg.max_batch})",
        flush=True,
    )
    try:
        uvicorn.run(
            app, host=cfg.host, port=cfg.port, log_level="warning", access_log=False, timeout_keep_alive=30
        )
    finally:
        service.batcher.close()
