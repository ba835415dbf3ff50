#!/usr/bin/env python3
"""Train the demo models shipped in demo/ (with and without context fusion).

    tools/.venv/bin/python tools/train_demo.py [--volfuse target/release/volfuse] [--out demo]
                                               [--tiles 96] [--steps 1400] [--max-minutes 9] [--force]

The shipped bundles in demo/ were made in two runs on 2 busy cores (39 min + 11 min): 160
training + 16 validation tiles, then the same features (--features) trained further from the
first run's bundles (--init) at a lower learning rate:

    tools/.venv/bin/python tools/train_demo.py --tiles 160 --val 16 --steps 2400 --max-minutes 22 \
        --eval-every 200 --batch 2 --lr 3e-3 --weight-power 0.5 --min-offset 0 --max-offset 1.8 \
        --near-fraction 0.8 --features /tmp/demo_features.npz --out /tmp/demo1 --force
    tools/.venv/bin/python tools/train_demo.py --tiles 160 --val 16 --steps 1000 --max-minutes 15 \
        --eval-every 200 --batch 2 --lr 1.5e-3 --weight-power 0.5 --min-offset 0 --max-offset 1.8 \
        --near-fraction 0.8 --features /tmp/demo_features.npz --init /tmp/demo1 --force

(the first run stopped at its time limit after 1551 steps and the second kept step 800; both
runs keep the state with the best validation mean IoU.)

What it does, all on the CPU (2 worker processes of 1 torch thread each):

1. Generates training volumes with `volfuse synth` (the Rust generator, src/synth.rs), so the
   training data are exactly what `volfuse demo` segments: 32^3 raw tiles, their concentric
   context (4x the extent, same voxel shape) and the truth (0 background, 1 nucleus, 2 pore,
   3 mitochondrion). Tile centres are drawn at a random distance (--min-offset..--max-offset
   radii) from a nucleus centre for --near-fraction of the tiles, anywhere in the scene for the
   rest.
2. Builds a tiny DINOv3-shaped ViT (HF DINOv3ViTModel: patch 4, hidden 32, 2 layers, 2 heads,
   4 registers) with seeded random weights. It stays frozen (random features are enough for the
   UNet to learn from on this data, and freezing it lets the features be computed once).
3. Extracts dinov3_playground's orthogonal-plane features of every raw and context tile once
   (tools/reference_features.py, the code volfuse's parity tests use; slices resized to 64^2,
   so 16x16 tokens per slice), and caches them as float16.
4. Trains two DINOv3UNet3D (tools/reference_unet.py; --base-channels 4, input_size 32^3, 4
   classes) on the cached features: one with context fusion, one without, same data, same
   seed, same steps, batch --batch, AdamW + one-cycle LR (--lr), in parallel (one process
   each). Loss: cross entropy with class weights frequency^-(--weight-power) + soft Dice.
   Both are scored on the held-out tiles every --eval-every steps and the state with the best
   validation mean IoU is kept; --max-minutes stops a run early (the one-cycle schedule is
   then cut short).
5. Scores both on held-out tiles, writes the bundles (volfuse.json, unet.safetensors in
   float16, backbone/) to <out>/with_context and <out>/no_context, and a check volume
   (<out>/../target/demo_check or --check-dir) with the PyTorch logits of both bundles (as
   stored, f16 upcast to f32) so volfuse's output can be compared with them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import DINOv3ViTConfig, DINOv3ViTModel
from transformers.utils import logging as hf_logging

sys.path.insert(0, str(Path(__file__).resolve().parent))
import reference_features as rf  # noqa: E402
from reference_unet import check_state_dict_layout, model_from_config  # noqa: E402

CLASS_NAMES = ["background", "nucleus", "pore", "mitochondrion"]
TILE = 32
SLICE = 64
CONTEXT_RATIO = 4
MEAN = [0.485, 0.456, 0.406]
STD = [0.229, 0.224, 0.225]
SEED = 2024
BASE_CHANNELS = int(os.environ.get("TRAIN_DEMO_BASE_CHANNELS", "4"))  # --base-channels (workers: env)


def vit_config() -> DINOv3ViTConfig:
    return DINOv3ViTConfig(
        patch_size=4,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_register_tokens=4,
        layerscale_value=1.0,
        rope_theta=100.0,
        image_size=SLICE,
        hidden_act="gelu",
        use_gated_mlp=False,
    )


def model_config(context: bool) -> dict:
    return {
        "num_classes": len(CLASS_NAMES),
        "base_channels": BASE_CHANNELS,
        "input_size": [TILE, TILE, TILE],
        "input_channels": 32,
        "model_id": "volfuse-demo/synthetic-em",
        "model_type": "dinov3_unet3d",
        "dinov3_slice_size": SLICE,
        "learn_upsampling": False,
        "use_orthogonal_planes": True,
        "use_half_precision": False,
        "use_gradient_checkpointing": False,
        "min_resolution_for_raw": 8,
        "base_resolution": 8,
        "use_context_fusion": context,
        "context_scale": 8 * CONTEXT_RATIO,
        "output_type": "labels",
        "affinity_offsets": None,
        "lsds_sigma": None,
        "compute_lsds": False,
    }


def synth(volfuse: Path, seed: int, offset: float | None, tmp: Path):
    d = tmp / f"s{seed}"
    cmd = [str(volfuse), "synth", "--seed", str(seed), "--size", str(TILE), str(TILE), str(TILE),
           "--context-ratio", str(CONTEXT_RATIO), "--output-dir", str(d), "--force"]
    if offset is not None:
        cmd += ["--nucleus-offset", f"{offset:.6f}"]
    subprocess.run(cmd, check=True, capture_output=True)
    out = tuple(np.load(d / f) for f in ("raw.npy", "context.npy", "truth.npy"))
    shutil.rmtree(d)
    return out


def vit_patch_tokens(model, pixels: torch.Tensor, autocast: bool = False) -> torch.Tensor:
    """reference_features.vit_patch_tokens with the grid from the ViT's own patch size.

    dinov3_playground (and so tools/reference_features.py) assumes patch 16: it keeps the last
    (S/16)^2 tokens. volfuse uses config.patch_size, which is the same for every shipped
    DINOv3 (patch 16) and right for the demo's patch-4 ViT; with the reference's rule the
    features of a patch-4 ViT would be the last 16 of its 256 patch tokens.
    """
    p = model.config.patch_size
    B, _, Hp, Wp = pixels.shape
    g_h, g_w = Hp // p, Wp // p
    with torch.no_grad():
        hidden = model(pixel_values=pixels).last_hidden_state.float()
    patches = hidden[:, hidden.shape[1] - g_h * g_w:, :]
    return patches.reshape(B, g_h, g_w, -1).permute(3, 0, 1, 2).contiguous()


rf.vit_patch_tokens = vit_patch_tokens  # extract_features_plane looks it up at call time


def features(vol: np.ndarray, vit) -> np.ndarray:
    return rf.extract_dinov3_features_3d(vol, vit, MEAN, STD, (TILE, TILE, TILE), SLICE,
                                         use_orthogonal_planes=True, autocast=False)


def dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    p = logits.softmax(1)
    oh = F.one_hot(target, logits.shape[1]).permute(0, 4, 1, 2, 3).float()
    inter = (p * oh).sum((0, 2, 3, 4))
    den = p.sum((0, 2, 3, 4)) + oh.sum((0, 2, 3, 4))
    return 1 - ((2 * inter + 1) / (den + 1)).mean()


def iou_table(pred: np.ndarray, truth: np.ndarray) -> list:
    out = []
    for k in range(len(CLASS_NAMES)):
        tp = int(((pred == k) & (truth == k)).sum())
        union = int(((pred == k) | (truth == k)).sum())
        out.append(tp / union if union else float("nan"))
    return out


def class_weights(truth: np.ndarray, power: float) -> torch.Tensor:
    """Class frequencies to the power -`power`, normalised to mean 1 (the blobs are rare)."""
    freq = np.bincount(truth.ravel(), minlength=len(CLASS_NAMES)).astype(np.float64) / truth.size
    w = np.maximum(freq, 1e-4) ** -power
    return torch.tensor(w / w.mean(), dtype=torch.float32)


def evaluate(unet, context: bool, val: dict) -> list:
    was = unet.training
    unet.eval()
    preds = np.stack([predict(unet, val["raw"][i], val["context"][i] if context else None).argmax(0).numpy()
                      for i in range(val["raw"].shape[0])])
    unet.train(was)
    return iou_table(preds, val["truth"])


def train(context: bool, data: dict, steps: int, log, val: dict | None = None, eval_every: int = 200,
          max_seconds: float = float("inf"), lr: float = 5e-3, batch: int = 2,
          weight_power: float = 0.5, init: str | None = None) -> tuple:
    """Trains one variant; returns (model with the best validation mean IoU, steps run)."""
    torch.manual_seed(SEED)
    unet = model_from_config(model_config(context))
    if init:
        unet.load_state_dict(load_bundle_unet(Path(init) / ("with_context" if context else "no_context")).state_dict())
    unet.train()
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    n = data["raw"].shape[0]
    weights = class_weights(data["truth"], weight_power)
    rng = np.random.default_rng(SEED)
    t0 = time.time()
    best = (-1.0, None, 0)
    step = 0
    for step in range(steps):
        idx = rng.choice(n, batch, replace=False)
        x = torch.from_numpy(data["raw"][idx].astype(np.float32))
        c = torch.from_numpy(data["context"][idx].astype(np.float32)) if context else None
        y = torch.from_numpy(data["truth"][idx].astype(np.int64))
        logits = unet(x, c)
        loss = F.cross_entropy(logits, y, weight=weights) + dice_loss(logits, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        last = step == steps - 1 or time.time() - t0 > max_seconds
        if step % 50 == 0 or last:
            log(f"  [{'context' if context else 'no context'}] step {step:5d} loss {loss.item():.4f} "
                f"({time.time() - t0:.0f} s)")
        if val is not None and ((step + 1) % eval_every == 0 or last):
            iou = evaluate(unet, context, val)
            m = float(np.nanmean(iou))
            log(f"  [{'context' if context else 'no context'}] step {step + 1} validation IoU "
                + " ".join(f"{v:.3f}" for v in iou) + f" mean {m:.3f}")
            if m > best[0]:
                best = (m, {k: v.detach().clone() for k, v in unet.state_dict().items()}, step + 1)
        if last:
            break
    if best[1] is not None:
        unet.load_state_dict(best[1])
        log(f"  [{'context' if context else 'no context'}] keeping step {best[2]} (validation mean IoU {best[0]:.3f})")
    unet.eval()
    return unet, best[2] or step + 1


def predict(unet, f: np.ndarray, c: np.ndarray | None) -> torch.Tensor:
    with torch.no_grad():
        x = torch.from_numpy(f.astype(np.float32))[None]
        cc = torch.from_numpy(c.astype(np.float32))[None] if c is not None else None
        return unet(x, cc)[0]


def write_bundle(out: Path, unet, context: bool, vit_dir: Path, info: dict) -> None:
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    tensors = {k: (v.detach().half() if v.is_floating_point() else v.detach()).contiguous()
               for k, v in unet.state_dict().items()}
    save_file(tensors, str(out / "unet.safetensors"), metadata={"format": "pt"})
    shutil.copytree(vit_dir, out / "backbone")
    meta = {
        "format": "volfuse-model/1",
        "model_config": model_config(context),
        "training_config": {
            "target_volume_size": [TILE] * 3,
            "image_size": SLICE,
            "use_anyup": False,
            "dinov3_stride": None,
            "use_orthogonal_planes": True,
            "class_names": CLASS_NAMES,
            "seed": SEED,
            "loss_type": "ce_dice",
            "optimizer": "adamw",
            "trained_by": "tools/train_demo.py",
            **info,
        },
        "backbone": "backbone",
        "image_mean": MEAN,
        "image_std": STD,
    }
    (out / "volfuse.json").write_text(json.dumps(meta, indent=2) + "\n")


def load_bundle_unet(out: Path):
    meta = json.loads((out / "volfuse.json").read_text())
    sd = load_file(str(out / "unet.safetensors"))
    sd = {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}
    unet = model_from_config(meta["model_config"], sd.keys())
    unet.load_state_dict(sd)
    check_state_dict_layout(unet)
    return unet.eval()


def tile_job(job):
    """One training tile: synth + features (run in a worker process)."""
    volfuse, seed, offset, tmp, vit_dir = job
    torch.set_num_threads(1)
    vit = DINOv3ViTModel.from_pretrained(vit_dir, dtype=torch.float32).eval()
    raw, ctx, truth = synth(Path(volfuse), seed, offset, Path(tmp))
    with torch.no_grad():
        fr = features(raw, vit).astype(np.float16)
        fc = features(ctx, vit).astype(np.float16)
    return fr, fc, truth, raw, ctx


def train_job(job):
    """Trains one variant in a worker process; returns its state dict, time and steps."""
    context, cache, steps, opts = job
    torch.set_num_threads(1)
    d = np.load(cache)
    tr = {k: d[k] for k in ("raw", "context", "truth")}
    va = {k: d["val_" + k] for k in ("raw", "context", "truth")}
    t0 = time.time()
    unet, done = train(context, tr, steps, lambda m: print(m, flush=True), val=va, **opts)
    return {k: v.clone() for k, v in unet.state_dict().items()}, time.time() - t0, done


def main() -> int:
    hf_logging.disable_progress_bar()
    root = Path(__file__).resolve().parent.parent
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--volfuse", type=Path, default=root / "target" / "release" / "volfuse")
    ap.add_argument("--out", type=Path, default=root / "demo")
    ap.add_argument("--check-dir", type=Path, default=root / "target" / "demo_check")
    ap.add_argument("--tiles", type=int, default=64)
    ap.add_argument("--val", type=int, default=8)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--eval-every", type=int, default=200)
    ap.add_argument("--max-minutes", type=float, default=float("inf"),
                    help="stop training after this long (the best validated state is kept)")
    ap.add_argument("--base-channels", type=int, default=4)
    ap.add_argument("--weight-power", type=float, default=0.5,
                    help="cross-entropy class weights: frequency ** -power")
    ap.add_argument("--min-offset", type=float, default=0.0,
                    help="tile centres at min-offset..max-offset nucleus radii from a nucleus centre")
    ap.add_argument("--max-offset", type=float, default=1.5)
    ap.add_argument("--near-fraction", type=float, default=0.85,
                    help="fraction of the tiles placed relative to a nucleus (the rest anywhere)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--features", type=Path, default=None,
                    help="feature cache (.npz): reused if it exists (same --tiles/--val/offsets), written otherwise")
    ap.add_argument("--init", type=Path, default=None,
                    help="start from the UNets of these bundles (DIR/with_context, DIR/no_context)")
    ap.add_argument("--force", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    global BASE_CHANNELS
    BASE_CHANNELS = args.base_channels
    os.environ["TRAIN_DEMO_BASE_CHANNELS"] = str(args.base_channels)
    torch.manual_seed(SEED)
    if not args.volfuse.is_file():
        print(f"{args.volfuse} not found: build it with `cargo build --release` or pass --volfuse", file=sys.stderr)
        return 2
    for v in ("with_context", "no_context"):
        if (args.out / v).exists() and not args.force:
            print(f"{args.out / v} exists; pass --force to replace it", file=sys.stderr)
            return 2
    t_start = time.time()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        vit_dir = tmp / "backbone"
        vit = DINOv3ViTModel(vit_config()).eval()
        vit.save_pretrained(vit_dir, safe_serialization=True)
        vit = DINOv3ViTModel.from_pretrained(vit_dir, dtype=torch.float32).eval()

        import multiprocessing as mp
        ctxmp = mp.get_context("spawn")
        rng = np.random.default_rng(SEED)
        n = args.tiles + args.val
        jobs = []
        for i in range(n):
            offset = (float(rng.uniform(args.min_offset, args.max_offset))
                      if rng.uniform() < args.near_fraction else None)
            jobs.append((str(args.volfuse), 10_000 + i, offset, str(tmp), str(vit_dir)))
        t0 = time.time()
        cache = tmp / "train.npz"
        if args.features is not None and args.features.is_file():
            d = np.load(args.features)
            tr = {k: d[k] for k in ("raw", "context", "truth")}
            va = {k: d["val_" + k] for k in ("raw", "context", "truth")}
            if tr["raw"].shape[0] != args.tiles or va["raw"].shape[0] != args.val:
                print(f"{args.features} holds {tr['raw'].shape[0]}+{va['raw'].shape[0]} tiles, "
                      f"not --tiles {args.tiles} --val {args.val}", file=sys.stderr)
                return 2
            _, _, _, rv, cv = tile_job(jobs[args.tiles])  # the check volume's raw and context
            va["raw_vol"], va["ctx_vol"] = rv[None], cv[None]
            shutil.copy(args.features, cache)
            print(f"features from {args.features}", flush=True)
        else:
            with ctxmp.Pool(args.workers) as pool:
                out = []
                for i, r in enumerate(pool.imap(tile_job, jobs)):
                    out.append(r)
                    if i % 10 == 0:
                        print(f"tiles {i + 1}/{n} ({time.time() - t0:.0f} s)", flush=True)
            t_feat = time.time() - t0
            arr = {k: np.stack([o[j] for o in out]) for j, k in enumerate(("raw", "context", "truth", "raw_vol", "ctx_vol"))}
            tr = {k: v[: args.tiles] for k, v in arr.items()}
            va = {k: v[args.tiles:] for k, v in arr.items()}
            print(f"{n} tiles in {t_feat:.0f} s", flush=True)
            np.savez(cache, raw=tr["raw"], context=tr["context"], truth=tr["truth"],
                     val_raw=va["raw"], val_context=va["context"], val_truth=va["truth"])
            if args.features is not None:
                shutil.copy(cache, args.features)
        frac = np.bincount(tr["truth"].ravel(), minlength=4) / tr["truth"].size
        print(f"class fractions {np.round(frac, 4).tolist()}", flush=True)

        results = {}
        models = {}
        t0 = time.time()
        with ctxmp.Pool(2) as pool:
            opts = dict(max_seconds=args.max_minutes * 60, lr=args.lr, batch=args.batch, eval_every=args.eval_every,
                        weight_power=args.weight_power, init=str(args.init) if args.init else None)
            trained = pool.map(train_job, [(False, str(cache), args.steps, opts), (True, str(cache), args.steps, opts)])
        print(f"both variants trained in {time.time() - t0:.0f} s (in parallel)", flush=True)
        for context, (sd, secs, done) in zip((False, True), trained):
            unet = model_from_config(model_config(context))
            unet.load_state_dict(sd)
            unet.eval()
            preds = np.stack([predict(unet, va["raw"][i], va["context"][i] if context else None).argmax(0).numpy()
                              for i in range(args.val)])
            iou = iou_table(preds, va["truth"])
            name = "with_context" if context else "no_context"
            results[name] = dict(iou=iou, seconds=secs, steps=done)
            models[name] = (unet, context)
            print(f"{name}: trained in {secs:.0f} s; validation IoU "
                  + ", ".join(f"{c} {v:.3f}" for c, v in zip(CLASS_NAMES, iou))
                  + f"; mean {np.nanmean(iou):.3f}", flush=True)

        args.out.mkdir(parents=True, exist_ok=True)
        for name, (unet, context) in models.items():
            info = {"steps": results[name]["steps"], "batch": args.batch, "max_lr": args.lr,
                    "class_weight_power": args.weight_power, "min_offset": args.min_offset, "max_offset": args.max_offset,
                    "near_fraction": args.near_fraction, "init": str(args.init) if args.init else None, "base_channels": args.base_channels, "train_tiles": args.tiles, "validation_tiles": args.val,
                    "validation_iou": [round(v, 4) for v in results[name]["iou"]],
                    "train_seconds": round(results[name]["seconds"], 1)}
            write_bundle(args.out / name, unet, context, vit_dir, info)

        # Check data: one held-out tile through the stored bundles (f16 weights upcast).
        args.check_dir.mkdir(parents=True, exist_ok=True)
        np.save(args.check_dir / "raw.npy", va["raw_vol"][0])
        np.save(args.check_dir / "context.npy", va["ctx_vol"][0])
        np.save(args.check_dir / "truth.npy", va["truth"][0])
        for name, (_, context) in models.items():
            unet = load_bundle_unet(args.out / name)
            f = features(va["raw_vol"][0], vit)
            c = features(va["ctx_vol"][0], vit) if context else None
            logits = predict(unet, f, c)
            np.save(args.check_dir / f"{name}_logits.npy", logits.numpy().astype(np.float32))
            np.save(args.check_dir / f"{name}_labels.npy", logits.argmax(0).numpy().astype(np.uint8))
        size = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
        print(f"wrote {args.out}/with_context and no_context ({size / 1e6:.2f} MB), check data in "
              f"{args.check_dir}; total {time.time() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
