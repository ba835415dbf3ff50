#!/usr/bin/env python3
"""Reference implementation of dinov3_playground's 3D DINOv3 feature extraction.

Reproduces `extract_dinov3_features_3d` (models.py) as described step by step in
shared/reference/dinov3_playground.md §d, with every step a small function of its own so that
volfuse can test the steps separately. Each docstring states the exact numerics (dtype of every
intermediate, rounding, truncation, edge rule) the Rust side has to match.

Overview, for a volume (D, H, W) and input_size (d, h, w), slice size S:

    for plane in ("xy", "xz", "yz"):              # normal axis D, H, W; in this order
        n_in, n_out = volume.shape[axis], input_size[axis]
        vol = downsample_normal(volume, axis, n_out) if needs_normal_downsample(n_in, n_out)
        for i in pick_slice_indices(vol.shape[axis], n_out):
            sl = slice_image(vol, plane, i)         # xy (H,W), xz (D,W), yz (D,H)
            sl = resize_slice(sl, S)                # skimage, only if sl.shape != (S, S)
            q  = quantize_slice(sl)                 # uint8
            rgb = gray_to_rgb(q)                    # (3, S, S) uint8
        pixels = preprocess_pixels(rgb batch, mean, std)      # (B, 3, S, S) float32
        tokens = vit_patch_tokens(model, pixels)              # (Cd, B, S/16, S/16) float32
        tokens = resize_tokens(tokens, plane_output_hw(...))  # (Cd, B, a, b)
        plane_features = stack_plane(tokens, plane)           # (Cd, d, h, w)
    features = combine_planes([xy, xz, yz])                   # mean; (Cd, d, h, w)

Library calls are kept where the original calls them (torch F.interpolate, skimage resize,
np.linspace) so this stays faithful; `resize_slice_explicit` re-derives skimage's resize in
plain NumPy operation by operation (checked bit-exact against skimage by
tools/make_feature_fixtures.py) to document what a port has to do.

Import this module from tools/ (make_feature_fixtures.py does) or run it to self-test:
    tools/.venv/bin/python tools/reference_features.py
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

PLANES = ("xy", "xz", "yz")
# Axis of the (D, H, W) volume that is normal to each plane.
NORMAL_AXIS = {"xy": 0, "xz": 1, "yz": 2}

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SAT493M_MEAN = (0.430, 0.411, 0.296)
SAT493M_STD = (0.213, 0.156, 0.143)


# ----------------------------------------------------------------------------------------------
# Step 1: downsample along the normal axis
# ----------------------------------------------------------------------------------------------


def needs_normal_downsample(n_in: int, n_out: int) -> bool:
    """True when the normal axis is downsampled before slicing: `n_in / n_out > 2.0`.

    Python true division in float64, strictly greater: a ratio of exactly 2.0 (e.g. 64 -> 32) is
    NOT downsampled (the slices are then picked unevenly by `pick_slice_indices`), and n_in < n_out
    never is (slices repeat instead).
    """
    return n_in / n_out > 2.0


def downsample_normal(volume: np.ndarray, axis: int, n_out: int) -> np.ndarray:
    """Resize `volume` along `axis` to `n_out` samples; the other two axes are unchanged.

    Exactly: `F.interpolate(torch.from_numpy(volume.astype(float32))[None, None], size=...,
    mode="trilinear", align_corners=False)[0, 0].numpy().astype(volume.dtype)`.

    Numerics (PyTorch CPU upsample_trilinear3d, float32 throughout, no antialias):
      - scale = float32(n_in) / float32(n_out)  (float32 division);
      - src(o) = scale * (o + 0.5) - 0.5 in float32, clamped below at 0;
      - i0 = int(src) (floor, src >= 0), i1 = min(i0 + 1, n_in - 1); l1 = src - i0, l0 = 1 - l1;
      - out(o) = l0 * x[i0] + l1 * x[i1] in float32, and precisely (PyTorch 2.15 CPU, AVX2
        kernels, checked bit-exact on every axis) `fma(l0, x[i0], l1 * x[i1])`: the l1 product
        is rounded to float32 first, the l0 product is fused into the add (Rust:
        `l0.mul_add(x0, l1 * x1)`). The plain unfused formula differs by 1 ulp in ~2 % of the
        outputs for non-dyadic ratios, which can flip the truncation below.
        The unchanged axes have scale 1, l1 = 0, so they pass values through exactly.
      - Example 512 -> 128: src = 4o + 1.5, out = (x[4o+1] + x[4o+2]) / 2. For ratios 2.5, 3,
        3.5, 4, 4.5 ... the weights are multiples of 1/4 or 1/8, so for uint8/uint16 input every
        operation is exact and the result does not depend on evaluation order or FMA.
    Then `.astype(volume.dtype)`: float32 -> uint8/uint16 TRUNCATES toward zero (no rounding);
    float32 input stays float32 (no-op cast).
    """
    size = list(volume.shape)
    size[axis] = n_out
    x = torch.from_numpy(np.ascontiguousarray(volume).astype(np.float32))[None, None]
    y = F.interpolate(x, size=tuple(size), mode="trilinear", align_corners=False)
    return y[0, 0].numpy().astype(volume.dtype)


def downsample_normal_explicit(volume: np.ndarray, axis: int, n_out: int) -> np.ndarray:
    """`downsample_normal` written out with NumPy (the formulas of its docstring). The fused
    multiply-add is emulated in float64, which is exact for integer volumes (every product and
    sum fits in 53 bits, so there is a single rounding to float32)."""
    f32 = np.float32
    n_in = volume.shape[axis]
    scale = f32(n_in) / f32(n_out)
    src = np.maximum(scale * (np.arange(n_out, dtype=f32) + f32(0.5)) - f32(0.5), f32(0))
    i0 = src.astype(np.int64)
    i1 = np.minimum(i0 + 1, n_in - 1)
    l1 = src - i0.astype(f32)
    l0 = f32(1) - l1
    x = np.moveaxis(volume.astype(f32), axis, 0)
    shape = (-1,) + (1,) * (x.ndim - 1)
    prod1 = l1.reshape(shape) * x[i1]  # float32, rounded
    out = (l0.reshape(shape).astype(np.float64) * x[i0] + prod1.astype(np.float64)).astype(f32)
    return np.moveaxis(out, 0, axis).astype(volume.dtype)


# ----------------------------------------------------------------------------------------------
# Step 2: pick the slices
# ----------------------------------------------------------------------------------------------


def pick_slice_indices(n: int, n_out: int) -> np.ndarray:
    """Indices of the n_out slices taken from n: `np.linspace(0, n - 1, n_out, dtype=int)`.

    Exactly what numpy computes (numpy 2.x `linspace`), in float64:
      - step = float64(n - 1) / float64(n_out - 1)   (one rounded division);
      - idx[i] = floor(float64(i) * step) for i < n_out - 1  (one rounded multiplication);
      - idx[n_out - 1] = n - 1 exactly (numpy overwrites the last sample with `stop`);
      - n_out == 1 gives [0]; n == 1 gives all zeros.
    Careful: this is NOT always the exact-integer floor(i * (n-1) / (n_out-1)). When i*(n-1) is a
    multiple of (n_out-1) the rounded product can land just below the integer, and the floor is
    one less: e.g. n=3, n_out=99, i=49 gives 0 (exact arithmetic: 1); n=148, n_out=256 also
    differs. A port must do the two float64 operations above, not integer arithmetic.
    When n < n_out some indices repeat (e.g. n=10, n_out=12: 0,0,1,2,3,4,4,5,6,7,8,9).
    """
    return np.linspace(0, n - 1, n_out, dtype=int).astype(np.int64)


# ----------------------------------------------------------------------------------------------
# Step 3: slice images
# ----------------------------------------------------------------------------------------------


def slice_image(volume: np.ndarray, plane: str, index: int) -> np.ndarray:
    """The 2D image (rows, cols) of one slice: xy `vol[z]` = (H, W); xz `vol[:, y, :]` = (D, W);
    yz `vol[:, :, x]` = (D, H). A plain copy, no transpose: rows always come from the lower
    axis index."""
    if plane == "xy":
        sl = volume[index, :, :]
    elif plane == "xz":
        sl = volume[:, index, :]
    elif plane == "yz":
        sl = volume[:, :, index]
    else:
        raise ValueError(plane)
    return np.ascontiguousarray(sl)


# ----------------------------------------------------------------------------------------------
# Step 4: resize the slice to S x S (skimage.transform.resize)
# ----------------------------------------------------------------------------------------------


def resize_slice(sl: np.ndarray, S: int) -> np.ndarray:
    """`skimage.transform.resize(sl, (S, S), preserve_range=True, anti_aliasing=True)
    .astype(sl.dtype)` when `sl.shape != (S, S)`; otherwise `sl` itself, untouched.

    What skimage does (0.26; scipy.ndimage underneath), see `resize_slice_explicit`:
      - working dtype: integer input -> float64; float32 stays float32 (intermediate results are
        computed in double but stored in float32 after each pass); float64 stays float64.
      - anti-aliasing Gaussian per axis with factor f = in/out (float64):
        sigma = max(0, (f - 1) / 2); axes with sigma <= 1e-15 (no downsampling) are skipped;
        axis 0 first, then axis 1, each pass rounded to the working dtype.
      - then order-1 zoom with mode 'mirror', grid_mode=True, then clip to [min, max] of the
        (converted) input slice.
      - then `.astype(sl.dtype)`: for integer input a TRUNCATING float64 -> int cast (values are
        already inside [min, max]). So a flat area can come out one lower than its value when the
        float64 sum lands a hair below the integer: the exact operation order matters.
    Non-square slices are stretched (each axis independently).
    """
    if sl.shape == (S, S):
        return sl
    from skimage.transform import resize

    out = resize(sl, (S, S), preserve_range=True, anti_aliasing=True)
    return out.astype(sl.dtype)


def working_dtype(dtype: np.dtype) -> np.dtype:
    """skimage `convert_to_float(image, preserve_range=True)`: float16 -> float32, float32 and
    float64 unchanged, everything else (integers, bool) -> float64."""
    dtype = np.dtype(dtype)
    if dtype == np.float16:
        return np.dtype(np.float32)
    if dtype.char in "df":
        return dtype
    return np.dtype(np.float64)


def mirror_index(i: int, n: int) -> int:
    """scipy.ndimage 'mirror' boundary (skimage 'reflect'): ... x[2] x[1] | x[0] .. x[n-1] | x[n-2]
    ...; the edge sample is not repeated, period 2n - 2. n == 1 maps everything to 0."""
    if n <= 1:
        return 0
    s2 = 2 * n - 2
    if i < 0:
        i = s2 * (-i // s2) + i
        i = i + s2 if i <= 1 - n else -i
    elif i >= n:
        i -= s2 * (i // s2)
        if i >= n:
            i = s2 - i
    return i


def gaussian_kernel_1d(sigma: float) -> np.ndarray:
    """The anti-aliasing kernel of scipy.ndimage.gaussian_filter1d (truncate=4.0), float64:
      - radius r = int(4.0 * sigma + 0.5)  (truncation);
      - phi[k] = exp((-0.5 / (sigma * sigma)) * x^2) for x = -r..r: the coefficient
        -0.5 / sigma^2 is computed first (two roundings: sigma*sigma, then the division), x^2 is an
        exact integer, then one multiplication and numpy's exp (glibc-equivalent on x86-64
        without AVX512F);
      - normalised: phi / phi.sum(), where `sum` is numpy's pairwise sum: for fewer than 8 terms
        a left-to-right sum; for 8..128 terms eight interleaved partial sums p[j] += x[8i + j],
        combined as ((p0+p1)+(p2+p3))+((p4+p5)+(p6+p7)), then the remaining (len % 8) terms added
        left to right; above 128 terms (sigma > ~15.9, a downsampling factor > ~32.8) split into
        halves, the first n/2 rounded down to a multiple of 8, each summed the same way
        recursively, then added. Then one division per weight.
    The kernel is exactly symmetric (phi[-x] == phi[x] bit for bit).
    """
    sigma2 = sigma * sigma
    radius = int(4.0 * float(sigma) + 0.5)
    x = np.arange(-radius, radius + 1)
    phi = np.exp(-0.5 / sigma2 * x**2)
    return phi / phi.sum()


def gaussian_filter_axis(img: np.ndarray, sigma: float, axis: int) -> np.ndarray:
    """scipy.ndimage.gaussian_filter1d(img, sigma, axis, mode='mirror') for a symmetric kernel w
    of radius r (w[0] is the centre weight, w[k] = w[-k]). For every output sample, in double:

        acc = x[i] * w[0]
        for k = r, r-1, ..., 1:          # outermost pair first
            acc += (x[i - k] + x[i + k]) * w[k]

    with x[j] outside [0, n-1] taken by `mirror_index`. The result is stored in img.dtype (for
    float32 input: one rounding to float32 per pass). No FMA.
    """
    w = gaussian_kernel_1d(sigma)
    r = (len(w) - 1) // 2
    x = np.moveaxis(img, axis, -1).astype(np.float64)
    n = x.shape[-1]
    idx = np.array([mirror_index(j, n) for j in range(-r, n + r)])
    ext = x[..., idx]  # ext[..., j + r] = x[j]
    acc = ext[..., r : r + n] * w[r]
    for k in range(r, 0, -1):
        acc = acc + (ext[..., r - k : r - k + n] + ext[..., r + k : r + k + n]) * w[r + k]
    return np.moveaxis(acc.astype(img.dtype), -1, axis)


def zoom_axis_coefficients(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per output sample o of one axis of scipy.ndimage.zoom(order=1, mode='mirror',
    grid_mode=True), as scipy's NI_ZoomShift computes them (float64):
      - zoom = float64(n_in) / float64(n_out);
      - c = ((o + 0.5) * zoom) - 0.5;
      - mirror the coordinate: c < 0 -> -c (only |c| < 0.5 happens here); c >= n_in ->
        2 n_in - 2 - c; NOTE that n_in - 1 < c < n_in is left as is (not mirrored);
      - i0 = floor(c); x = c - floor(c); weight w0 = 1 - x for sample i0 and w1 = 1 - w0 (not x!)
        for sample i0 + 1, each index mapped by `mirror_index` (so for c in (n_in-1, n_in) the
        second sample is x[n_in - 2]).
    Returns (i0, i1, w0, w1) as arrays (indices already mirrored) -- i0 and i1 stacked in the
    first array of shape (2, n_out).
    """
    zoom = np.float64(n_in) / np.float64(n_out)
    i0s, i1s, w0s, w1s = [], [], [], []
    for o in range(n_out):
        c = float(o)
        c += 0.5
        c *= zoom
        c -= 0.5
        if n_in <= 1:
            c = 0.0
        elif c < 0:
            s2 = 2 * n_in - 2
            c = s2 * int(-c / s2) + c
            c = c + s2 if c <= 1 - n_in else -c
        elif c > n_in - 1:
            s2 = 2 * n_in - 2
            c -= s2 * int(c / s2)
            if c >= n_in:
                c = s2 - c
        start = int(np.floor(c))
        frac = c - np.floor(c)
        w0 = 1.0 - frac
        w1 = 1.0 - w0
        i0s.append(mirror_index(start, n_in))
        i1s.append(mirror_index(start + 1, n_in))
        w0s.append(w0)
        w1s.append(w1)
    return np.array([i0s, i1s]), np.array(w0s), np.array(w1s)


