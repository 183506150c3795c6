"""vla-serve: the safety layer's rules, OpenVLA's frame resize, the wire checks, and a real server process
answering an OpenVLA-style client, PolicyClient, malformed requests, e-stop and concurrent load."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from vla_train.config import SafetyConfig, ServeConfig
from vla_train.serving.safety import SafetyLayer

STATS = {
    "mean": [0.0] * 6 + [0.5],
    "std": [0.5] * 6 + [0.5],
    "min": [-1.0] * 6 + [0.0],
    "max": [1.0] * 6 + [1.0],
    "q01": [-0.9] * 6 + [0.0],
    "q99": [0.9] * 6 + [1.0],
    "mask": [True] * 6 + [False],
}
INSTRUCTIONS = ["pick up the red block", "open the drawer", "push the blue cube to the left"]


def action(*values, gripper=1.0):
    a = np.zeros(7, np.float32)
    a[: len(values)] = values
    a[6] = gripper
    return a


# ---- the safety layer ---------------------------------------------------------------------------------
def test_bounds_clamp_each_normalized_dimension_with_the_margin():
    layer = SafetyLayer(SafetyConfig(margin=0.1), STATS)
    out = layer.apply(action(5.0, -0.5, -3.0))
    assert np.allclose(out.action[:3], [1.2, -0.5, -1.2])  # range 2, margin 0.1 -> +-0.2
    (bounds,) = [n for n in out.interventions if n["rule"] == "bounds"]
    assert bounds["dims"] == [0, 2] and bounds["before"] == [5.0, -3.0]
    q = SafetyLayer(SafetyConfig(bounds="q01_q99", margin=0.0), STATS).apply(action(0.95))
    assert q.action[0] == pytest.approx(0.9)
    assert layer.info()["interventions"]["bounds"] == 1


def test_translation_and_rotation_norms_are_limited_keeping_the_direction():
    layer = SafetyLayer(SafetyConfig(max_translation=0.1, max_rotation=0.2), STATS)
    out = layer.apply(action(0.3, 0.4, 0.0, 0.0, 0.6, 0.8))
    assert np.linalg.norm(out.action[:3]) == pytest.approx(0.1)
    assert np.allclose(out.action[:3] / 0.1, [0.6, 0.8, 0.0], atol=1e-6)
    assert np.linalg.norm(out.action[3:6]) == pytest.approx(0.2)
    assert {n["rule"] for n in out.interventions} == {"max_translation", "max_rotation"}
    small = layer.apply(action(0.05, 0.0, 0.0, 0.1))
    assert not small.interventions and np.array_equal(small.action[:6], action(0.05, 0, 0, 0.1)[:6])
    # 0 = from the dataset: the norm of the largest per-dimension magnitudes (1.0 each, widened by the margin)
    auto = SafetyLayer(SafetyConfig(margin=0.0), STATS)
    assert auto.max_translation == pytest.approx(np.sqrt(3))


def test_workspace_box_stops_motion_that_leaves_it():
    cfg = SafetyConfig(
        workspace_min=[0.0, 0.0, 0.0], workspace_max=[1.0, 1.0, 0.5], workspace_action_scale=0.5
    )
    layer = SafetyLayer(cfg, STATS)
    out = layer.apply(action(0.4, -0.4, 0.8), eef_position=np.array([0.9, 0.5, 0.45]))
    # x may move 0.1 (= 0.2 action units at scale 0.5), y is free, z may move 0.05 (0.1 units)
    assert np.allclose(out.action[:3], [0.2, -0.4, 0.1])
    (note,) = out.interventions
    assert note["rule"] == "workspace" and note["dims"] == [0, 2]
    outside = layer.apply(action(0.3, 0.0, -0.3), eef_position=np.array([1.2, 0.5, 0.2]))
    assert outside.action[0] == 0.0 and outside.action[2] == pytest.approx(-0.3)  # back inward is allowed
    assert not layer.apply(action(0.3), eef_position=None).interventions  # no position: no box


def test_gripper_command_has_hysteresis_per_session():
    layer = SafetyLayer(SafetyConfig(), STATS)
    values = [0.9, 0.55, 0.45, 0.3, 0.45, 0.55, 0.7]
    commands = [layer.apply(action(gripper=v)).gripper_command for v in values]
    assert commands == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0]
    out = layer.apply(action(gripper=0.3))
    assert out.gripper_raw == pytest.approx(0.3) and out.action[6] == 0.0
    # another robot's session starts from its own first value (the band's middle decides)
    assert layer.apply(action(gripper=0.55), session="robot2").gripper_command == 1.0
    assert layer.apply(action(gripper=0.45), session="robot2").gripper_command == 1.0
    kept = [n for n in layer.apply(action(gripper=0.45), session="robot2").interventions]
    assert kept and kept[0]["rule"] == "gripper_hysteresis" and kept[0]["kept"] == 1.0


def test_estop_gives_zero_motion_until_reset_even_with_safety_off():
    for enabled in (True, False):
        layer = SafetyLayer(SafetyConfig(enabled=enabled), STATS)
        layer.apply(action(gripper=0.1))  # closed
        layer.engage_estop()
        out = layer.apply(action(0.5, 0.5, 0.5, 0.1, 0.1, 0.1, gripper=0.9))
        assert np.array_equal(out.action, action(gripper=0.0))  # no motion, the gripper stays closed
        assert [n["rule"] for n in out.interventions] == ["estop"]
        layer.reset_estop()
        after = layer.apply(action(0.5, gripper=0.9))
        assert after.action[0] == 0.5 and not any(n["rule"] == "estop" for n in after.interventions)
    off = SafetyLayer(SafetyConfig(enabled=False), STATS).apply(action(5.0, gripper=0.3))
    assert off.action[0] == 5.0 and off.action[6] == pytest.approx(0.3) and off.gripper_command == 0.0


def test_a_recorded_action_stream_with_an_outlier_is_clamped_and_reported(small_synthetic, tmp_path):
    """The actions of recorded episodes pass unchanged (within the data's own bounds); one outlier injected
    into the stream is clamped and reported, and only that step."""
    import tensorflow_datasets as tfds

    from vla_train.data.rlds import get_statistics

    root, _ = small_synthetic
    stats = get_statistics(root, "vla_synthetic", str(tmp_path / "stats"), "error")["action"]
    builder = tfds.builder_from_directory(str(next((Path(root) / "vla_synthetic").iterdir())))
    stream = [
        step["action"]
        for episode in tfds.as_numpy(builder.as_dataset(split="train").take(4))
        for step in episode["steps"]
    ]
    stream = np.asarray(stream, np.float32)
    k = len(stream) // 2
    stream[k, 1] = 40.0  # a spike far outside the data
    layer = SafetyLayer(SafetyConfig(), stats)
    outs = [layer.apply(a) for a in stream]
    flagged = [i for i, o in enumerate(outs) if any(n["rule"] == "bounds" for n in o.interventions)]
    assert flagged == [k]
    high = stats["max"][1] + 0.05 * (stats["max"][1] - stats["min"][1])
    assert outs[k].action[1] == pytest.approx(high) and outs[k].raw_action[1] == 40.0
    for i, o in enumerate(outs):
        if i != k:
            assert np.array_equal(o.action[:6], stream[i, :6])
    assert layer.info()["interventions"]["bounds"] == 1


# ---- OpenVLA's preprocessing --------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(256, 256), (480, 640), (224, 224), (37, 100)])
def test_frames_are_resized_exactly_as_openvla_does(shape):
    from PIL import Image

    from vla_train.models.processor import resize_frames

    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (2, *shape, 3), dtype=np.uint8)
    ours = resize_frames(frames, 224)
    for frame, mine in zip(frames, ours):
        assert np.array_equal(
            mine, np.asarray(Image.fromarray(frame).convert("RGB").resize((224, 224), Image.BICUBIC))
        )
    if shape == (224, 224):
        assert np.array_equal(ours, frames)


# ---- the wire checks ----------------------------------------------------------------------------------
def test_msgpack_refuses_extension_types_and_wrong_array_sizes():
    import msgpack

    from vla_train.serving.wire import RequestError, parse_msgpack_request

    pickled = msgpack.packb({"image": msgpack.ExtType(1, b"cos\nsystem\n"), "instruction": "x"})
    with pytest.raises(RequestError, match="extension"):
        parse_msgpack_request(pickled)
    short = msgpack.packb(
        {"image": {"dtype": "|u1", "shape": [16, 16, 3], "data": b"\0" * 10}, "instruction": "x"}
    )
    with pytest.raises(RequestError, match="image: 10 bytes"):
        parse_msgpack_request(short)
    obj = msgpack.packb({"image": {"dtype": "|O", "shape": [1], "data": b"\0" * 8}, "instruction": "x"})
    with pytest.raises(RequestError, match="dtype '|O' is not allowed"):
        parse_msgpack_request(obj)


def test_serve_config_names_each_bad_field(tmp_path):
    from vla_train.config import ConfigError
    from vla_train.config_cli import parse_config

    with pytest.raises(ConfigError) as e:
        parse_config(
            ServeConfig,
            ["--policy", str(tmp_path), "--quantization", "fp8", "--max_batch", "0", "--safety.margin", "-1"],
        )
    text = str(e.value)
    for field in ("policy:", "quantization:", "max_batch:", "safety.margin:"):
        assert field in text, text
    from vla_train.cli import _safety_switch

    assert _safety_switch(["--safety", "off", "--port", "1"]) == ["--safety.enabled=false", "--port", "1"]


# ---- a model to serve ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from test_model import TINY

    from vla_train.models.load import build_from_config, save_model_dir

    model, processor = build_from_config(TINY, INSTRUCTIONS, seed=0)
    out = tmp_path_factory.mktemp("serve") / "model"
    save_model_dir(out, model, processor, {"ds": {"action": STATS, "proprio": STATS}})
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server(model_dir: Path, *args: str, port: int | None = None):
    """A real `vla-serve` process; yields (base url, process)."""
    import httpx

    port = port or free_port()
    code = "from vla_train.cli import serve_main; serve_main()"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, "--policy", str(model_dir), "--port", str(port), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"vla-serve exited {proc.returncode}:\n{proc.stdout.read()}")
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("vla-serve did not come up in 120 s")
            time.sleep(0.2)
        yield url, proc
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def served(model_dir, tmp_path_factory):
    token_file = tmp_path_factory.mktemp("token") / "token"
    token_file.write_text("s3cret-token\n")
    with server(model_dir, "--token-file", str(token_file), "--max_body_mb", "1", "--max_wait_ms", "20") as (
        url,
        proc,
    ):
        yield url, "s3cret-token", proc


@pytest.fixture(scope="module")
def policy(model_dir):
    from vla_train.models.policy import VLAPolicy

    return VLAPolicy.from_dir(model_dir)


@contextlib.contextmanager
def json_numpy_patched():
    """json_numpy.patch() as OpenVLA's deploy script does, undone afterwards (it replaces json's functions)."""
    import json_numpy

    saved = json.dumps, json.loads, json.dump, json.load
    json_numpy.patch()
    try:
        yield
    finally:
        json.dumps, json.loads, json.dump, json.load = saved


def frame(seed: int, shape=(48, 64)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (*shape, 3), dtype=np.uint8)


def test_an_openvla_client_gets_the_policy_action(served, policy):
    """requests + json_numpy, as OpenVLA's deploy.py documents (plain and double-encoded): the action is
    the in-process policy's, through the same safety layer; PolicyClient's raw_action is the policy's."""
    import requests

    from vla_train.serving import PolicyClient

    url, token, _ = served
    headers = {"Authorization": f"Bearer {token}"}
    layer = SafetyLayer(SafetyConfig(), policy.action_stats())
    for seed in range(3):
        image, text = frame(seed), INSTRUCTIONS[seed]
        expected = policy.predict_action(image, text)
        safe = layer.apply(expected).action
        with json_numpy_patched():
            got = requests.post(
                url + "/act", json={"image": image, "instruction": text}, headers=headers
            ).json()
            encoded = json.dumps({"image": image, "instruction": text, "unnorm_key": "ds"})
            double = requests.post(url + "/act", json={"encoded": encoded}, headers=headers)
            assert double.status_code == 200, double.text
            double_action = json.loads(double.json())
        assert isinstance(got, np.ndarray) and got.dtype == np.float32
        assert np.array_equal(got, safe) and np.array_equal(double_action, safe)
        with PolicyClient(url, token=token) as client:
            out = client.act(image, text)
        assert np.array_equal(out["raw_action"], expected) and np.array_equal(out["action"], safe)
        assert out["gripper_raw"] == pytest.approx(float(expected[6]))
        assert out["gripper_command"] in (0.0, 1.0)


