#!/usr/bin/env python3
"""Build the 3D feature-extraction test fixtures of volfuse.

Writes (relative to the repository root):

  tests/fixtures/features_u8/     uint8 volume (24, 20, 28) -> features (64, 8, 8, 8),   S 32
  tests/fixtures/features_u16/    uint16 volume (20, 50, 6) -> features (64, 8, 25, 8),  S 32
  tests/fixtures/features_f32/    float32 volume (18, 14, 22) -> features (64, 8, 8, 8), S 48
  tests/fixtures/features_steps/  step-level cases: skimage resize, the normal-axis trilinear
                                  downsample, np.linspace slice picking

All features come from tools/reference_features.py (dinov3_playground's
extract_dinov3_features_3d, shared/reference/dinov3_playground.md §d) with the tiny fixture ViT
tests/fixtures/vit_gelu (fp32, eval). Everything is seeded and single-threaded, so a rerun gives
identical files. See tools/README.md.

Usage:  tools/.venv/bin/python tools/make_feature_fixtures.py [--out tests/fixtures] [--check]
  --check  build everything in a temporary folder and compare it byte for byte with --out
"""

from __future__ import annotations

import argparse
import filecmp
import json
import re
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import DINOv3ViTModel
from transformers.utils import logging as hf_logging

sys.path.insert(0, str(Path(__file__).resolve().parent))
import reference_features as rf  # noqa: E402

MODEL_DIR = "vit_gelu"  # relative to the fixtures folder

# name -> volume generator arguments and extraction parameters.
FIXTURES = {
    # D 24/8 = 3 (downsample, src = 3o+1: exact picks), H 20/8 = 2.5 and W 28/8 = 3.5
    # (downsample, weights 1/4 and 3/4); every slice is upsampled to 32 (20, 24, 28 -> 32).
    "features_u8": dict(
        seed=3001, dtype="uint8", shape=(24, 20, 28), input_size=(8, 8, 8), slice_size=32,
        mean=rf.IMAGENET_MEAN, std=rf.IMAGENET_STD,
    ),
    # D 20/8 = 2.5 > 2: downsampled; H 50/25 = 2.0 exactly: NOT downsampled, slices picked
    # unevenly; W 6 < 8: slices repeat. Slices: xy (50, 6) rows shrink 50 -> 32 (anti-aliasing
    # sigma 0.28125) while columns grow 6 -> 32; xz (20, 6) grow; yz (20, 50) rows grow, columns
    # shrink. The top of the range saturates at 60001, a value whose flat areas come out of the
    # xy resize as 60000.99999... and truncate to 60000.
    "features_u16": dict(
        seed=3002, dtype="uint16", shape=(20, 50, 6), input_size=(8, 25, 8), slice_size=32,
        mean=rf.IMAGENET_MEAN, std=rf.IMAGENET_STD,
    ),
    # float32 path (no truncating casts; float32 skimage/quantisation), SAT-493M statistics,
    # S 48 (3 x 3 token grid). D 18/8 = 2.25 and W 22/8 = 2.75 downsampled, H 14/8 = 1.75 not.
    # The last H slice (y = 13, always picked) is constant: its xz image quantises to all zeros.
    "features_f32": dict(
        seed=3003, dtype="float32", shape=(18, 14, 22), input_size=(8, 8, 8), slice_size=48,
        mean=rf.SAT493M_MEAN, std=rf.SAT493M_STD,
    ),
}

# The plane whose intermediates are saved, and how many normalised pixel images to keep.
DEBUG_PLANE = "xy"
DEBUG_PIXELS = 2