def zoom_linear_mirror(img: np.ndarray, out_shape: tuple[int, int]) -> np.ndarray:
    """2D scipy.ndimage.zoom(img, order=1, mode='mirror', grid_mode=True) to out_shape, in double,
    stored in img.dtype (float32: one final rounding). With row coefficients (r0, r1, a0, a1)
    and column coefficients (c0, c1, b0, b1) from `zoom_axis_coefficients`, each output is

        t = 0.0
        t += (x[r0, c0] * a0) * b0
        t += (x[r0, c1] * a0) * b1
        t += (x[r1, c0] * a1) * b0
        t += (x[r1, c1] * a1) * b1

    exactly in this order (the value times the row weight, then times the column weight).
    An axis whose size does not change gets c = o exactly, w0 = 1, w1 = 0. If no axis changes,
    scipy returns the input unchanged (never the case here: `resize_slice` is only called on
    slices that are not (S, S)).
    """
    (r0, r1), a0, a1 = zoom_axis_coefficients(img.shape[0], out_shape[0])
    (c0, c1), b0, b1 = zoom_axis_coefficients(img.shape[1], out_shape[1])
    x = img.astype(np.float64)
    a0, a1 = a0[:, None], a1[:, None]
    t = np.zeros(out_shape, dtype=np.float64)
    t = t + (x[np.ix_(r0, c0)] * a0) * b0[None, :]
    t = t + (x[np.ix_(r0, c1)] * a0) * b1[None, :]
    t = t + (x[np.ix_(r1, c0)] * a1) * b0[None, :]
    t = t + (x[np.ix_(r1, c1)] * a1) * b1[None, :]
    return t.astype(img.dtype)