def malformed_requests(token: str):
    """(kind, method, path, body, headers, the field the answer must name) x 12 kinds."""
    import msgpack

    from vla_train.serving.wire import encode_array

    good = frame(0)
    auth = {"Authorization": f"Bearer {token}"}
    mp = {**auth, "Content-Type": "application/msgpack"}

    def pack(**body):
        return msgpack.packb({"instruction": "pick up the red block", **body}, use_bin_type=True)

    return [
        ("shape", "/v1/act", pack(image=encode_array(good[..., :2])), mp, "image"),
        ("dtype", "/v1/act", pack(image=encode_array(good.astype(np.float32))), mp, "image"),
        ("size", "/v1/act", pack(image=encode_array(good[:4, :4])), mp, "image"),
        ("not an image", "/v1/act", pack(image=b"GIF89a not a frame at all"), mp, "image"),
        ("truncated jpeg", "/v1/act", pack(image=b"\xff\xd8\xff\xe0" + b"\0" * 64), mp, "image"),
        ("no instruction", "/v1/act", msgpack.packb({"image": encode_array(good)}), mp, "instruction"),
        ("unnorm_key", "/v1/act", pack(image=encode_array(good), unnorm_key="bridge_orig"), mp, "unnorm_key"),
        ("oversized", "/v1/act", b"\0" * (1 << 20 | 1), mp, "body"),
        (
            "token",
            "/v1/act",
            pack(image=encode_array(good)),
            {"Authorization": "Bearer wrong"},
            "authorization",
        ),
        ("garbage msgpack", "/v1/act", b"\xc1\xff\x00garbage", mp, "body"),
        ("garbage json", "/act", b"{not json", auth, "body"),
        (
            "bad json_numpy",
            "/act",
            json.dumps(
                {"image": {"__numpy__": "***", "dtype": "|u1", "shape": [2]}, "instruction": "x"}
            ).encode(),
            auth,
            "image",
        ),
    ]


