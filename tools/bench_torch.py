"""Times the PyTorch CPU references on this machine, for volfuse's benchmark ratios.

    tools/.venv/bin/python tools/bench_torch.py vit --size s --image 224 --batch 32
    tools/.venv/bin/python tools/bench_torch.py unet --base 32 --input 128
    tools/.venv/bin/python tools/bench_torch.py conv3d --cin 128 --cout 128 --kernel 3 --input 64

Prints one JSON line: {"what": ..., "images_per_s" | "voxels_per_s" | "gflops": ..., "seconds": ...,
"cpu_seconds": ..., "threads": ...}: seconds is wall time per iteration, cpu_seconds the process's
user + sys CPU time per iteration (steadier than wall time on a shared machine).
Random weights (timing only), fp32, torch.set_num_threads(THREADS) (default 2), no autocast.
"""

import argparse
import json
import os
import sys
import time

import torch

SIZES = {  # hidden, layers, heads, mlp, gated
    "s": (384, 12, 6, 1536, False),
    "s+": (384, 12, 6, 1536, True),
    "b": (768, 12, 12, 3072, False),
    "l": (1024, 24, 16, 4096, False),
}


CPU = {}  # process CPU seconds (user + sys) per iteration of the last bench()


def bench(fn, iters):
    """Wall seconds per iteration after one warm-up; CPU seconds go to CPU["seconds"]."""
    fn()  # warm-up
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(iters):
        fn()
    CPU["seconds"] = (time.process_time() - c0) / iters
    return (time.perf_counter() - t0) / iters


def vit(args):
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    d, layers, heads, mlp, gated = SIZES[args.size]
    cfg = DINOv3ViTConfig(hidden_size=d, num_hidden_layers=layers, num_attention_heads=heads,
                          intermediate_size=mlp, use_gated_mlp=gated,
                          hidden_act="silu" if gated else "gelu", num_register_tokens=4)
    model = DINOv3ViTModel(cfg).eval()
    x = torch.randn(args.batch, 3, args.image, args.image)
    with torch.inference_mode():
        s = bench(lambda: model(pixel_values=x), args.iters)
    return {"what": f"vit-{args.size} {args.image} b{args.batch}", "images_per_s": args.batch / s, "seconds": s}


def unet(args):
    sys.path.insert(0, os.path.dirname(__file__))
    from reference_unet import DINOv3UNet3D

    n = args.input
    model = DINOv3UNet3D(input_channels=args.channels, num_classes=3, base_channels=args.base,
                         input_size=(n, n, n), use_context_fusion=args.context).eval()
    x = torch.randn(1, args.channels, n, n, n)
    c = torch.randn(1, args.channels, n, n, n) if args.context else None
    with torch.inference_mode():
        s = bench(lambda: model(x, c) if c is not None else model(x), args.iters)
    return {"what": f"unet base {args.base} {n}^3", "voxels_per_s": n ** 3 / s, "seconds": s}


def conv3d(args):
    n, k = args.input, args.kernel
    conv = torch.nn.Conv3d(args.cin, args.cout, k, padding=k // 2).eval()
    x = torch.randn(1, args.cin, n, n, n)
    with torch.inference_mode():
        s = bench(lambda: conv(x), args.iters)
    flops = 2 * args.cin * args.cout * k ** 3 * n ** 3
    return {"what": f"conv3d {args.cin}->{args.cout} k{k} {n}^3", "gflops": flops / s / 1e9,
            "seconds": s}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=["vit", "unet", "conv3d"])
    p.add_argument("--size", default="s")
    p.add_argument("--image", type=int, default=224)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--base", type=int, default=32)
    p.add_argument("--input", type=int, default=128)
    p.add_argument("--channels", type=int, default=384)
    p.add_argument("--context", action="store_true")
    p.add_argument("--cin", type=int, default=128)
    p.add_argument("--cout", type=int, default=128)
    p.add_argument("--kernel", type=int, default=3)
    p.add_argument("--iters", type=int, default=2)
    p.add_argument("--threads", type=int, default=int(os.environ.get("THREADS", "2")))
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    r = {"vit": vit, "unet": unet, "conv3d": conv3d}[a.what](a)
    r["cpu_seconds"] = CPU["seconds"]
    r["threads"] = a.threads
    print(json.dumps(r))


if __name__ == "__main__":
    main()