def resize_slice_explicit(sl: np.ndarray, S: int | tuple[int, int]) -> np.ndarray:
    """`resize_slice` written out with NumPy only (2D, order 1, mode 'reflect', clip=True,
    preserve_range=True, anti_aliasing=True); bit-identical to skimage 0.26 / scipy 1.17:

        img  = sl.astype(working_dtype(sl.dtype))
        f    = in_shape / out_shape                      (float64, per axis)
        for axis 0 then 1: if (f-1)/2 > 1e-15: img = gaussian_filter_axis(img, (f-1)/2, axis)
        out  = zoom_linear_mirror(img, out_shape)
        out  = clip(out, min(sl), max(sl))               (bounds in the working dtype)
        return out.astype(sl.dtype)                      (truncating for integer dtypes)

    Unlike `resize_slice` it always resizes, even when the shape already matches (then it is the
    identity up to the final cast).
    """
    out_shape = (S, S) if isinstance(S, int) else tuple(S)
    wd = working_dtype(sl.dtype)
    image = sl.astype(wd)
    factors = np.divide(image.shape, out_shape)
    sigmas = np.maximum(0, (factors - 1) / 2)
    filt = image
    for axis in range(2):
        if sigmas[axis] > 1e-15:
            filt = gaussian_filter_axis(filt, float(sigmas[axis]), axis)
    if tuple(image.shape) == out_shape:
        out = filt.copy()
    else:
        out = zoom_linear_mirror(filt, out_shape)
    np.clip(out, image.min(), image.max(), out=out)
    return out.astype(sl.dtype)