def test_malformed_requests_get_4xx_naming_the_problem_and_the_server_survives(served):
    import httpx

    from vla_train.serving import PolicyClient

    url, token, proc = served
    kinds = malformed_requests(token)
    statuses: dict[str, set[int]] = {}
    with httpx.Client(timeout=30) as http:
        for i in range(1000):
            kind, path, body, headers, field = kinds[i % len(kinds)]
            r = http.post(url + path, content=body, headers=headers)
            assert 400 <= r.status_code < 500, (kind, r.status_code, r.text)
            assert r.json()["detail"].startswith(field), (kind, r.json())
            statuses.setdefault(kind, set()).add(r.status_code)
    assert statuses["oversized"] == {413} and statuses["token"] == {401}
    assert proc.poll() is None
    with PolicyClient(url, token=token) as client:
        out = client.act(frame(1), "open the drawer")
        assert out["action"].shape == (7,) and np.isfinite(out["action"]).all()
        info = client.info()
    assert info["requests"]["4xx"] >= 1000 and info["requests"]["413"] >= 1000 // len(kinds)


def test_estop_endpoint_and_info(served):
    from vla_train.serving import PolicyClient, PolicyServerError

    url, token, _ = served
    with PolicyClient(url, token=token) as client:
        info = client.info()
        assert info["action_dim"] == 7 and info["chunk_size"] == 1 and info["datasets"] == ["ds"]
        assert info["image_size"] == 32 and info["safety"]["ds"]["enabled"] is True
        client.estop()
        assert client.health() == {"status": "estop"}
        out = client.act(frame(2), "open the drawer")
        assert np.array_equal(out["action"][:6], np.zeros(6)) and out["interventions"][0]["rule"] == "estop"
        client.reset_estop()
        assert client.health() == {"status": "ok"}
        assert all(n["rule"] != "estop" for n in client.act(frame(2), "open the drawer")["interventions"])
        assert client.info()["safety"]["ds"]["interventions"]["estop"] >= 1
    with PolicyClient(url, token="nope") as bad, pytest.raises(PolicyServerError) as e:
        bad.estop()
    assert e.value.status == 401


