"""PolicyClient: the small client of vla-serve's binary protocol (msgpack over HTTP keep-alive).

    client = PolicyClient("http://127.0.0.1:8000", token=None, timeout_s=10)
    out = client.act(image_HWC_uint8, "pick up the cup")   # out["action"]: float32 [action_dim]

It imports neither torch nor the model. A dropped connection is reopened and the request sent again (up to
`retries` times, with backoff); a 503 is retried after the server's Retry-After; any other refusal raises
PolicyServerError with the server's message.
"""

from __future__ import annotations

import time

import numpy as np

from vla_train.serving import wire


class PolicyServerError(RuntimeError):
    def __init__(self, status: int, detail: str):
        super().__init__(f"vla-serve answered {status}: {detail}")
        self.status, self.detail = status, detail


class PolicyClient:
    def __init__(
        self,
        url: str = "http://127.0.0.1:8000",
        token: str | None = None,
        timeout_s: float = 10.0,
        retries: int = 3,
        backoff_s: float = 0.2,
    ):
        self.url = url.rstrip("/")
        self.timeout_s, self.retries, self.backoff_s = timeout_s, retries, backoff_s
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = None
        self.num_reconnects = 0

    def _client(self):
        import httpx

        if self._http is None:
            self._http = httpx.Client(timeout=self.timeout_s, headers=self._headers)
        return self._http

    def close(self) -> None:
        if self._http is not None:
            self._http.close()
            self._http = None

    def __enter__(self) -> PolicyClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _request(self, method: str, path: str, content: bytes | None = None, headers: dict | None = None):
        import httpx

        last: Exception | None = None
        for attempt in range(self.retries + 1):
            try:
                response = self._client().request(method, self.url + path, content=content, headers=headers)
            except (httpx.TransportError, httpx.TimeoutException) as e:  # reconnect and send again
                last = e
                self.close()
                self.num_reconnects += 1
                time.sleep(self.backoff_s * 2**attempt)
                continue
            if response.status_code == 503 and attempt < self.retries:
                time.sleep(float(response.headers.get("retry-after", self.backoff_s)))
                continue
            if response.status_code >= 400:
                try:
                    detail = response.json().get("detail", response.text)
                except ValueError:
                    detail = response.text
                raise PolicyServerError(response.status_code, detail)
            return response
        raise ConnectionError(f"vla-serve at {self.url} unreachable after {self.retries + 1} tries: {last}")

    def act(
        self,
        image: np.ndarray | bytes,
        instruction: str,
        unnorm_key: str | None = None,
        eef_position=None,
        session: str | None = None,
    ) -> dict:
        """One action: {"action", "raw_action" (float32 arrays), "gripper_raw", "gripper_command",
        "interventions", "unnorm_key", "batch_size", "model_ms", "latency_ms"}. image: uint8 [H, W, 3],
        or the bytes of a JPEG/PNG file."""
        body = wire.msgpack_request(image, instruction, unnorm_key, eef_position, session)
        response = self._request(
            "POST", "/v1/act", body, {"Content-Type": "application/msgpack", "Accept": "application/msgpack"}
        )
        return wire.decode_msgpack_response(response.content)

    def health(self) -> dict:
        return self._request("GET", "/health").json()

    def info(self) -> dict:
        return self._request("GET", "/info").json()

    def estop(self) -> dict:
        return self._request("POST", "/estop").json()

    def reset_estop(self) -> dict:
        return self._request("POST", "/estop/reset").json()