# ----------------------------------------------------------------------------------------------
# Step 5: quantise, grey -> RGB, HF processor
# ----------------------------------------------------------------------------------------------


def quantize_slice(sl: np.ndarray) -> np.ndarray:
    """Per-slice min-max quantisation to uint8, NumPy 2 semantics:

        q = ((sl - sl.min()) / (sl.max() - sl.min() + 1e-8) * 255).astype(np.uint8)

    - integer input: `sl - min` and `max - min` are computed in the input integer dtype (exact for
      unsigned types; int16 would wrap around), `+ 1e-8` promotes to float64, the division and
      `* 255` are float64. The ratio is always < 1, so codes are 0..254: the maximum maps to
      254, and a full-range 0..255 uint8 slice maps every nonzero x to x - 1.
    - float32 input: everything stays float32 (NumPy 2 weak Python scalars: 1e-8 is rounded to
      float32 and then added in float32, which does nothing once max - min > ~0.2); the maximum
      maps to 255 when max - min + 1e-8 rounds to max - min. float64 input: float64.
    - the float -> uint8 cast truncates toward zero (= floor, values are >= 0).
    - a constant slice gives all zeros.
    """
    lo = sl.min()
    hi = sl.max()
    return ((sl - lo) / (hi - lo + 1e-8) * 255).astype(np.uint8)


