"""Frame image kernels (numba, GIL-free): OpenVLA's lanczos3 antialiased resize and its train-time
augmentation, one pass per frame, run by FrameStream on a thread pool over each decoded batch.

What they compute, in TensorFlow terms (tests/test_image_ops.py compares them with these ops):

    resize   tf.image.resize(img, [S, S], "lanczos3", antialias=True), rounded and clipped to uint8:
             at most one level apart (float rounding at .5), on < 0.1% of the pixels
    augment  the resize, then tf.image.crop_and_resize (box of area 0.9, ratio 1, back to S x S,
             bilinear), brightness (x + delta), contrast ((x - channel mean) * f + mean), saturation
             (HSV: s = min(s * f, 1)), hue (HSV: h = (h + delta) mod 1), clipping to [0, 1] after each,
             and tf.image.convert_image_dtype(..., tf.uint8, saturate=True)

Two differences from running those ops one after the other, both deliberate:
- the crop is composed with the resize into one resampling per axis (the same weights, multiplied), so
  there is no uint8 rounding between them: about 15% of the pixels come out one level apart;
- saturation and hue share one HSV conversion (TF's saturation op leaves hue and value unchanged and
  returns RGB in [0, 1], so the conversion back and forth between them is the identity).

Why: in TensorFlow each op is a separate pass over the image in scalar code, and the frame transform
cost ten times a JPEG decode; here both passes of the separable resampling are vectorized row
operations (four taps at a time, with TF's ScaleAndTranslate weights) and the colour ops one pass over
planar pixels (scripts/bench_data.py measures the pipeline against a bare decode loop).
"""

from __future__ import annotations

import functools
import math
import threading

import numpy as np
from numba import njit

LANCZOS_RADIUS = 3.0
CROP_AREA = 0.9  # OpenVLA's random resized crop: scale 0.9, ratio 1.0
NUM_AUG_PARAMS = 6  # crop offset y, crop offset x, brightness delta, contrast, saturation, hue delta


def _lanczos3(x: np.ndarray) -> np.ndarray:
    x = np.abs(x)
    with np.errstate(divide="ignore", invalid="ignore"):
        v = LANCZOS_RADIUS * np.sin(np.pi * x) * np.sin(np.pi * x / LANCZOS_RADIUS) / (np.pi**2 * x**2)
    v = np.where(x <= 1e-3, 1.0, v)
    return np.where(x > LANCZOS_RADIUS, 0.0, v)


