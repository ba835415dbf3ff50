#!/usr/bin/env python3
"""Build the end-to-end fixture of volfuse: one tile through the whole pipeline of a bundle.

Writes (relative to the repository root):

  tests/fixtures/e2e_tiny_ctx/   raw.npy and context.npy (uint8 (40, 36, 44)) and what the bundle
                                 tests/fixtures/bundle_tiny_ctx makes of them: logits (with and
                                 without context), softmax probabilities, argmax labels

The pipeline is dinov3_playground's inference as the bundle (volfuse.json) defines it:

  features = extract_dinov3_features_3d(volume, backbone, image_mean, image_std,
                                        model_config.input_size, model_config.dinov3_slice_size,
                                        training_config.use_orthogonal_planes)   # fp32, no autocast
  logits   = DINOv3UNet3D(features, context_features)    # unet.safetensors (F16) upcast to f32
  probabilities = softmax over classes, labels = argmax (uint8)

with tools/reference_features.py and tools/reference_unet.py. Raw and context are cut from one
(80, 72, 88) parent volume (blobs + gradient + noise, fixed seed): raw is its centre crop, context
its 2x2x2 mean, so the context is the concentric tile of twice the extent at half the resolution,
with the raw tile's voxel shape (the geometry volfuse's `segment` expects).

Everything is seeded and single-threaded, so a rerun gives identical files. See tools/README.md.

Usage:  tools/.venv/bin/python tools/make_e2e_fixtures.py [--out tests/fixtures] [--check]
                                                            [--features-to DIR]
  --check        build in a temporary folder and compare it byte for byte with --out
  --features-to  also write features_raw.npy / features_context.npy (64, 16, 16, 16) float32 there
                 (the fixture holds them only while it stays below 1.5 MB, which 2 x 1 MB of
                 features do not)
"""

from __future__ import annotations

import argparse
import filecmp
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file as load_safetensors
from transformers import DINOv3ViTModel
from transformers.utils import logging as hf_logging

sys.path.insert(0, str(Path(__file__).resolve().parent))
import reference_features as rf  # noqa: E402
from make_feature_fixtures import plane_info, truncation_hits, write_json  # noqa: E402
from reference_unet import check_state_dict_layout, model_from_config  # noqa: E402