def gray_to_rgb(q: np.ndarray) -> np.ndarray:
    """PIL `Image.fromarray(q, 'L').convert('RGB')` then the processor's to-tensor: the uint8
    grey value replicated into 3 channels, channel-first (3, rows, cols)."""
    return np.ascontiguousarray(np.broadcast_to(q[None], (3,) + q.shape))


def preprocess_pixels(rgb: np.ndarray, mean, std) -> torch.Tensor:
    """HF DINOv3ViTImageProcessor with size == (S, S) on a (B, 3, S, S) uint8 batch, float32:

        x = float32(rgb) * float32(1/255)        # rescale: a multiplication, not a division
        (resize: the images already are S x S, torchvision returns them unchanged)
        x = (x - float32(mean[c])) / float32(std[c])   # normalize: subtraction then division

    rescale_factor is the Python float 1/255 = 0.00392156862745098, rounded once to float32.
    """
    x = torch.from_numpy(np.ascontiguousarray(rgb))
    x = x * (1.0 / 255.0)  # uint8 tensor * Python float -> float32
    assert x.dtype == torch.float32
    m = torch.tensor(mean, dtype=torch.float32)[None, :, None, None]
    s = torch.tensor(std, dtype=torch.float32)[None, :, None, None]
    return (x - m) / s