@functools.cache
def lanczos_spans(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(start [out], weights [out, K]) of TF's ScaleAndTranslate (lanczos3, antialias, no translation):
    output i = sum_k weights[i, k] * input[start[i] + k]."""
    scale = out_size / in_size
    inv_scale = 1.0 / scale
    kernel_scale = max(inv_scale, 1.0)  # antialias widens the kernel when downsampling
    radius = LANCZOS_RADIUS * kernel_scale
    starts, rows = [], []
    for i in range(out_size):
        sample = (i + 0.5) * inv_scale
        lo = min(max(math.ceil(sample - radius - 0.5), 0), in_size - 1)
        hi = min(max(math.floor(sample + radius - 0.5), 0), in_size - 1) + 1
        src = np.arange(lo, hi)
        w = _lanczos3((src + 0.5 - sample) / kernel_scale)
        total = w.sum()
        if abs(total) >= 1000 * np.finfo(np.float32).eps:
            w = w / total
        starts.append(lo)
        rows.append(w)
    k = _pad_taps(max(len(r) for r in rows), in_size)
    weights = np.zeros((out_size, k), np.float32)
    start = np.zeros(out_size, np.int64)
    for i, (lo, w) in enumerate(zip(starts, rows, strict=True)):
        lo = min(lo, in_size - k) if k <= in_size else 0  # keep the span inside the input
        offset = starts[i] - lo
        weights[i, offset : offset + len(w)] = w
        start[i] = lo
    return start, weights


@njit(nogil=True, cache=True, error_model="numpy")
def _resample_rows(src, start, weights, out):
    """out[i, :] = sum_k weights[i, k] * src[start[i] + k, :] over contiguous rows (src uint8 or
    float32). Taps go four at a time (weights padded to a multiple of 4 by _pad_taps): one vectorized
    pass per four taps keeps the loads and stores of out low."""
    n_out, k_taps = weights.shape
    length = src.shape[1]
    for i in range(n_out):
        s = start[i]
        row = out[i]
        if k_taps % 4 or s + k_taps > src.shape[0]:  # unpadded (tiny input): one tap at a time
            for j in range(length):
                row[j] = 0.0
            for k in range(k_taps):
                w = weights[i, k]
                r = src[s + k]
                for j in range(length):
                    row[j] += w * np.float32(r[j])
            continue
        for g in range(0, k_taps, 4):
            r0, r1, r2, r3 = src[s + g], src[s + g + 1], src[s + g + 2], src[s + g + 3]
            w0, w1, w2, w3 = weights[i, g], weights[i, g + 1], weights[i, g + 2], weights[i, g + 3]
            if g == 0:
                for j in range(length):
                    row[j] = (
                        w0 * np.float32(r0[j]) + w1 * np.float32(r1[j])
                        + w2 * np.float32(r2[j]) + w3 * np.float32(r3[j])
                    )  # fmt: skip
            else:
                for j in range(length):
                    row[j] += (
                        w0 * np.float32(r0[j]) + w1 * np.float32(r1[j])
                        + w2 * np.float32(r2[j]) + w3 * np.float32(r3[j])
                    )  # fmt: skip


def _pad_taps(taps: int, in_size: int) -> int:
    """Taps rounded up to a multiple of 4 (zero weights), when the input is that long."""
    padded = -(-taps // 4) * 4
    return padded if padded <= in_size else taps


@njit(nogil=True, cache=True, error_model="numpy")
def _transpose_pixels(src, dst):
    """[A, B * 3] -> [B, A * 3]: swaps the two pixel axes of an interleaved RGB image, in tiles."""
    a = src.shape[0]
    b = src.shape[1] // 3
    tile = 16
    for i0 in range(0, a, tile):
        i1 = min(i0 + tile, a)
        for j0 in range(0, b, tile):
            j1 = min(j0 + tile, b)
            for i in range(i0, i1):
                for j in range(j0, j1):
                    dst[j, 3 * i] = src[i, 3 * j]
                    dst[j, 3 * i + 1] = src[i, 3 * j + 1]
                    dst[j, 3 * i + 2] = src[i, 3 * j + 2]


@njit(nogil=True, cache=True, error_model="numpy")
def _transpose_pixels_u8(src, dst):
    """_transpose_pixels for uint8 images, row by row of dst (measured faster for bytes than tiles)."""
    a = src.shape[0]
    b = src.shape[1] // 3
    for j in range(b):
        d = dst[j]
        for i in range(a):
            d[3 * i] = src[i, 3 * j]
            d[3 * i + 1] = src[i, 3 * j + 1]
            d[3 * i + 2] = src[i, 3 * j + 2]


@njit(nogil=True, cache=True, error_model="numpy")
def _resample_image(img, ys, yw, xs, xw, src_t, tmp, tmp_t, out):
    """Separable resampling of uint8 [H, W, 3] into float32 out [OH, OW * 3]: the source is transposed
    (as uint8, the cheapest copy), resampled along x over contiguous rows, transposed back and resampled
    along y, so both passes are vectorized row operations and the result comes out in image order.
    src_t [W, H * 3] uint8, tmp [OW, H * 3] and tmp_t [H, OW * 3] are scratch (see _workspace)."""
    h, w, _ = img.shape
    _transpose_pixels_u8(img.reshape(h, w * 3), src_t)
    _resample_rows(src_t, xs, xw, tmp)
    _transpose_pixels(tmp, tmp_t)
    _resample_rows(tmp_t, ys, yw, out)


@njit(nogil=True, cache=True, error_model="numpy")
def _round_clip(flat):
    """round(x) (half to even, as tf.round), clipped to [0, 255]; in place."""
    magic = np.float32(12582912.0)  # 1.5 * 2**23: adding and subtracting it rounds to nearest even
    for i in range(flat.size):
        v = (flat[i] + magic) - magic
        flat[i] = min(max(v, np.float32(0.0)), np.float32(255.0))


@njit(nogil=True, cache=True, error_model="numpy")
def _to_uint8(img, out):
    """float32 [H, W * 3] of integral values in 0..255 -> uint8 [H, W, 3]."""
    src = img.reshape(-1)
    dst = out.reshape(-1)
    for i in range(src.shape[0]):
        dst[i] = np.uint8(src[i])


@njit(nogil=True, cache=True, error_model="numpy", fastmath=True)
def _brightness_planes(img, brightness, planes, means):
    """Interleaved float32 [H, W * 3] in 0..255 -> planes [3, H * W] =
    clip(clip(x / 255, 0, 1) + brightness, 0, 1); means[c] = each plane's mean."""
    flat = img.reshape(-1)
    n = planes.shape[1]
    inv = np.float32(1.0 / 255.0)
    zero, one = np.float32(0.0), np.float32(1.0)
    for c in range(3):
        plane = planes[c]
        acc = np.float32(0.0)
        for i in range(n):
            v = min(max(min(max(flat[3 * i + c] * inv, zero), one) + brightness, zero), one)
            plane[i] = v
            acc += v
        means[c] = acc / n


@njit(nogil=True, cache=True, error_model="numpy", inline="always")
def _hue_channel(n, h6, s, v):
    """One channel of HSV -> RGB (n = 5, 3, 1 for r, g, b; h6 = hue in [0, 6)), branch-free."""
    k = n + h6
    k = k - np.float32(6.0) if k >= np.float32(6.0) else k
    t = min(max(min(k, np.float32(4.0) - k), np.float32(0.0)), np.float32(1.0))
    return v - v * s * t


@njit(nogil=True, cache=True, error_model="numpy")
def _contrast_saturation_hue(planes, means, contrast, saturation, hue):
    """Contrast, saturation and hue on float32 planes [3, N] in [0, 1], in place (stay in [0, 1])."""
    n = planes.shape[1]
    mr, mg, mb = means[0], means[1], means[2]
    zero, one, six = np.float32(0.0), np.float32(1.0), np.float32(6.0)
    red, green, blue = planes[0], planes[1], planes[2]
    for i in range(n):
        r = min(max((red[i] - mr) * contrast + mr, zero), one)
        g = min(max((green[i] - mg) * contrast + mg, zero), one)
        b = min(max((blue[i] - mb) * contrast + mb, zero), one)
        # RGB -> HSV as TF's adjust_saturation / adjust_hue kernels compute it.
        vmax = max(r, max(g, b))
        rng = vmax - min(r, min(g, b))
        sat = rng / max(vmax, np.float32(1e-30))
        norm = one / (six * max(rng, np.float32(1e-30)))
        hh = norm * (r - g) + np.float32(4.0 / 6.0)
        hh = norm * (b - r) + np.float32(2.0 / 6.0) if g == vmax else hh
        hh = norm * (g - b) if r == vmax else hh
        hh = hh + one if hh < zero else hh
        hh = hh if rng > zero else zero
        sat = min(max(sat * saturation, zero), one)
        hh = hh + hue  # |hue| < 1: one wrap either way
        hh = hh - one if hh >= one else hh
        hh = hh + one if hh < zero else hh
        h6 = hh * six
        red[i] = _hue_channel(np.float32(5.0), h6, sat, vmax)
        green[i] = _hue_channel(np.float32(3.0), h6, sat, vmax)
        blue[i] = _hue_channel(np.float32(1.0), h6, sat, vmax)


@njit(nogil=True, cache=True, error_model="numpy")
def _planes_to_uint8(planes, out, scale):
    """y-major float32 planes [3, H * W] -> uint8 [H, W, 3]: trunc(clip(x * scale, 0, 255))."""
    flat = out.reshape(-1)
    zero, top = np.float32(0.0), np.float32(255.0)
    red, green, blue = planes[0], planes[1], planes[2]
    for i in range(red.shape[0]):
        flat[3 * i] = np.uint8(min(max(red[i] * scale, zero), top))
        flat[3 * i + 1] = np.uint8(min(max(green[i] * scale, zero), top))
        flat[3 * i + 2] = np.uint8(min(max(blue[i] * scale, zero), top))


@functools.cache
def _composed_taps(in_size: int, size: int) -> int:
    """Taps of a lanczos span followed by a 2-tap bilinear one (see _crop_spans)."""
    start, weights = lanczos_spans(in_size, size)
    return _pad_taps(min(weights.shape[1] + int(np.diff(start).max(initial=0)), in_size), in_size)


@njit(nogil=True, cache=True, error_model="numpy")
def _crop_spans(ls, lw, taps, in_size, size, offset, side):
    """Spans of tf.image.crop_and_resize (box [offset, offset + side] of the resized axis, back to
    `size`, bilinear) composed with the lanczos spans (ls, lw) from the `in_size` input: one resampling
    instead of two (without the uint8 rounding OpenVLA has in between)."""
    start = np.empty(size, np.int64)
    weights = np.zeros((size, taps), np.float32)
    k_taps = lw.shape[1]
    for i in range(size):
        pos = np.float32(offset * (size - 1)) + np.float32(i) * np.float32(side)
        top = int(math.floor(pos))
        lerp = pos - np.float32(top)
        t = min(top, size - 2)
        c0 = np.float32(1.0) - lerp if top == t else np.float32(0.0)
        c1 = lerp if top == t else np.float32(1.0)
        s0 = ls[t]
        s1 = ls[t + 1]
        st = min(s0, in_size - taps)
        start[i] = st
        for k in range(k_taps):
            weights[i, s0 - st + k] += c0 * lw[t, k]
            weights[i, s1 - st + k] += c1 * lw[t + 1, k]
    return start, weights


@njit(nogil=True, cache=True, error_model="numpy")
def _resize_into(img, ys, yw, xs, xw, out, src_t, tmp, tmp_t, res):
    """The lanczos resize of one frame into out (uint8 [S, S, 3]); the rest is scratch."""
    _resample_image(img, ys, yw, xs, xw, src_t, tmp, tmp_t, res)
    _round_clip(res.reshape(-1))
    _to_uint8(res, out)


@njit(nogil=True, cache=True, error_model="numpy")
def _augment_into(img, ly, lwy, ty, lx, lwx, tx, params, out, src_t, tmp, tmp_t, res, planes):
    """Resize + augmentation of one frame into out (uint8 [S, S, 3]); (l*, lw*, t*) are the lanczos
    spans and composed tap count of each axis; the rest is scratch."""
    h, w, _ = img.shape
    size = out.shape[0]
    side = math.sqrt(CROP_AREA)
    ys, yw = _crop_spans(ly, lwy, ty, h, size, params[0], side)
    xs, xw = _crop_spans(lx, lwx, tx, w, size, params[1], side)
    _resample_image(img, ys, yw, xs, xw, src_t, tmp, tmp_t, res)
    means = np.empty(3, np.float32)
    _brightness_planes(res, np.float32(params[2]), planes, means)
    _contrast_saturation_hue(
        planes, means, np.float32(params[3]), np.float32(params[4]), np.float32(params[5])
    )
    _planes_to_uint8(planes, out, np.float32(255.5))


_SCRATCH = threading.local()


def _workspace(h: int, w: int, size: int) -> tuple:
    """This thread's scratch arrays for (h, w) -> size frames, reused from frame to frame: allocating
    ~3 MB per frame made the kernels page-fault, a third slower inside the pipeline than alone."""
    cache = _SCRATCH.__dict__.setdefault("by_shape", {})
    key = (h, w, size)
    if key not in cache:
        if len(cache) > 8:
            cache.clear()
        cache[key] = (
            np.empty((w, h * 3), np.uint8),
            np.empty((size, h * 3), np.float32),
            np.empty((h, size * 3), np.float32),
            np.empty((size, size * 3), np.float32),
            np.empty((3, size * size), np.float32),
        )
    return cache[key]


def _into(img: np.ndarray, out: np.ndarray, params: np.ndarray | None) -> None:
    h, w, _ = img.shape
    size = out.shape[0]
    src_t, tmp, tmp_t, res, planes = _workspace(h, w, size)
    if params is None:
        if h == size and w == size:
            out[...] = img
        else:
            _resize_into(img, *lanczos_spans(h, size), *lanczos_spans(w, size), out, src_t, tmp, tmp_t, res)
    else:
        _augment_into(
            img, *lanczos_spans(h, size), _composed_taps(h, size), *lanczos_spans(w, size),
            _composed_taps(w, size), params.astype(np.float32), out, src_t, tmp, tmp_t, res, planes,
        )  # fmt: skip


def resize_uint8(img: np.ndarray, size: int) -> np.ndarray:
    """uint8 [H, W, 3] -> uint8 [size, size, 3]: lanczos3 antialiased, rounded (OpenVLA's resize)."""
    out = np.empty((size, size, 3), np.uint8)
    _into(np.ascontiguousarray(img), out, None)
    return out


def resize_augment_uint8(img: np.ndarray, size: int, params: np.ndarray) -> np.ndarray:
    """The resize of resize_uint8 and OpenVLA's augmentation with the given parameters (see
    augment.augment_params: crop offsets y/x as fractions, brightness delta, contrast, saturation, hue)."""
    out = np.empty((size, size, 3), np.uint8)
    _into(np.ascontiguousarray(img), out, np.asarray(params))
    return out


_POOLS: dict = {}


def _pool(workers: int):
    """Process-wide thread pools by size: the kernels release the GIL, so the threads run in parallel."""
    from concurrent.futures import ThreadPoolExecutor

    if workers not in _POOLS:
        _POOLS[workers] = ThreadPoolExecutor(workers, thread_name_prefix="vla-image")
    return _POOLS[workers]


def process_batch(
    raw: np.ndarray, shapes: np.ndarray, size: int, params: np.ndarray | None = None, threads: int = 0
):
    """Decoded frames uint8 [B, H, W, 3] (zero-padded; frame i's own size is shapes[i]) -> uint8
    [B, size, size, 3]: resized, and augmented with params [B, 6] when given. A 0 x 0 frame (a camera
    the dataset lacks) stays black. Frames are spread over `threads` threads (0 = one per core)."""
    import os

    n = len(raw)
    out = np.empty((n, size, size, 3), np.uint8)
    workers = max(1, min(n, threads or os.cpu_count() or 1))
    pool = _pool(workers)

    def work(first: int) -> None:
        for i in range(first, n, workers):
            h, w = int(shapes[i][0]), int(shapes[i][1])
            if h * w == 0:
                out[i] = 0
                continue
            img = raw[i] if (h, w) == raw.shape[1:3] else np.ascontiguousarray(raw[i, :h, :w])
            _into(img, out[i], None if params is None else params[i])

    for f in [pool.submit(work, j) for j in range(workers)]:
        f.result()
    return out
