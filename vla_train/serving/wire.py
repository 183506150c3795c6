"""What travels between a client and `vla-serve`, and the checks every request passes (numpy and the
standard library only: the client imports this without torch).

Two encodings of the same request ({image, instruction, unnorm_key?, eef_position?, session?}):
- JSON, OpenVLA's: numpy arrays as json_numpy objects ({"__numpy__": base64, "dtype": descr, "shape"}),
  or plain nested lists; the whole body may be double-encoded as {"encoded": "<json text>"}.
- msgpack, ours: arrays as {"dtype": descr, "shape": [...], "data": bytes}; the image may also be the bytes
  of a JPEG or PNG file.
Nothing is ever unpickled: arrays are rebuilt with np.frombuffer from an allowlist of numeric dtypes, and
msgpack extension types are refused.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
from dataclasses import dataclass

import numpy as np

MIN_SIDE, MAX_SIDE = 8, 4096  # accepted image sides in pixels
MAX_INSTRUCTION_CHARS = 2048
ARRAY_DTYPES = {"|u1", "<u2", "<i2", "<i4", "<i8", "<f2", "<f4", "<f8", "|b1"}


class RequestError(ValueError):
    """A request the server refuses: `status` is the HTTP status, the message names the field."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass
class ActRequest:
    image: np.ndarray  # uint8 [H, W, 3]
    instruction: str
    unnorm_key: str | None = None
    eef_position: np.ndarray | None = None  # float64 [3]
    session: str = "default"


# ---- arrays ---------------------------------------------------------------------------------------
def encode_array(a: np.ndarray) -> dict:
    a = np.ascontiguousarray(a)
    return {"dtype": a.dtype.str, "shape": list(a.shape), "data": a.tobytes()}


def _array(data: bytes, dtype: str, shape, field: str) -> np.ndarray:
    if dtype not in ARRAY_DTYPES:
        raise RequestError(f"{field}: dtype '{dtype}' is not allowed; send one of {sorted(ARRAY_DTYPES)}")
    if not isinstance(shape, (list, tuple)) or not all(isinstance(n, int) and n >= 0 for n in shape):
        raise RequestError(f"{field}: shape must be a list of non-negative integers, got {shape!r}")
    dt = np.dtype(dtype)
    if int(np.prod(shape, dtype=np.int64)) * dt.itemsize != len(data):
        raise RequestError(
            f"{field}: {len(data)} bytes do not hold an array of shape {list(shape)} and dtype {dtype}"
        )
    return np.frombuffer(data, dt).reshape(shape)


def decode_msgpack_array(obj, field: str) -> np.ndarray:
    if not isinstance(obj, dict) or not {"dtype", "shape", "data"} <= set(obj):
        raise RequestError(f"{field}: expected an array as {{dtype, shape, data}}")
    if not isinstance(obj["data"], bytes) or not isinstance(obj["dtype"], str):
        raise RequestError(f"{field}: data must be bytes and dtype a string")
    return _array(obj["data"], obj["dtype"], obj["shape"], field)


def decode_json_numpy(obj, field: str) -> np.ndarray:
    if not isinstance(obj.get("__numpy__"), str) or not isinstance(obj.get("dtype"), str):
        raise RequestError(f"{field}: a json_numpy object needs '__numpy__' (base64) and 'dtype' strings")
    try:
        data = base64.b64decode(obj["__numpy__"], validate=True)
    except (binascii.Error, ValueError) as e:
        raise RequestError(f"{field}: '__numpy__' is not base64 ({e})") from None
    return _array(data, obj["dtype"], obj.get("shape", []), field)


def json_numpy_object(a: np.ndarray) -> dict:
    """The json_numpy encoding of an array (what OpenVLA's server returns and its clients decode)."""
    a = np.ascontiguousarray(a)
    return {
        "__numpy__": base64.b64encode(a.tobytes()).decode(),
        "dtype": np.lib.format.dtype_to_descr(a.dtype),
        "shape": list(a.shape),
    }


# ---- images ---------------------------------------------------------------------------------------
def decode_image_bytes(data: bytes, field: str = "image") -> np.ndarray:
    from PIL import Image

    if not (data[:3] == b"\xff\xd8\xff" or data[:8] == b"\x89PNG\r\n\x1a\n"):
        raise RequestError(f"{field}: the bytes are neither a JPEG nor a PNG file (nor an array object)")
    try:
        with Image.open(io.BytesIO(data)) as im:
            if max(im.size) > MAX_SIDE:
                raise RequestError(
                    f"{field}: {im.size[0]}x{im.size[1]} pixels, more than {MAX_SIDE} per side"
                )
            return np.asarray(im.convert("RGB"))
    except RequestError:
        raise
    except Exception as e:  # a broken or hostile file (truncated, decompression bomb, ...): the client's
        raise RequestError(f"{field}: the image file cannot be decoded ({type(e).__name__}: {e})") from None