def preprocess_pixels_hf(q_slices: np.ndarray, mean, std) -> torch.Tensor | None:
    """The same through transformers' own processor and PIL, as dinov3_playground does it
    (list of PIL 'L' -> 'RGB' images, DINOv3ViTImageProcessor(size={S,S})). Returns None when
    the processor cannot be built (it needs torchvision)."""
    try:
        from PIL import Image
        from transformers import DINOv3ViTImageProcessor

        S = q_slices.shape[-1]
        proc = DINOv3ViTImageProcessor(
            size={"height": S, "width": S}, image_mean=list(mean), image_std=list(std)
        )
    except Exception:  # noqa: BLE001 - torchvision missing or the class renamed
        return None
    images = [Image.fromarray(q, mode="L").convert("RGB") for q in q_slices]
    return proc(images=images, return_tensors="pt")["pixel_values"]


# ----------------------------------------------------------------------------------------------
# Step 6: ViT patch tokens
# ----------------------------------------------------------------------------------------------


def vit_patch_tokens(model, pixels: torch.Tensor, autocast: bool = False) -> torch.Tensor:
    """`model(pixel_values=pixels).last_hidden_state` (B, T, Cd), drop the first
    T - (S/16)^2 tokens (CLS + registers), reshape row-major (token t = row * g + col) to
    (B, g, g, Cd) and permute to (Cd, B, g, g), float32.

    autocast=False: plain fp32 (what volfuse computes). autocast=True: inside
    `torch.autocast("cpu", dtype=torch.bfloat16)` like dinov3_playground's
    enable_amp_inference (linear/conv/SDPA in bf16, LayerNorm and residuals in fp32).
    """
    B, _, Hp, Wp = pixels.shape
    g_h, g_w = Hp // 16, Wp // 16
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        hidden = model(pixel_values=pixels).last_hidden_state
    hidden = hidden.float()
    n_prefix = hidden.shape[1] - g_h * g_w
    patches = hidden[:, n_prefix:, :]
    return patches.reshape(B, g_h, g_w, -1).permute(3, 0, 1, 2).contiguous()


# ----------------------------------------------------------------------------------------------
# Steps 7-9: token resize, stacking, combining
# ----------------------------------------------------------------------------------------------


