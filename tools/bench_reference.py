"""Times the PyTorch reference pipeline for one tile on the CPU, for `volfuse bench --model
... --torch`: dinov3_playground's orthogonal-plane feature extraction (as
tools/reference_features.py reproduces it: skimage resize, quantisation, HF DINOv3 ViT,
bilinear token lift, plane mean) of the raw and the context volume, then the UNet of
tools/reference_unet.py with context fusion, softmax and argmax (as `predict` does).

    tools/.venv/bin/python tools/bench_reference.py --hidden 384 --layers 12 --heads 6 \
        --mlp 1536 --registers 4 --base 32 --input 64 --slice 224 --volume 64 --context

Random weights (timing only), fp32 (no bf16 autocast, like volfuse), torch.set_num_threads
(THREADS, default 2), one warm-up tile, then --iters timed tiles (mean). Prints one JSON line:
{"seconds", "features_seconds", "unet_seconds", "stages": {...}, "cpu_seconds" (user + system
per timed tile), "peak_rss_bytes", "baseline_rss_bytes", "threads"}; peak_rss is the process's ru_maxrss after the runs,
baseline the same after importing torch and before any model exists.
"""

import argparse
import json
import os
import resource
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--hidden", type=int, default=384)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--mlp", type=int, default=1536)
    p.add_argument("--registers", type=int, default=4)
    p.add_argument("--patch", type=int, default=16)
    p.add_argument("--gated", action="store_true")
    p.add_argument("--base", type=int, default=32)
    p.add_argument("--input", type=int, default=64)
    p.add_argument("--slice", type=int, default=224)
    p.add_argument("--classes", type=int, default=3)
    p.add_argument("--volume", type=int, default=None, help="raw/context volume side (default: --input)")
    p.add_argument("--context", action="store_true")
    p.add_argument("--xy-only", action="store_true")
    p.add_argument("--batch", type=int, default=512, help="slices per ViT batch (the reference's 512)")
    p.add_argument("--iters", type=int, default=1)
    p.add_argument("--threads", type=int, default=int(os.environ.get("THREADS", "2")))
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    baseline = rss_bytes()

    from transformers import DINOv3ViTConfig, DINOv3ViTModel
    from reference_features import extract_dinov3_features_3d
    from reference_unet import DINOv3UNet3D

    torch.manual_seed(0)
    cfg = DINOv3ViTConfig(
        hidden_size=a.hidden, num_hidden_layers=a.layers, num_attention_heads=a.heads,
        intermediate_size=a.mlp, use_gated_mlp=a.gated, hidden_act="silu" if a.gated else "gelu",
        num_register_tokens=a.registers, patch_size=a.patch, image_size=a.slice,
    )
    vit = DINOv3ViTModel(cfg).eval()
    n = a.input
    unet = DINOv3UNet3D(input_channels=a.hidden, num_classes=a.classes, base_channels=a.base,
                        input_size=(n, n, n), use_context_fusion=a.context).eval()
    side = a.volume or n
    rng = np.random.default_rng(1)
    raw = rng.integers(0, 4096, size=(side, side, side), dtype=np.uint16)
    ctx = rng.integers(0, 4096, size=(side, side, side), dtype=np.uint16) if a.context else None

    def features(vol):
        return extract_dinov3_features_3d(
            vol, vit, input_size=(n, n, n), slice_size=a.slice,
            use_orthogonal_planes=not a.xy_only, batch=a.batch, autocast=False,
        )

    def tile():
        t = {}
        t0 = time.perf_counter()
        f = torch.from_numpy(features(raw))[None]
        t["features_raw"] = time.perf_counter() - t0
        c = None
        if ctx is not None:
            t0 = time.perf_counter()
            c = torch.from_numpy(features(ctx))[None]
            t["features_context"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        with torch.inference_mode():
            logits = unet(f, c) if c is not None else unet(f)
            probs = torch.softmax(logits, 1)
            labels = torch.argmax(logits, 1)
        del probs, labels
        t["unet"] = time.perf_counter() - t0
        return t

    def cpu():
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    tile()  # warm-up
    cpu0 = cpu()
    acc = {}
    for _ in range(max(1, a.iters)):
        for k, v in tile().items():
            acc[k] = acc.get(k, 0.0) + v / max(1, a.iters)
    cpu_seconds = (cpu() - cpu0) / max(1, a.iters)
    feats = acc.get("features_raw", 0.0) + acc.get("features_context", 0.0)
    print(json.dumps({
        "what": f"reference tile {n}^3, vit d{a.hidden} x{a.layers}, slice {a.slice}, unet base {a.base}"
                + (" + context" if a.context else ""),
        "seconds": feats + acc["unet"],
        "features_seconds": feats,
        "unet_seconds": acc["unet"],
        "stages": acc,
        "cpu_seconds": cpu_seconds,
        "peak_rss_bytes": rss_bytes(),
        "baseline_rss_bytes": baseline,
        "threads": a.threads,
    }))


if __name__ == "__main__":
    main()