def check_image(image: np.ndarray, field: str = "image") -> np.ndarray:
    if image.dtype != np.uint8:
        raise RequestError(f"{field}: dtype must be uint8 (RGB 0-255), got {image.dtype}")
    if image.ndim != 3 or image.shape[-1] != 3:
        raise RequestError(f"{field}: shape must be [height, width, 3] (RGB), got {list(image.shape)}")
    h, w = image.shape[:2]
    if not (MIN_SIDE <= h <= MAX_SIDE and MIN_SIDE <= w <= MAX_SIDE):
        raise RequestError(f"{field}: {h}x{w} pixels; each side must be {MIN_SIDE}..{MAX_SIDE}")
    return image


# ---- requests -------------------------------------------------------------------------------------
def _fields(body: dict, image: np.ndarray, decode_array) -> ActRequest:
    """The request's fields, checked; decode_array(obj, field) reads the encoding's array objects."""
    instruction = body.get("instruction")
    if not isinstance(instruction, str) or not instruction.strip():
        raise RequestError("instruction: required, a non-empty string")
    if len(instruction) > MAX_INSTRUCTION_CHARS:
        raise RequestError(f"instruction: {len(instruction)} characters, at most {MAX_INSTRUCTION_CHARS}")
    key = body.get("unnorm_key")
    if key is not None and not isinstance(key, str):
        raise RequestError("unnorm_key: must be a string (a dataset name from GET /info) or absent")
    session = body.get("session", "default")
    if not isinstance(session, str) or not 0 < len(session) <= 128:
        raise RequestError("session: must be a string of 1..128 characters")
    eef = body.get("eef_position")
    if isinstance(eef, dict):
        eef = decode_array(eef, "eef_position")
    if eef is not None:
        try:
            eef = np.asarray(eef, np.float64).reshape(-1)
        except (TypeError, ValueError):
            raise RequestError("eef_position: must be 3 numbers (x, y, z)") from None
        if eef.shape != (3,) or not np.isfinite(eef).all():
            raise RequestError(f"eef_position: must be 3 finite numbers (x, y, z), got {eef.tolist()}")
    return ActRequest(check_image(image), instruction, key or None, eef, session)


def _raw_image(payload, container: str, expected: str):
    if not isinstance(payload, dict):
        raise RequestError(f"body: must be a {container} with 'image' and 'instruction'")
    if payload.get("image") is None:
        raise RequestError(f"image: required ({expected})")
    return payload["image"]


def parse_json_request(body: bytes) -> tuple[ActRequest, bool]:
    """An OpenVLA /act body -> (request, double_encoded)."""
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RequestError(f"body: not JSON ({e})") from None
    double = isinstance(payload, dict) and "encoded" in payload
    if double:
        if len(payload) != 1 or not isinstance(payload["encoded"], str):
            raise RequestError("encoded: a double-encoded request holds only 'encoded', a JSON string")
        try:
            payload = json.loads(payload["encoded"])
        except json.JSONDecodeError as e:
            raise RequestError(f"encoded: not JSON ({e})") from None
    raw = _raw_image(payload, "JSON object", "an RGB uint8 array, json_numpy-encoded or nested lists")
    if isinstance(raw, dict):
        image = decode_json_numpy(raw, "image")
    elif isinstance(raw, list):
        try:
            image = np.asarray(raw)
        except ValueError:
            raise RequestError("image: nested lists of unequal lengths") from None
        if image.dtype.kind in "iu" and image.size and 0 <= image.min() and image.max() <= 255:
            image = image.astype(np.uint8)
    else:
        raise RequestError(f"image: expected an array, got {type(raw).__name__}")
    return _fields(payload, image, decode_json_numpy), double


def parse_msgpack_request(body: bytes) -> ActRequest:
    import msgpack

    def no_ext(code, data):
        raise RequestError(f"body: msgpack extension type {code} is not accepted")

    try:
        payload = msgpack.unpackb(
            body, raw=False, strict_map_key=True, ext_hook=no_ext, max_bin_len=len(body)
        )
    except RequestError:
        raise
    except Exception as e:  # msgpack raises several unrelated types for malformed input
        raise RequestError(f"body: not a msgpack message ({type(e).__name__}: {e})") from None
    raw = _raw_image(payload, "msgpack map", "an array {dtype, shape, data} or JPEG/PNG bytes")
    image = decode_image_bytes(raw) if isinstance(raw, bytes) else decode_msgpack_array(raw, "image")
    return _fields(payload, image, decode_msgpack_array)


def msgpack_request(
    image: np.ndarray | bytes,
    instruction: str,
    unnorm_key: str | None = None,
    eef_position=None,
    session: str | None = None,
) -> bytes:
    import msgpack

    body: dict = {
        "image": image if isinstance(image, bytes) else encode_array(np.asarray(image)),
        "instruction": instruction,
    }
    if unnorm_key is not None:
        body["unnorm_key"] = unnorm_key
    if eef_position is not None:
        body["eef_position"] = [float(v) for v in np.asarray(eef_position).reshape(-1)]
    if session is not None:
        body["session"] = session
    return msgpack.packb(body, use_bin_type=True)


def decode_msgpack_response(body: bytes) -> dict:
    import msgpack

    out = msgpack.unpackb(body, raw=False)
    for key in ("action", "raw_action"):
        if isinstance(out.get(key), dict):
            out[key] = decode_msgpack_array(out[key], key)
    return out