def plane_output_hw(plane: str, input_size) -> tuple[int, int]:
    """Output grid of a plane's token resize: xy -> (h, w), xz -> (d, w), yz -> (d, h)."""
    d, h, w = input_size
    return {"xy": (h, w), "xz": (d, w), "yz": (d, h)}[plane]


def resize_tokens(tokens: torch.Tensor, out_hw: tuple[int, int]) -> torch.Tensor:
    """`F.interpolate(tokens (Cd, B, g, g), size=out_hw, mode="bilinear", align_corners=False)`
    (no antialias, also when shrinking), float32. Per axis: scale = float32(in) / float32(out);
    src = scale * (o + 0.5) - 0.5 clamped below at 0; i0 = floor(src), i1 = min(i0 + 1, in - 1);
    l1 = src - i0, l0 = 1 - l1; separable bilinear (edge clamp), up to FMA contraction in the
    last bit (compare with a tolerance). E.g. g = 2 -> 8: scale 0.25,
    src = 0.25 o - 0.375: outputs 0, 1 equal x[0]; 6, 7 equal x[1]."""
    return F.interpolate(tokens, size=tuple(out_hw), mode="bilinear", align_corners=False)


def stack_plane(tokens: torch.Tensor, plane: str) -> torch.Tensor:
    """Put the per-slice maps (Cd, n_slices, a, b) into (Cd, d, h, w): xy slices along D (as is),
    xz slices along H ((Cd, h, d, w) -> permute(0, 2, 1, 3)), yz slices along W
    ((Cd, w, d, h) -> permute(0, 2, 3, 1))."""
    if plane == "xy":
        return tokens
    if plane == "xz":
        return tokens.permute(0, 2, 1, 3).contiguous()
    if plane == "yz":
        return tokens.permute(0, 2, 3, 1).contiguous()
    raise ValueError(plane)


def combine_planes(planes: list[torch.Tensor]) -> torch.Tensor:
    """`torch.stack(planes).mean(0)`, float32. For three planes this equals
    ((xy + xz) + yz) / 3 in float32 (a division, bit-exact on the CPU build used here). With a
    single plane (use_orthogonal_planes=False) it is that plane unchanged."""
    return torch.stack(planes).mean(0)


# ----------------------------------------------------------------------------------------------
# Whole pipeline
# ----------------------------------------------------------------------------------------------


def extract_features_plane(
    volume: np.ndarray,
    model,
    plane: str,
    processor_mean,
    processor_std,
    input_size,
    slice_size: int,
    batch: int = 512,
    autocast: bool = False,
    debug: dict | None = None,
) -> torch.Tensor:
    """One plane of `extract_dinov3_features_3d`: returns (Cd, d, h, w) float32.

    Slices are processed in batches of `batch` (quantisation is per slice, so batching changes
    nothing but the ViT batch size). If `debug` is a dict it receives the intermediates:
    'downsampled' (the volume after step 1, only if it was downsampled), 'indices',
    'resized' (n, S, S) in the input dtype, 'quantized' (n, S, S) uint8, 'pixels'
    (n, 3, S, S) float32, 'tokens' (Cd, n, g, g) float32 before the resize.
    """
    axis = NORMAL_AXIS[plane]
    n_in, n_out = volume.shape[axis], input_size[axis]
    vol = volume
    if needs_normal_downsample(n_in, n_out):
        vol = downsample_normal(volume, axis, n_out)
        if debug is not None:
            debug["downsampled"] = vol
    indices = pick_slice_indices(vol.shape[axis], n_out)
    out_hw = plane_output_hw(plane, input_size)
    if debug is not None:
        debug.update(indices=indices, resized=[], quantized=[], pixels=[], tokens=[])
    chunks = []
    for b0 in range(0, len(indices), batch):
        resized = [resize_slice(slice_image(vol, plane, int(i)), slice_size) for i in indices[b0 : b0 + batch]]
        quantized = [quantize_slice(r) for r in resized]
        rgb = np.stack([gray_to_rgb(q) for q in quantized])
        pixels = preprocess_pixels(rgb, processor_mean, processor_std)
        tokens = vit_patch_tokens(model, pixels, autocast=autocast)
        chunks.append(resize_tokens(tokens, out_hw))
        if debug is not None:
            debug["resized"] += resized
            debug["quantized"] += quantized
            debug["pixels"].append(pixels)
            debug["tokens"].append(tokens)
    if debug is not None:
        debug["resized"] = np.stack(debug["resized"])
        debug["quantized"] = np.stack(debug["quantized"])
        debug["pixels"] = torch.cat(debug["pixels"]).numpy()
        debug["tokens"] = torch.cat(debug["tokens"], dim=1).numpy()
    return stack_plane(torch.cat(chunks, dim=1), plane)