def test_concurrent_clients_are_batched_without_errors(served):
    from vla_train.serving import PolicyClient

    url, token, _ = served
    errors, sizes, results = [], [], {}

    def client_loop(c: int):
        with PolicyClient(url, token=token) as client:
            for i in range(12):
                try:
                    out = client.act(frame(100 + i), INSTRUCTIONS[(c + i) % 3])
                    sizes.append(out["batch_size"])
                    results[(c, i)] = out["raw_action"]
                except Exception as e:  # collected: the assertion below shows them
                    errors.append(repr(e))

    threads = [threading.Thread(target=client_loop, args=(c,)) for c in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    assert len(sizes) == 96 and max(sizes) > 1, sizes
    assert all(np.isfinite(a).all() and a.shape == (7,) for a in results.values())


def test_client_survives_a_server_restart(model_dir, policy):
    """Also: with --safety off, OpenVLA's client gets exactly VLAPolicy.predict_action's action."""
    import requests

    from vla_train.serving import PolicyClient

    port = free_port()
    client = PolicyClient(f"http://127.0.0.1:{port}", timeout_s=5, retries=2, backoff_s=0.05)
    with server(model_dir, "--safety", "off", port=port) as (url, _):
        first = client.act(frame(3), "open the drawer")["raw_action"]
        with json_numpy_patched():
            got = requests.post(
                url + "/act", json={"image": frame(3), "instruction": "open the drawer"}
            ).json()
        assert np.array_equal(got, policy.predict_action(frame(3), "open the drawer"))
        assert client.info()["safety"]["ds"]["enabled"] is False
    with pytest.raises(ConnectionError, match="unreachable after 3 tries"):
        client.act(frame(3), "open the drawer")
    with server(model_dir, port=port):
        again = client.act(frame(3), "open the drawer")["raw_action"]
    client.close()
    assert np.array_equal(first, again) and client.num_reconnects >= 1


# ---- the batcher under overload -----------------------------------------------------------------------
def test_full_queue_answers_503_and_a_slow_answer_504(model_dir):
    from fastapi.testclient import TestClient

    from vla_train.models.policy import VLAPolicy
    from vla_train.serving.server import PolicyService, make_app
    from vla_train.serving.wire import msgpack_request

    policy = VLAPolicy.from_dir(model_dir)
    release = threading.Event()
    original = policy.predict_action_batch

    def slow(*args, **kwargs):
        release.wait(30)
        return original(*args, **kwargs)

    policy.predict_action_batch = slow
    cfg = ServeConfig(policy=str(model_dir), max_batch=1, queue_size=1, request_timeout_s=0.5)
    service = PolicyService(policy, cfg)
    body = msgpack_request(frame(0), "open the drawer")
    statuses, retry_after = [], []
    with TestClient(make_app(service, cfg)) as http:

        def post():
            r = http.post("/v1/act", content=body)
            statuses.append(r.status_code)
            retry_after.append(r.headers.get("retry-after"))

        threads = [threading.Thread(target=post) for _ in range(6)]
        for t in threads:
            t.start()
            time.sleep(0.05)
        for t in threads:
            t.join()
        release.set()
        assert 503 in statuses and 504 in statuses, statuses
        assert retry_after[statuses.index(503)] == "1"
        time.sleep(0.2)
        assert http.post("/v1/act", content=body).status_code == 200  # the server goes on
    service.batcher.close()


def test_quantized_inference_loads_bitsandbytes_layers(model_dir, policy):
    import bitsandbytes as bnb

    from vla_train.models.policy import VLAPolicy

    images = np.stack([frame(i, (32, 32)) for i in range(4)])
    texts = [INSTRUCTIONS[i % 3] for i in range(4)]
    for quantization, layer in (("nf4", bnb.nn.Linear4bit), ("int8", bnb.nn.Linear8bitLt)):
        q = VLAPolicy.from_dir(model_dir, quantization=quantization)
        assert any(isinstance(m, layer) for m in q.model.modules())
        actions = q.predict_action_batch(images, texts)
        assert actions.shape == (4, 7) and np.isfinite(actions).all()
        assert (actions[:, :6] >= -0.9 - 1e-6).all() and (actions[:, :6] <= 0.9 + 1e-6).all()