FOLDER = "e2e_tiny_ctx"
BUNDLE_DIR = "bundle_tiny_ctx"  # relative to the fixtures folder; read, never written
SEED = 7007
PARENT_SHAPE = (80, 72, 88)
TILE_SHAPE = tuple(n // 2 for n in PARENT_SHAPE)  # (40, 36, 44)
CROP_START = tuple((p - t) // 2 for p, t in zip(PARENT_SHAPE, TILE_SHAPE))  # (20, 18, 22)
# The debug feature files are written into the fixture only while it stays below this size.
MAX_FOLDER_BYTES = 1_500_000
# Relative sizes of the feature perturbations of the label-stability check (x max |feature|).
FEATURE_NOISE = (1e-6, 1e-5, 1e-4, 1e-3)
# Voxels whose top-1/top-2 logit gap is below this are listed in params.json.
LOW_GAP = 1e-3


def parent_volume(seed: int) -> np.ndarray:
    """uint8 (80, 72, 88): a gradient, 18 Gaussian blobs (12 of them centred in the middle half,
    i.e. inside the raw tile; radii 2.5-8 % of the extent, so 5-16 % of the tile) and N(0, 0.06)
    voxel noise, min-max scaled to floor(300 v - 20) clipped to 0..255 (some saturated areas)."""
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[(np.arange(n, dtype=np.float64) + 0.5) / n for n in PARENT_SHAPE], indexing="ij")
    v = 0.5 * grids[0] + 0.3 * grids[1] - 0.4 * grids[2]
    for k in range(18):
        c = rng.uniform(0.27, 0.73, size=3) if k < 12 else rng.uniform(0, 1, size=3)
        r = rng.uniform(0.025, 0.08)
        amp = rng.uniform(-1.0, 1.5)
        d2 = sum((g - ci) ** 2 for g, ci in zip(grids, c))
        v = v + amp * np.exp(-d2 / (2 * r * r))
    v = v + 0.06 * rng.standard_normal(PARENT_SHAPE)
    v = (v - v.min()) / (v.max() - v.min())
    return np.clip(np.floor(v * 300 - 20), 0, 255).astype(np.uint8)


def raw_and_context(parent: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """raw = parent[20:60, 18:54, 22:66]; context[i,j,k] = round-half-up mean of the 2x2x2 block
    parent[2i:2i+2, 2j:2j+2, 2k:2k+2] = (sum + 4) // 8 (exact integer arithmetic)."""
    sl = tuple(slice(s, s + t) for s, t in zip(CROP_START, TILE_SHAPE))
    raw = np.ascontiguousarray(parent[sl])
    blocks = parent.astype(np.int64).reshape(TILE_SHAPE[0], 2, TILE_SHAPE[1], 2, TILE_SHAPE[2], 2)
    context = ((blocks.sum(axis=(1, 3, 5)) + 4) // 8).astype(np.uint8)
    return raw, context


def save_npy(path: Path, arr: np.ndarray) -> None:
    np.save(path, np.ascontiguousarray(arr), allow_pickle=False)


def load_bundle(bundle: Path):
    """The bundle as volfuse reads it: volfuse.json, the backbone in fp32, the UNet upcast to f32."""
    meta = json.loads((bundle / "volfuse.json").read_text())
    mc, tc = meta["model_config"], meta["training_config"]
    vit = DINOv3ViTModel.from_pretrained(bundle / meta["backbone"], dtype=torch.float32).eval()
    sd = load_safetensors(str(bundle / "unet.safetensors"))
    stored = sorted({str(v.dtype) for v in sd.values()})
    sd = {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}
    unet = model_from_config(mc, sd.keys())
    unet.load_state_dict(sd)  # strict
    check_state_dict_layout(unet)
    unet.eval()
    params = dict(
        input_size=[int(s) for s in mc["input_size"]],
        slice_size=int(mc["dinov3_slice_size"]),
        mean=[float(x) for x in meta["image_mean"]],
        std=[float(x) for x in meta["image_std"]],
        use_orthogonal_planes=bool(tc["use_orthogonal_planes"]),
    )
    if mc["output_type"] != "labels":
        raise RuntimeError(f"{bundle}: output_type {mc['output_type']!r}, this script expects 'labels'")
    return meta, vit, unet, params, stored


def features(volume: np.ndarray, vit, params: dict) -> np.ndarray:
    return rf.extract_dinov3_features_3d(
        volume, vit, params["mean"], params["std"], params["input_size"], params["slice_size"],
        use_orthogonal_planes=params["use_orthogonal_planes"], autocast=False,
    )


def unet_logits(unet, feats: np.ndarray, ctx: np.ndarray | None, dtype=torch.float32) -> torch.Tensor:
    with torch.no_grad():
        x = torch.from_numpy(feats)[None].to(dtype)
        c = torch.from_numpy(ctx)[None].to(dtype) if ctx is not None else None
        return unet(x, c)[0]


def top2_gap(logits: torch.Tensor) -> torch.Tensor:
    t = logits.topk(2, dim=0).values
    return t[0] - t[1]


def build(out: Path, bundle: Path, log, features_to: Path | None = None) -> dict:
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    torch.set_float32_matmul_precision("highest")
    meta, vit, unet, params, stored = load_bundle(bundle)

    parent = parent_volume(SEED)
    raw, context = raw_and_context(parent)
    f_raw = features(raw, vit, params)
    f_ctx = features(context, vit, params)
    logits = unet_logits(unet, f_raw, f_ctx)
    logits0 = unet_logits(unet, f_raw, None)
    probs = torch.softmax(logits, dim=0)
    labels = logits.argmax(dim=0).to(torch.uint8)
    assert torch.equal(labels, probs.argmax(dim=0).to(torch.uint8))
    K = logits.shape[0]

    folder = out / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    save_npy(folder / "raw.npy", raw)
    save_npy(folder / "context.npy", context)
    save_npy(folder / "logits.npy", logits.numpy().astype(np.float32))
    save_npy(folder / "probabilities.npy", probs.numpy().astype(np.float32))
    save_npy(folder / "labels.npy", labels.numpy())
    save_npy(folder / "logits_nocontext.npy", logits0.numpy().astype(np.float32))

    # --- label stability (reported and recorded in params.json) ---
    gap = top2_gap(logits)
    gap0 = top2_gap(logits0)
    labels0 = logits0.argmax(dim=0)
    # The UNet in float64 on the same fp32 features: how far fp32 evaluation order can move logits.
    unet64 = unet.double()
    l64 = unet_logits(unet64, f_raw, f_ctx, torch.float64)
    l64_0 = unet_logits(unet64, f_raw, None, torch.float64)
    unet.float()
    e64 = float((logits.double() - l64).abs().max())
    e64_0 = float((logits0.double() - l64_0).abs().max())
    flips64 = int((l64.argmax(0) != labels.long()).sum())
    # Features perturbed as a different fp32 implementation might perturb them: N(0, r · max|f|)
    # added to every raw and context feature, for a few relative sizes r.
    fmax = float(max(np.abs(f_raw).max(), np.abs(f_ctx).max()))
    sensitivity = []
    for r in FEATURE_NOISE:
        gen = np.random.default_rng(SEED + 1)
        noisy = unet_logits(
            unet, (f_raw + r * fmax * gen.standard_normal(f_raw.shape)).astype(np.float32),
            (f_ctx + r * fmax * gen.standard_normal(f_ctx.shape)).astype(np.float32),
        )
        sensitivity.append(dict(
            relative_feature_noise=r,
            max_abs_logit_change=float((noisy - logits).abs().max()),
            label_flips=int((noisy.argmax(0) != labels.long()).sum()),
        ))
    low = (gap < LOW_GAP).nonzero().tolist()
    low_gap_voxels = [dict(zyx=v, gap=float(gap[tuple(v)]), top2=[int(i) for i in logits[(slice(None), *v)].topk(2).indices])
                      for v in low]
    fractions = [round(float((labels == k).float().mean()), 4) for k in range(K)]
    fractions0 = [round(float((labels0 == k).float().mean()), 4) for k in range(K)]
    changed = int((labels0 != labels.long()).sum())

    hits = {name: truncation_hits(v, params["input_size"], params["slice_size"]) for name, v in (("raw", raw), ("context", context))}
    planes = plane_info(TILE_SHAPE, params["input_size"], params["slice_size"])
    for plane in rf.PLANES:
        planes[plane]["resize_values_truncated_to_integer_minus_1"] = {n: hits[n][plane] for n in hits}
    info = dict(
        bundle=f"../{BUNDLE_DIR}",
        unet_weights_stored_as=stored,
        unet_weights_computed_as="float32",
        parent_shape=list(PARENT_SHAPE),
        parent_seed=SEED,
        raw="parent[20:60, 18:54, 22:66] (centre crop)",
        context="(sum of parent[2i:2i+2, 2j:2j+2, 2k:2k+2] + 4) // 8, uint8 (2x mean downsample)",
        crop_start=list(CROP_START),
        volume_shape=list(TILE_SHAPE),
        **params,
        autocast=False,
        head="softmax",
        planes=planes,
        num_classes=K,
        label_fractions=fractions,
        label_fractions_nocontext=fractions0,
        labels_changed_by_context=changed,
        min_top2_logit_gap=float(gap.min()),
        min_top2_logit_gap_nocontext=float(gap0.min()),
        low_gap_voxels=low_gap_voxels,
        max_abs_logit=float(logits.abs().max()),
        max_abs_feature=fmax,
        fp32_vs_float64_unet_max_abs_logit_diff=e64,
        feature_noise_sensitivity=sensitivity,
    )
    write_json(folder / "params.json", info)

    # The feature volumes go into the fixture only if it stays below MAX_FOLDER_BYTES.
    feature_bytes = f_raw.nbytes + f_ctx.nbytes + 2 * 128  # + the two .npy headers
    size = sum(p.stat().st_size for p in folder_files(folder))
    with_features = size + feature_bytes < MAX_FOLDER_BYTES
    targets = ([folder] if with_features else []) + ([features_to] if features_to is not None else [])
    for target in targets:
        target.mkdir(parents=True, exist_ok=True)
        save_npy(target / "features_raw.npy", f_raw)
        save_npy(target / "features_context.npy", f_ctx)

    log(
        f"{FOLDER}: raw {raw.shape} [{raw.min()}, {raw.max()}] mean {raw.mean():.1f}, context "
        f"{context.shape} [{context.min()}, {context.max()}] mean {context.mean():.1f}; UNet stored "
        f"as {stored}, computed in float32"
    )
    log(
        f"  features raw {f_raw.shape} |f| max {np.abs(f_raw).max():.3f}, context |f| max "
        f"{np.abs(f_ctx).max():.3f}; raw vs context features differ by "
        f"{np.abs(f_raw - f_ctx).max():.3f} max"
    )
    log(
        f"  logits {tuple(logits.shape)} in [{logits.min():.3f}, {logits.max():.3f}], labels "
        f"fractions {fractions} (no context: {fractions0}; context changes {changed} of "
        f"{labels.numel()} labels, logits by {float((logits - logits0).abs().max()):.3f} max)"
    )
    log(
        f"  min top-1/top-2 logit gap {float(gap.min()):.3e} (no context {float(gap0.min()):.3e}); "
        f"{int((gap < 1e-4).sum())} voxels < 1e-4, {int((gap < 1e-3).sum())} < 1e-3, "
        f"{int((gap < 1e-2).sum())} < 1e-2"
    )
    log(
        f"  fp32 vs float64 UNet: max |Δlogit| {e64:.1e} (no context {e64_0:.1e}), {flips64} label "
        f"flips"
    )
    for t in sensitivity:
        log(f"  features + N(0, ({t['relative_feature_noise']:.0e} · max|f|)²): max |Δlogit| "
            f"{t['max_abs_logit_change']:.1e}, {t['label_flips']} label flips")
    for v in low_gap_voxels:
        log(f"  low gap voxel {v}")
    for plane, p in planes.items():
        log(
            f"  {plane}: ratio {p['ratio']:.3g} downsampled={p['downsampled']} slices "
            f"{p['slice_shape']} -> {params['slice_size']}; resized values truncated to integer - 1: "
            f"{p['resize_values_truncated_to_integer_minus_1']}"
        )
    log(f"  features_raw.npy + features_context.npy: {feature_bytes} bytes, "
        f"{'included' if with_features else 'not included'} (folder limit {MAX_FOLDER_BYTES} bytes)")


def folder_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def main() -> int:
    hf_logging.disable_progress_bar()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    root = Path(__file__).resolve().parent.parent
    parser.add_argument("--out", type=Path, default=root / "tests" / "fixtures")
    parser.add_argument("--check", action="store_true", help="rebuild in a temp dir and compare with --out")
    parser.add_argument("--features-to", type=Path, default=None, help="also write the features there")
    args = parser.parse_args()
    bundle = args.out / BUNDLE_DIR

    if not args.check:
        shutil.rmtree(args.out / FOLDER, ignore_errors=True)
        build(args.out, bundle, print, args.features_to)
        size = sum(p.stat().st_size for p in folder_files(args.out / FOLDER))
        print(f"{FOLDER}: {size} bytes")
        return 0

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        build(tmp, bundle, lambda *_: None)
        fresh = {p.relative_to(tmp / FOLDER) for p in folder_files(tmp / FOLDER)}
        have = {p.relative_to(args.out / FOLDER) for p in folder_files(args.out / FOLDER)} if (args.out / FOLDER).exists() else set()
        bad = [f"{FOLDER}/{p} (missing)" for p in sorted(fresh - have)]
        bad += [f"{FOLDER}/{p} (not built)" for p in sorted(have - fresh)]
        bad += [
            f"{FOLDER}/{p}" for p in sorted(fresh & have)
            if not filecmp.cmp(tmp / FOLDER / p, args.out / FOLDER / p, shallow=False)
        ]
        if bad:
            print("differs from a fresh build:", *bad, sep="\n  ")
            return 1
        print("fixtures are up to date")
        return 0


if __name__ == "__main__":
    sys.exit(main())