# Step-level skimage resize cases: name -> (dtype, input shape, output shape, kind).
RESIZE_CASES = {
    "u8_20x28_to_32x32": ("uint8", (20, 28), (32, 32), "smooth"),
    "u8_64x40_to_32x32": ("uint8", (64, 40), (32, 32), "smooth"),
    "u8_96x24_to_32x32": ("uint8", (96, 24), (32, 32), "smooth"),
    "u8_flat_50x30_to_32x32": ("uint8", (50, 30), (32, 32), "flat"),
    "u16_48x6_to_32x32": ("uint16", (48, 6), (32, 32), "smooth"),
    "u16_130x70_to_16x16": ("uint16", (130, 70), (16, 16), "smooth"),
    "u16_flat_50x30_to_24x24": ("uint16", (50, 30), (24, 24), "flat"),
    "f32_36x20_to_32x32": ("float32", (36, 20), (32, 32), "smooth"),
    "f32_25x33_to_16x48": ("float32", (25, 33), (16, 48), "smooth"),
}

# Normal-axis trilinear downsample cases: name -> (dtype, shape, axis, n_out).
DOWNSAMPLE_CASES = {
    "u16_23x5x4_axis0_to_7": ("uint16", (23, 5, 4), 0, 7),  # ratio 3.2857: inexact weights
    "u8_4x20x3_axis1_to_8": ("uint8", (4, 20, 3), 1, 8),  # ratio 2.5: weights 1/4, 3/4
    "f32_3x4x30_axis2_to_9": ("float32", (3, 4, 30), 2, 9),  # ratio 3.333
}

# np.linspace(0, n-1, n_out, dtype=int) cases, including ones where it differs from the exact
# integer floor(i*(n-1)/(n_out-1)).
LINSPACE_CASES = [(48, 24), (6, 8), (10, 12), (20, 8), (1, 4), (5, 1), (16, 16), (512, 128),
                  (3, 99), (4, 148), (148, 256), (295, 256), (391, 256)]


def structured_volume(shape, dtype: str, seed: int) -> np.ndarray:
    """Blobs + a gradient + noise, scaled to the dtype's range (with some saturated, flat areas
    for the integer types)."""
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.arange(n, dtype=np.float64) / n for n in shape], indexing="ij")
    v = 0.6 * grids[0] + 0.3 * grids[1] - 0.5 * grids[2]
    for _ in range(10):
        c = rng.uniform(0, 1, size=3)
        r = rng.uniform(0.08, 0.25)
        amp = rng.uniform(-1.0, 1.5)
        d2 = sum((g - ci) ** 2 for g, ci in zip(grids, c))
        v = v + amp * np.exp(-d2 / (2 * r * r))
    v = v + 0.08 * rng.standard_normal(shape)
    v = (v - v.min()) / (v.max() - v.min())
    if dtype == "uint8":
        return np.clip(np.floor(v * 300 - 20), 0, 255).astype(np.uint8)
    if dtype == "uint16":
        # wide range, not starting at 0: [300, 60001], the top saturated (flat).
        return np.clip(np.floor(v * 85000 + 300), 0, 60001).astype(np.uint16)
    if dtype == "float32":
        return (v * 9.0 - 3.0).astype(np.float32)  # ~[-3, 6]
    raise ValueError(dtype)


