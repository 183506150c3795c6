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
operations (four taps at a time, with TF's ScaleAndTranslate weights) and the colour ops work on
planar pixels (scripts/bench_data.py measures the pipeline against a bare decode loop).
"""

from __future__ import annotations

import functools
import itertools
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


@njit(nogil=True, cache=True, error_model="numpy", inline="always")
def _resample_row(src, s, wrow, row):
    """row[:] = sum_k wrow[k] * src[s + k, :] over contiguous rows (src uint8 or float32). Taps go four
    at a time (weights padded to a multiple of 4 by _pad_taps): one vectorized pass per four taps keeps
    the loads and stores of row low."""
    k_taps = wrow.shape[0]
    length = src.shape[1]
    if k_taps % 4 or s + k_taps > src.shape[0]:  # unpadded (tiny input): one tap at a time
        for j in range(length):
            row[j] = 0.0
        for k in range(k_taps):
            w = wrow[k]
            r = src[s + k]
            for j in range(length):
                row[j] += w * np.float32(r[j])
        return
    for g in range(0, k_taps, 4):
        r0, r1, r2, r3 = src[s + g], src[s + g + 1], src[s + g + 2], src[s + g + 3]
        w0, w1, w2, w3 = wrow[g], wrow[g + 1], wrow[g + 2], wrow[g + 3]
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


@njit(nogil=True, cache=True, error_model="numpy")
def _resample_rows(src, start, weights, out):
    """out[i, :] = sum_k weights[i, k] * src[start[i] + k, :] for every output row i."""
    for i in range(weights.shape[0]):
        _resample_row(src, start[i], weights[i], out[i])


@njit(nogil=True, cache=True, error_model="numpy")
def _resample_rows_transposed(src, start, weights, row, dst):
    """_resample_rows of interleaved RGB rows [A, B * 3], written transposed: output row i goes to
    dst[:, 3 * i : 3 * i + 3] ([B, n_out * 3]), straight from the one-row buffer `row` (stays in cache)."""
    b = src.shape[1] // 3
    for i in range(weights.shape[0]):
        _resample_row(src, start[i], weights[i], row)
        for j in range(b):
            dst[j, 3 * i] = row[3 * j]
            dst[j, 3 * i + 1] = row[3 * j + 1]
            dst[j, 3 * i + 2] = row[3 * j + 2]


def _pad_taps(taps: int, in_size: int) -> int:
    """Taps rounded up to a multiple of 4 (zero weights), when the input is that long."""
    padded = -(-taps // 4) * 4
    return padded if padded <= in_size else taps


@njit(nogil=True, cache=True, error_model="numpy")
def _transpose_pixels_u8(src, dst):
    """[A, B * 3] -> [B, A * 3] for uint8 images: swaps the two pixel axes, row by row of dst."""
    a = src.shape[0]
    b = src.shape[1] // 3
    for j in range(b):
        d = dst[j]
        for i in range(a):
            d[3 * i] = src[i, 3 * j]
            d[3 * i + 1] = src[i, 3 * j + 1]
            d[3 * i + 2] = src[i, 3 * j + 2]


@njit(nogil=True, cache=True, error_model="numpy")
def _resample_x(img, xs, xw, src_t, row, tmp_t):
    """The first pass of the separable resampling of uint8 [H, W, 3]: the source is transposed (as
    uint8, the cheapest copy) and resampled along x over its contiguous rows, each output row written
    back transposed, into tmp_t [H, OW * 3] (image order); the y pass then works on tmp_t's contiguous
    rows too. src_t [W, H * 3] uint8 and row [max(H, OW) * 3] are scratch (see _workspace)."""
    h, w, _ = img.shape
    _transpose_pixels_u8(img.reshape(h, w * 3), src_t)
    _resample_rows_transposed(src_t, xs, xw, row, tmp_t)


@njit(nogil=True, cache=True, error_model="numpy")
def _round_to_uint8(img, out):
    """float32 [H, W * 3] -> uint8 [H, W, 3]: round(x) (half to even, as tf.round), clipped to [0, 255]."""
    magic = np.float32(12582912.0)  # 1.5 * 2**23: adding and subtracting it rounds to nearest even
    src = img.reshape(-1)
    dst = out.reshape(-1)
    for i in range(src.shape[0]):
        v = (src[i] + magic) - magic
        dst[i] = np.uint8(min(max(v, np.float32(0.0)), np.float32(255.0)))


@njit(nogil=True, cache=True, error_model="numpy", fastmath=True)
def _resample_rows_brightness(src, start, weights, row, brightness, planes, means):
    """_resample_rows of interleaved RGB rows in 0..255 ([A, B * 3]) with brightness applied as each
    output row comes out (from the one-row buffer `row`): planes [3, n_out * B] =
    clip(clip(x / 255, 0, 1) + brightness, 0, 1); means[c] = each plane's mean."""
    n_out = weights.shape[0]
    b = src.shape[1] // 3
    inv = np.float32(1.0 / 255.0)
    zero, one = np.float32(0.0), np.float32(1.0)
    sums = np.zeros(3, np.float32)
    for i in range(n_out):
        _resample_row(src, start[i], weights[i], row)
        base = i * b
        for c in range(3):
            plane = planes[c]
            acc = np.float32(0.0)
            for j in range(b):
                v = min(max(min(max(row[3 * j + c] * inv, zero), one) + brightness, zero), one)
                plane[base + j] = v
                acc += v
            sums[c] += acc
    for c in range(3):
        means[c] = sums[c] / (n_out * b)


@njit(nogil=True, cache=True, error_model="numpy", inline="always")
def _hue_term(n, h6):
    """t in [0, 1] with channel n (5, 3, 1 for r, g, b) of HSV -> RGB = v - chroma * t (h6 = hue in
    [0, 6)), branch-free."""
    k = n + h6
    k = k - np.float32(6.0) if k >= np.float32(6.0) else k
    return min(max(min(k, np.float32(4.0) - k), np.float32(0.0)), np.float32(1.0))


@njit(nogil=True, cache=True, error_model="numpy")
def _contrast_saturation_hue(planes, means, contrast, saturation, hue):
    """Contrast, saturation and hue on float32 planes [3, N] in [0, 1], in place (stay in [0, 1]).
    TF's adjust_saturation / adjust_hue kernels, with two divisions folded away: the new chroma
    v * min(s * f, 1) (s = range / v) is min(range * f, v), and the hue is kept in sixths."""
    n = planes.shape[1]
    mr, mg, mb = means[0], means[1], means[2]
    zero, one, six = np.float32(0.0), np.float32(1.0), np.float32(6.0)
    hue6 = six * hue
    red, green, blue = planes[0], planes[1], planes[2]
    for i in range(n):
        r = min(max((red[i] - mr) * contrast + mr, zero), one)
        g = min(max((green[i] - mg) * contrast + mg, zero), one)
        b = min(max((blue[i] - mb) * contrast + mb, zero), one)
        vmax = max(r, max(g, b))
        rng = vmax - min(r, min(g, b))
        chroma = min(rng * saturation, vmax)
        # hue in sixths: (g - b) / range from red's sector, + 2 from green's, + 4 from blue's; a grey
        # pixel (range 0) has chroma 0, so its hue does not matter
        d = r - g
        sector = np.float32(4.0)
        d = b - r if g == vmax else d
        sector = np.float32(2.0) if g == vmax else sector
        d = g - b if r == vmax else d
        sector = zero if r == vmax else sector
        h6 = d / max(rng, np.float32(1e-30)) + sector + hue6
        h6 = h6 - six * np.floor(h6 / six)  # into [0, 6] (6 only by rounding; _hue_term wraps it)
        red[i] = vmax - chroma * _hue_term(np.float32(5.0), h6)
        green[i] = vmax - chroma * _hue_term(np.float32(3.0), h6)
        blue[i] = vmax - chroma * _hue_term(np.float32(1.0), h6)


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
    """Taps of a lanczos span followed by a 2-tap bilinear one (see _crop_spans): the widest union of
    two neighbouring spans' nonzero weights, padded to a multiple of 4."""
    start, weights = lanczos_spans(in_size, size)
    nonzero = weights != 0
    first = start + nonzero.argmax(1)
    last = start + weights.shape[1] - 1 - nonzero[:, ::-1].argmax(1)
    widest = int((np.maximum(last[:-1], last[1:]) - first[:-1]).max(initial=0)) + 1
    return _pad_taps(max(widest, int(nonzero.sum(1).max())), in_size)


@njit(nogil=True, cache=True, error_model="numpy", inline="always")
def _first_tap(lw, t):
    """Index of row t's first nonzero weight."""
    for k in range(lw.shape[1]):
        if lw[t, k] != 0:
            return k
    return 0


@njit(nogil=True, cache=True, error_model="numpy")
def _crop_spans(ls, lw, taps, in_size, size, offset, side):
    """Spans of tf.image.crop_and_resize (box [offset, offset + side] of the resized axis, back to
    `size`, bilinear) composed with the lanczos spans (ls, lw) from the `in_size` input: one resampling
    instead of two (without the uint8 rounding OpenVLA has in between). Each span starts at its first
    nonzero weight, so `taps` (_composed_taps) holds every nonzero one."""
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
        first = ls[t] + _first_tap(lw, t) if c0 != 0 else ls[t + 1] + _first_tap(lw, t + 1)
        st = min(first, in_size - taps)
        start[i] = st
        for row, c in ((t, c0), (t + 1, c1)):
            if c == 0:
                continue
            for k in range(k_taps):
                if lw[row, k] != 0:
                    weights[i, ls[row] - st + k] += c * lw[row, k]
    return start, weights


@njit(nogil=True, cache=True, error_model="numpy")
def _resize_into(img, ys, yw, xs, xw, out, src_t, row, tmp_t, res):
    """The lanczos resize of one frame into out (uint8 [S, S, 3]); the rest is scratch."""
    _resample_x(img, xs, xw, src_t, row, tmp_t)
    _resample_rows(tmp_t, ys, yw, res)
    _round_to_uint8(res, out)


@njit(nogil=True, cache=True, error_model="numpy")
def _augment_into(img, ly, lwy, ty, lx, lwx, tx, params, out, src_t, row, tmp_t, planes):
    """Resize + augmentation of one frame into out (uint8 [S, S, 3]); (l*, lw*, t*) are the lanczos
    spans and composed tap count of each axis; the rest is scratch."""
    h, w, _ = img.shape
    size = out.shape[0]
    side = math.sqrt(CROP_AREA)
    ys, yw = _crop_spans(ly, lwy, ty, h, size, params[0], side)
    xs, xw = _crop_spans(lx, lwx, tx, w, size, params[1], side)
    _resample_x(img, xs, xw, src_t, row, tmp_t)
    means = np.empty(3, np.float32)
    _resample_rows_brightness(tmp_t, ys, yw, row, np.float32(params[2]), planes, means)
    _contrast_saturation_hue(
        planes, means, np.float32(params[3]), np.float32(params[4]), np.float32(params[5])
    )
    _planes_to_uint8(planes, out, np.float32(255.5))


_SCRATCH = threading.local()


def _workspace(h: int, w: int, size: int) -> tuple:
    """This thread's scratch arrays for (h, w) -> size frames, reused from frame to frame: allocating
    ~2 MB per frame made the kernels page-fault, a third slower inside the pipeline than alone."""
    cache = _SCRATCH.__dict__.setdefault("by_shape", {})
    key = (h, w, size)
    if key not in cache:
        if len(cache) > 8:
            cache.clear()
        cache[key] = (
            np.empty((w, h * 3), np.uint8),
            np.empty(max(h, size) * 3, np.float32),
            np.empty((h, size * 3), np.float32),
            np.empty((size, size * 3), np.float32),
            np.empty((3, size * size), np.float32),
        )
    return cache[key]


def _into(img: np.ndarray, out: np.ndarray, params: np.ndarray | None) -> None:
    h, w, _ = img.shape
    size = out.shape[0]
    src_t, row, tmp_t, res, planes = _workspace(h, w, size)
    if params is None:
        if h == size and w == size:
            out[...] = img
        else:
            _resize_into(img, *lanczos_spans(h, size), *lanczos_spans(w, size), out, src_t, row, tmp_t, res)
    else:
        _augment_into(
            img, *lanczos_spans(h, size), _composed_taps(h, size), *lanczos_spans(w, size),
            _composed_taps(w, size), params.astype(np.float32), out, src_t, row, tmp_t, planes,
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

    frames = itertools.count()  # next() is atomic under the GIL: each frame goes to the first free thread

    def work() -> None:
        while (i := next(frames)) < n:
            h, w = int(shapes[i][0]), int(shapes[i][1])
            if h * w == 0:
                out[i] = 0
                continue
            img = raw[i] if (h, w) == raw.shape[1:3] else np.ascontiguousarray(raw[i, :h, :w])
            _into(img, out[i], None if params is None else params[i])

    for f in [pool.submit(work) for _ in range(workers)]:
        f.result()
    return out