def extract_dinov3_features_3d(
    volume: np.ndarray,
    model,
    processor_mean=IMAGENET_MEAN,
    processor_std=IMAGENET_STD,
    input_size=(128, 128, 128),
    slice_size: int = 512,
    use_orthogonal_planes: bool = True,
    batch: int = 512,
    autocast: bool = False,
    debug: dict | None = None,
) -> np.ndarray:
    """dinov3_playground `extract_dinov3_features_3d` for one (D, H, W) volume (uint8, uint16 or
    float32): returns the (Cd, d, h, w) float32 feature volume, (d, h, w) = input_size, whatever
    the volume's shape. Planes xy, xz, yz in this order, each from `extract_features_plane` on the
    ORIGINAL volume; the result is their mean (`combine_planes`). use_orthogonal_planes=False
    returns the xy plane only. `model` is an HF DINOv3ViTModel in eval mode (fp32 weights);
    autocast=True reproduces the original's bf16 autocast. `debug`, if a dict, gets one dict of
    intermediates per plane (see `extract_features_plane`) plus the per-plane features under
    'plane_<name>'.
    """
    if volume.ndim != 3:
        raise ValueError(f"volume must be (D, H, W), got {volume.shape}")
    input_size = tuple(int(v) for v in input_size)
    planes = PLANES if use_orthogonal_planes else ("xy",)
    feats = []
    for plane in planes:
        dbg = {} if debug is not None else None
        f = extract_features_plane(
            volume, model, plane, processor_mean, processor_std, input_size, int(slice_size),
            batch=batch, autocast=autocast, debug=dbg,
        )
        if debug is not None:
            debug[plane] = dbg
            debug[f"plane_{plane}"] = f.numpy()
        feats.append(f)
    out = combine_planes(feats)
    assert out.shape[1:] == input_size, (out.shape, input_size)
    return out.numpy().astype(np.float32)


# ----------------------------------------------------------------------------------------------
# Self-test: the explicit skimage resize against skimage, on random slices
# ----------------------------------------------------------------------------------------------


def _selftest() -> None:
    from skimage.transform import resize

    rng = np.random.default_rng(0)
    shapes = [(20, 28), (36, 32), (48, 10), (64, 16), (7, 50), (33, 31), (100, 3)]
    n = 0
    for dtype in (np.uint8, np.uint16, np.float32, np.float64):
        for shape in shapes:
            for out in [(32, 32), (16, 40), (5, 5)]:
                if np.issubdtype(dtype, np.integer):
                    a = rng.integers(0, np.iinfo(dtype).max, size=shape, endpoint=True).astype(dtype)
                    a[: shape[0] // 2, : shape[1] // 2] = a[0, 0]  # flat area: truncation traps
                else:
                    a = (rng.standard_normal(shape) * 300 + 50).astype(dtype)
                ref = resize(a, out, preserve_range=True, anti_aliasing=True).astype(dtype)
                got = resize_slice_explicit(a, out)
                assert got.dtype == ref.dtype and np.array_equal(got, ref), (dtype, shape, out)
                n += 1
    print(f"resize_slice_explicit == skimage.transform.resize on {n} cases")


if __name__ == "__main__":
    _selftest()