def resize_input(dtype: str, shape, kind: str, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.meshgrid(np.linspace(0, 1, shape[0]), np.linspace(0, 1, shape[1]), indexing="ij")
    v = 0.5 + 0.3 * np.sin(7 * yy + 3 * xx) + 0.2 * rng.standard_normal(shape)
    v = np.clip(v, 0, 1)
    if dtype == "uint8":
        a = np.round(v * 255).astype(np.uint8)
    elif dtype == "uint16":
        a = np.round(v * 60000 + 1000).astype(np.uint16)
    else:
        a = (v * 7 - 2).astype(np.float32)
    if kind == "flat":
        # Flat areas whose value skimage's float64 sums land a hair BELOW, so that the truncating
        # cast gives value - 1 (e.g. uint8 254 -> 253 for 50x30 -> 32x32): the trap of
        # reference_features.resize_slice.
        a[: shape[0] // 2, :] = 254 if dtype == "uint8" else 37000
        a[:, -5:] = a.max()
    return a


def save_npy(path: Path, arr: np.ndarray) -> None:
    np.save(path, np.ascontiguousarray(arr), allow_pickle=False)


def write_json(path: Path, obj) -> None:
    """Indented JSON with lists of plain numbers kept on one line."""
    text = json.dumps(obj, indent=1)
    text = re.sub(
        r"\[\n\s*([-+0-9.eE]+(?:,\n\s*[-+0-9.eE]+)*)\n\s*\]",
        lambda m: "[" + ", ".join(x.strip() for x in m.group(1).split(",")) + "]",
        text,
    )
    assert json.loads(text) == obj
    path.write_text(text + "\n")


def load_model(out: Path) -> DINOv3ViTModel:
    model = DINOv3ViTModel.from_pretrained(out / MODEL_DIR, dtype=torch.float32)
    model.eval()
    return model


def plane_info(shape, input_size, slice_size) -> dict:
    info = {}
    for plane in rf.PLANES:
        axis = rf.NORMAL_AXIS[plane]
        n_in, n_out = shape[axis], input_size[axis]
        down = rf.needs_normal_downsample(n_in, n_out)
        n = n_out if down else n_in
        img = {"xy": (shape[1], shape[2]), "xz": (shape[0], shape[2]), "yz": (shape[0], shape[1])}
        info[plane] = dict(
            normal_axis=axis,
            ratio=n_in / n_out,
            downsampled=down,
            slice_indices=rf.pick_slice_indices(n, n_out).tolist(),
            slice_shape=list(img[plane]),
            resized=list(img[plane]) != [slice_size, slice_size],
            token_grid=[slice_size // 16, slice_size // 16],
            output_hw=list(rf.plane_output_hw(plane, input_size)),
        )
    return info


def truncation_hits(vol: np.ndarray, input_size, S: int) -> dict:
    """Per plane: how many resized-slice pixels skimage computes a hair (< 1e-6) below an integer,
    which the truncating cast turns into integer - 1 (only meaningful for integer volumes)."""
    from skimage.transform import resize

    hits = {}
    for plane in rf.PLANES:
        axis = rf.NORMAL_AXIS[plane]
        v = vol
        if rf.needs_normal_downsample(vol.shape[axis], input_size[axis]):
            v = rf.downsample_normal(vol, axis, input_size[axis])
        n = 0
        for i in rf.pick_slice_indices(v.shape[axis], input_size[axis]):
            sl = rf.slice_image(v, plane, int(i))
            if sl.shape != (S, S) and np.issubdtype(sl.dtype, np.integer):
                f = resize(sl, (S, S), preserve_range=True, anti_aliasing=True)
                r = np.round(f)
                n += int(np.sum((f < r) & (r - f < 1e-6)))
        hits[plane] = n
    return hits


def write_feature_fixture(out: Path, name: str, spec: dict, model, log) -> dict:
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    vol = structured_volume(spec["shape"], spec["dtype"], spec["seed"])
    if spec["dtype"] == "float32":
        vol[:, -1, :] = np.float32(1.25)  # constant last H slice (see FIXTURES)
    kw = dict(
        processor_mean=spec["mean"], processor_std=spec["std"], input_size=spec["input_size"],
        slice_size=spec["slice_size"],
    )
    debug: dict = {}
    feats = rf.extract_dinov3_features_3d(vol, model, use_orthogonal_planes=True, debug=debug, **kw)
    dbg = debug[DEBUG_PLANE]

    save_npy(folder / "volume.npy", vol)
    save_npy(folder / "features.npy", feats)
    save_npy(folder / f"plane_{DEBUG_PLANE}.npy", debug[f"plane_{DEBUG_PLANE}"])
    save_npy(folder / f"resized_{DEBUG_PLANE}.npy", dbg["resized"])
    save_npy(folder / f"slices_{DEBUG_PLANE}.npy", dbg["quantized"])
    save_npy(folder / f"pixels_{DEBUG_PLANE}.npy", dbg["pixels"][:DEBUG_PIXELS])
    save_npy(folder / f"tokens_{DEBUG_PLANE}.npy", dbg["tokens"])
    if "downsampled" in dbg:
        save_npy(folder / f"downsampled_{DEBUG_PLANE}.npy", dbg["downsampled"])
    params = dict(
        volume_dtype=spec["dtype"],
        volume_shape=list(spec["shape"]),
        input_size=list(spec["input_size"]),
        slice_size=spec["slice_size"],
        mean=list(spec["mean"]),
        std=list(spec["std"]),
        use_orthogonal_planes=True,
        backbone=f"../{MODEL_DIR}",
        autocast=False,
        debug_plane=DEBUG_PLANE,
        planes=plane_info(spec["shape"], spec["input_size"], spec["slice_size"]),
    )
    hits = truncation_hits(vol, spec["input_size"], spec["slice_size"])
    for plane in rf.PLANES:
        params["planes"][plane]["resize_values_truncated_to_integer_minus_1"] = hits[plane]
    write_json(folder / "params.json", params)

    # --- consistency checks (nothing below is written) ---
    for plane in rf.PLANES:
        assert debug[plane]["indices"].tolist() == params["planes"][plane]["slice_indices"]
    xy_only = rf.extract_dinov3_features_3d(vol, model, use_orthogonal_planes=False, **kw)
    assert np.array_equal(xy_only, debug["plane_xy"]), "use_orthogonal_planes=False != plane xy"
    p = [torch.from_numpy(debug[f"plane_{pl}"]) for pl in rf.PLANES]
    assert np.array_equal(((p[0] + p[1]) + p[2]) / 3, feats), "mean != ((xy+xz)+yz)/3"
    # The explicit NumPy resize and downsample give the same features, bit for bit.
    saved = rf.resize_slice, rf.downsample_normal
    rf.resize_slice = lambda sl, S: sl if sl.shape == (S, S) else rf.resize_slice_explicit(sl, S)
    rf.downsample_normal = rf.downsample_normal_explicit
    try:
        explicit = rf.extract_dinov3_features_3d(vol, model, **kw)
    finally:
        rf.resize_slice, rf.downsample_normal = saved
    assert np.array_equal(explicit, feats), "the explicit resize/downsample change the features"
    # Batching does not change the features (batch 3 instead of 512).
    small = rf.extract_dinov3_features_3d(vol, model, batch=3, **kw)
    batch_diff = float(np.abs(small - feats).max())
    # The explicit preprocessing equals transformers' processor on PIL images.
    hf = rf.preprocess_pixels_hf(dbg["quantized"], spec["mean"], spec["std"])
    if hf is None:
        hf_msg = "HF processor unavailable (needs torchvision): check skipped"
    else:
        assert torch.equal(hf, torch.from_numpy(dbg["pixels"])), "preprocess != HF processor"
        hf_msg = f"pixels == DINOv3ViTImageProcessor bit for bit ({hf.shape[0]} images)"
    q = dbg["quantized"]
    log(
        f"{name}: volume {vol.dtype} {vol.shape} [{vol.min()}, {vol.max()}] -> features "
        f"{feats.shape}, |f| max {np.abs(feats).max():.3f}; quantised xy codes {q.min()}..{q.max()}; "
        f"{hf_msg}; batch 3 vs 512 max |Δ| {batch_diff:.1e}"
    )
    for plane, info in params["planes"].items():
        log(
            f"  {plane}: ratio {info['ratio']:.3g} downsampled={info['downsampled']} "
            f"slices {info['slice_indices']} of {info['slice_shape']} -> {info['output_hw']}, "
            f"{info['resize_values_truncated_to_integer_minus_1']} resized values a hair below an "
            f"integer (truncated to integer - 1)"
        )
    return dict(volume=vol, kw=kw, features=feats)


def write_resize_cases(folder: Path, log) -> None:
    from skimage.transform import resize

    d = folder / "resize_cases"
    d.mkdir(parents=True, exist_ok=True)
    index = []
    for k, (name, (dtype, shape, oshape, kind)) in enumerate(RESIZE_CASES.items()):
        a = resize_input(dtype, shape, kind, 4000 + k)
        raw = resize(a, oshape, preserve_range=True, anti_aliasing=True)
        b = raw.astype(a.dtype)
        assert np.array_equal(rf.resize_slice_explicit(a, oshape), b), name
        save_npy(d / f"{name}_in.npy", a)
        save_npy(d / f"{name}_out.npy", b)
        files = dict(input=f"{name}_in.npy", output=f"{name}_out.npy")
        if np.issubdtype(a.dtype, np.integer):
            save_npy(d / f"{name}_float.npy", raw)  # before the truncating cast
            files["before_cast"] = f"{name}_float.npy"
        factors = np.divide(shape, oshape)
        sigmas = np.maximum(0, (factors - 1) / 2)
        axes = []
        for ax in range(2):
            ent = dict(factor=float(factors[ax]), sigma=float(sigmas[ax]))
            if sigmas[ax] > 1e-15:
                w = rf.gaussian_kernel_1d(float(sigmas[ax]))
                ent.update(radius=(len(w) - 1) // 2, gaussian_weights=[float(x) for x in w])
            axes.append(ent)
        integer = np.issubdtype(a.dtype, np.integer)
        truncated = int(np.sum(b != np.round(raw))) if integer else 0
        below = int(np.sum((raw < np.round(raw)) & (np.round(raw) - raw < 1e-6))) if integer else 0
        index.append(dict(name=name, dtype=dtype, in_shape=list(shape), out_shape=list(oshape),
                          axes=axes, **files))
        log(f"resize {name}: sigma {sigmas.round(4).tolist()}, "
            f"{truncated} outputs where truncation != rounding, {below} of them a hair (<1e-6) "
            f"below an integer")
    write_json(folder / "resize_cases.json", dict(
        call="skimage.transform.resize(x, out_shape, preserve_range=True, anti_aliasing=True)"
             ".astype(x.dtype)",
        cases=index))


def write_downsample_cases(folder: Path, log) -> None:
    d = folder / "downsample_cases"
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(5000)
    index = []
    for name, (dtype, shape, axis, n_out) in DOWNSAMPLE_CASES.items():
        if dtype == "float32":
            a = rng.standard_normal(shape).astype(np.float32) * 100
        else:
            a = rng.integers(0, np.iinfo(dtype).max, size=shape, endpoint=True).astype(dtype)
        size = list(shape)
        size[axis] = n_out
        f = F.interpolate(torch.from_numpy(a.astype(np.float32))[None, None], size=tuple(size),
                          mode="trilinear", align_corners=False)[0, 0].numpy()
        b = rf.downsample_normal(a, axis, n_out)
        assert np.array_equal(b, f.astype(a.dtype))
        assert np.array_equal(rf.downsample_normal_explicit(a, axis, n_out), b), name
        save_npy(d / f"{name}_in.npy", a)
        save_npy(d / f"{name}_float.npy", f)
        save_npy(d / f"{name}_out.npy", b)
        index.append(dict(name=name, dtype=dtype, in_shape=list(shape), axis=axis, n_out=n_out,
                          input=f"{name}_in.npy", before_cast=f"{name}_float.npy",
                          output=f"{name}_out.npy"))
        log(f"downsample {name}: ratio {shape[axis] / n_out:.4g}")
    write_json(folder / "downsample_cases.json", dict(
        call="F.interpolate(float32(x)[None,None], size, mode='trilinear', "
             "align_corners=False)[0,0].numpy().astype(x.dtype)",
        cases=index))


def write_linspace_cases(folder: Path, log) -> None:
    cases = []
    for n, m in LINSPACE_CASES:
        idx = rf.pick_slice_indices(n, m).tolist()
        exact = [(i * (n - 1)) // (m - 1) for i in range(m)] if m > 1 else [0]
        cases.append(dict(n=n, n_out=m, indices=idx, differs_from_exact_floor=idx != exact,
                          downsample_first=rf.needs_normal_downsample(n, m)))
    write_json(folder / "linspace_cases.json", dict(
        call="np.linspace(0, n - 1, n_out, dtype=int)", cases=cases))
    log(f"linspace: {sum(c['differs_from_exact_floor'] for c in cases)} of {len(cases)} cases "
        f"differ from exact floor(i*(n-1)/(n_out-1))")


def bf16_report(model, fx: dict, log) -> None:
    """How much dinov3_playground's bf16 autocast moves the features vs. fp32."""
    for name, r in fx.items():
        ref = r["features"]
        bf = rf.extract_dinov3_features_3d(r["volume"], model, autocast=True, **r["kw"])
        d = np.abs(bf - ref)
        a = np.abs(ref)
        cos = (bf * ref).sum(0) / (np.linalg.norm(bf, axis=0) * np.linalg.norm(ref, axis=0))
        log(
            f"bf16 autocast vs fp32, {name}: max|Δ| {d.max():.3e} (max|f| {a.max():.3f}) -> "
            f"max|Δ|/max|f| {d.max() / a.max():.2e}, mean|Δ|/mean|f| {d.mean() / a.mean():.2e}, "
            f"max elementwise |Δ|/|f| over |f|>0.1·rms {np.max(d / a, where=a > 0.1 * np.sqrt((ref**2).mean()), initial=0):.2e}, "
            f"min per-voxel cosine {cos.min():.6f}"
        )


def build(out: Path, log, bf16: bool = False) -> None:
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    model = load_model(out)
    fx = {name: write_feature_fixture(out, name, spec, model, log) for name, spec in FIXTURES.items()}
    steps = out / "features_steps"
    steps.mkdir(parents=True, exist_ok=True)
    write_resize_cases(steps, log)
    write_downsample_cases(steps, log)
    write_linspace_cases(steps, log)
    if bf16:
        bf16_report(model, fx, log)


FOLDERS = [*FIXTURES, "features_steps"]


def all_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def main() -> int:
    hf_logging.disable_progress_bar()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    root = Path(__file__).resolve().parent.parent
    parser.add_argument("--out", type=Path, default=root / "tests" / "fixtures")
    parser.add_argument("--check", action="store_true", help="rebuild in a temp dir and compare with --out")
    parser.add_argument("--no-bf16", action="store_true", help="skip the bf16 autocast measurement")
    args = parser.parse_args()

    if not args.check:
        for name in FOLDERS:
            shutil.rmtree(args.out / name, ignore_errors=True)
        build(args.out, print, bf16=not args.no_bf16)
        total = 0
        for name in FOLDERS:
            size = sum(p.stat().st_size for p in all_files(args.out / name))
            total += size
            print(f"{name}: {size} bytes")
        print(f"total {total} bytes")
        return 0

    with tempfile.TemporaryDirectory() as tmp:
        shutil.copytree(args.out / MODEL_DIR, Path(tmp) / MODEL_DIR)
        build(Path(tmp), lambda *_: None)
        bad = []
        for name in FOLDERS:
            new = {p.relative_to(Path(tmp) / name) for p in all_files(Path(tmp) / name)}
            old = {p.relative_to(args.out / name) for p in all_files(args.out / name)} if (args.out / name).is_dir() else set()
            bad += [f"{name}/{f}" for f in sorted(new ^ old)]
            bad += [
                f"{name}/{f}" for f in sorted(new & old)
                if not filecmp.cmp(Path(tmp) / name / f, args.out / name / f, shallow=False)
            ]
        if bad:
            print("differs from a fresh build:", *bad, sep="\n  ")
            return 1
        print("fixtures are up to date")
        return 0


if __name__ == "__main__":
    sys.exit(main())
