#!/usr/bin/env python3
"""Build the tiny DINOv3UNet3D fixtures and the tiny model bundle of volfuse.

Writes (relative to the repository root):

  tests/fixtures/unet_ctx/          context fusion on: weights, config, features, context,
                                    logits, gates_1..4, logits_nocontext
  tests/fixtures/unet_noctx/        no fusion, non-cubic input (16 x 32 x 16)
  tests/fixtures/unet_upsample/     learned upsampling (1 ConvTranspose3d stage), 32 x 16 x 16
  tests/fixtures/bundle_tiny_ctx/   a volfuse-model/1 bundle made by convert_checkpoint.py from a
                                    fake dinov3_playground export (unet_ctx's weights with 64
                                    input channels) and the tiny ViT tests/fixtures/vit_gelu

Everything is seeded and single-threaded, so a rerun gives identical files. Every saved output
is checked against an independent float64 NumPy forward written from
shared/reference/dinov3_playground.md (`numpy_forward`) and against the model run in float64.
See tools/README.md.

Usage:  tools/.venv/bin/python tools/make_unet_fixtures.py [--out tests/fixtures] [--check]
  --check  build everything in a temporary folder and compare it byte for byte with --out
"""

from __future__ import annotations

import argparse
import filecmp
import itertools
import json
import math
import pickle
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from safetensors.torch import load_file as load_safetensors
from safetensors.torch import save_file as save_safetensors

sys.path.insert(0, str(Path(__file__).resolve().parent))
import convert_checkpoint  # noqa: E402
from reference_unet import DINOv3UNet3D, check_state_dict_layout, model_from_config  # noqa: E402

# dinov3_playground model_config keys (reference §f). Values not relevant to the UNet forward
# (resolutions, flags) are plausible examples; affinity_offsets/lsds_sigma are only meaningful
# for the affinity outputs.
BASE_CONFIG = dict(
    num_classes=3,
    base_channels=4,
    input_size=[16, 16, 16],
    input_channels=16,
    model_id="volfuse-fixtures/random-features",
    model_type="dinov3_unet3d",
    dinov3_slice_size=64,
    learn_upsampling=False,
    use_orthogonal_planes=True,
    use_half_precision=False,
    use_gradient_checkpointing=True,
    min_resolution_for_raw=4,
    base_resolution=16,
    use_context_fusion=False,
    context_scale=None,
    output_type="labels",
    affinity_offsets=None,
    lsds_sigma=None,
    compute_lsds=False,
)

FIXTURES = {
    # C = 4 is the smallest base_channels with fusion (level 1 has C/4 = 1 bottleneck channel).
    "unet_ctx": dict(
        seed=3003,
        config=dict(use_context_fusion=True, context_scale=64),
    ),
    # Non-cubic (d, h, w) = (16, 32, 16); C = 2 and Cd = 8 keep the weights small, K = 2.
    "unet_noctx": dict(
        seed=4004,
        config=dict(num_classes=2, base_channels=2, input_channels=8, input_size=[16, 32, 16],
                    dinov3_slice_size=32),
    ),
    # Learned upsampling: feat = (input_size[0], S//16, S//16) = (32, 8.0, 8.0) with S = 128.0
    # (a float, as in some real configs), so the factors are (1, 2, 2): one ConvTranspose3d stage.
    # Features still arrive at input_size (32, 16, 16): up to (64, 32, 32), then resized back.
    "unet_upsample": dict(
        seed=5005,
        config=dict(num_classes=3, base_channels=2, input_channels=8, input_size=[32, 16, 16],
                    dinov3_slice_size=128.0, learn_upsampling=True, output_type="affinities",
                    affinity_offsets=[[1, 0, 0], [0, 1, 0], [0, 0, 1]]),
    ),
}

# The bundle: unet_ctx's weights, but 64 input channels (= vit_gelu's hidden_size) so that the
# bundle is runnable end to end; only input_conv and context_input_conv differ from unet_ctx.
BUNDLE = dict(
    name="bundle_tiny_ctx",
    source="unet_ctx",
    backbone="vit_gelu",
    seed=6006,
    input_channels=64,
    model_id="volfuse-fixtures/vit_gelu",
    dtype="f16",
    run="run_20250102_030405",
)
BUNDLE_TRAINING_CONFIG = dict(
    target_volume_size=(16, 16, 16),  # a tuple, as in the original pickles
    image_size=64,
    use_anyup=False,
    dinov3_stride=None,
    use_orthogonal_planes=True,
    class_names=["background", "mito", "er"],
    seed=42,
    learning_rate=np.float32(1e-4),  # numpy scalars occur in real pickles; JSON needs plain floats
    epochs=np.int64(20),
    batch_size=1,
    loss_type="focal_dice",
    optimizer="adamw",
)

# Scale of context_fusion*.context_proj.3 weights after the fan-in init: sigmoid inputs get a
# standard deviation of a few units, so the gates spread over (0, 1) instead of sitting at 0.5.
GATE_SCALE = 3.0
NUM_BATCHES_TRACKED = 1234


def fixture_config(name: str) -> dict:
    return {**BASE_CONFIG, **FIXTURES[name]["config"]}


def init_weights(model: nn.Module, seed: int) -> None:
    """Deterministic, deliberately non-trivial weights (BN folding or order mistakes show).

    Conv/ConvTranspose weights ~ N(0, 2/fan_in) (He: the ReLUs halve the variance, and eval-mode
    BN does not renormalise, so this keeps every activation O(1)); biases ~ 0.1 N(0,1);
    BN weight ~ 1 + 0.2 N, bias ~ 0.1 N, running_mean ~ 0.2 N, running_var ~ U(0.5, 1.5).
    """
    gen = torch.Generator().manual_seed(seed)

    def normal(shape, std=1.0):
        return torch.randn(shape, generator=gen, dtype=torch.float32) * std

    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, nn.ConvTranspose3d):
                # weight (in, out, 4, 4, 4), stride 2: each output sums in * 2^3 taps
                fan_in = m.weight.shape[0] * 8
                m.weight.copy_(normal(m.weight.shape, math.sqrt(2.0 / fan_in)))
                m.bias.copy_(normal(m.bias.shape, 0.1))
            elif isinstance(m, nn.Conv3d):
                fan_in = m.weight[0].numel()
                w = normal(m.weight.shape, math.sqrt(2.0 / fan_in))
                if name.endswith("context_proj.3"):
                    w = w * GATE_SCALE
                m.weight.copy_(w)
                m.bias.copy_(normal(m.bias.shape, 0.1))
            elif isinstance(m, nn.BatchNorm3d):
                m.weight.copy_(1.0 + normal(m.weight.shape, 0.2))
                m.bias.copy_(normal(m.bias.shape, 0.1))
                m.running_mean.copy_(normal(m.running_mean.shape, 0.2))
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
                m.num_batches_tracked.fill_(NUM_BATCHES_TRACKED)
            elif list(m.parameters(recurse=False)):
                raise RuntimeError(f"module {name} ({type(m).__name__}) not handled")


def build_model(config: dict, seed: int) -> DINOv3UNet3D:
    torch.manual_seed(seed)
    model = model_from_config(config)
    init_weights(model, seed + 1)
    model.eval()
    return model


def center_final_bias(model: DINOv3UNet3D, features: np.ndarray, context: np.ndarray | None, seed: int) -> None:
    """final_conv.bias := -(per-class mean logit) + 0.1 N(0,1), so that argmax labels are mixed."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.final_conv.bias.zero_()
        y, _ = run(model, features, context)
        bias = -y.mean(dim=(0, 2, 3, 4)) + torch.randn(y.shape[1], generator=gen) * 0.1
        model.final_conv.bias.copy_(bias)


def make_inputs(config: dict, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    shape = (1, config["input_channels"], *config["input_size"])
    inputs = {"features": rng.standard_normal(shape).astype(np.float32)}
    if config["use_context_fusion"]:
        inputs["context"] = rng.standard_normal(shape).astype(np.float32)
    return inputs


def run(model: nn.Module, features: np.ndarray, context: np.ndarray | None, dtype=torch.float32):
    with torch.no_grad():
        x = torch.from_numpy(features).to(dtype)
        c = torch.from_numpy(context).to(dtype) if context is not None else None
        y, extras = model(x, c, return_intermediates=True)
    return y, extras


def to_f32(t: torch.Tensor) -> np.ndarray:
    assert t.dtype == torch.float32
    return np.ascontiguousarray(t.numpy()).astype(np.float32)


def save_npy(path: Path, arr: np.ndarray) -> None:
    np.save(path, arr, allow_pickle=False)


def save_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def state_dict_for_file(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------------------------
# Independent float64 NumPy forward, from the reference text only (config + safetensors).


def _conv(x, w, b):
    """Cross-correlation, stride 1, zero padding k//2. x (Cin,D,H,W), w (Cout,Cin,k,k,k)."""
    k = w.shape[2]
    p = k // 2
    D, H, W = x.shape[1:]
    xp = np.pad(x, ((0, 0), (p, p), (p, p), (p, p)))
    out = np.zeros((w.shape[0], D, H, W))
    for a, bb, c in itertools.product(range(k), repeat=3):
        out += np.tensordot(w[:, :, a, bb, c], xp[:, a : a + D, bb : bb + H, c : c + W], axes=(1, 0))
    return out + b[:, None, None, None]


def _conv_transpose(x, w, b):
    """ConvTranspose3d k4 s2 p1, w (in,out,4,4,4): out[2i-1+k] += in[i] * w[k] on every axis."""
    _, D, H, W = x.shape
    full = np.zeros((w.shape[1], 2 * D + 2, 2 * H + 2, 2 * W + 2))  # index 2i+k = out index + 1
    for a, bb, c in itertools.product(range(4), repeat=3):
        full[:, a : a + 2 * D : 2, bb : bb + 2 * H : 2, c : c + 2 * W : 2] += np.tensordot(
            w[:, :, a, bb, c], x, axes=(0, 0)
        )
    return full[:, 1 : 2 * D + 1, 1 : 2 * H + 1, 1 : 2 * W + 1] + b[:, None, None, None]


def _bn(x, W, p):
    s = (slice(None), None, None, None)
    return (x - W[p + ".running_mean"][s]) / np.sqrt(W[p + ".running_var"][s] + 1e-5) * W[
        p + ".weight"
    ][s] + W[p + ".bias"][s]


def _relu(x):
    return np.maximum(x, 0.0)


def _pool(x, op):
    C, D, H, W = x.shape
    r = x[:, : D // 2 * 2, : H // 2 * 2, : W // 2 * 2].reshape(C, D // 2, 2, H // 2, 2, W // 2, 2)
    return op(r, axis=(2, 4, 6))


def _up2(x):
    """scale_factor 2, trilinear, align_corners False: out[2k] = x[k-1]/4 + 3x[k]/4,
    out[2k+1] = 3x[k]/4 + x[k+1]/4, with edges clamped."""
    for ax in (1, 2, 3):
        t = np.moveaxis(x, ax, 0)
        prev = np.concatenate([t[:1], t[:-1]])
        nxt = np.concatenate([t[1:], t[-1:]])
        out = np.empty((2 * t.shape[0],) + t.shape[1:])
        out[0::2] = 0.25 * prev + 0.75 * t
        out[1::2] = 0.75 * t + 0.25 * nxt
        x = np.moveaxis(out, 0, ax)
    return x


def _resize(x, size):
    """Trilinear resize to size, align_corners False: src = (o+0.5) n/m - 0.5, clamped at 0."""
    for ax, m in zip((1, 2, 3), size):
        t = np.moveaxis(x, ax, 0)
        n = t.shape[0]
        if n != m:
            src = np.maximum((np.arange(m) + 0.5) * n / m - 0.5, 0.0)
            i0 = np.floor(src).astype(int)
            i1 = np.minimum(i0 + 1, n - 1)
            w1 = (src - i0).reshape((m,) + (1,) * (t.ndim - 1))
            t = (1 - w1) * t[i0] + w1 * t[i1]
        x = np.moveaxis(t, 0, ax)
    return x


def numpy_forward(folder: Path, features: np.ndarray, context: np.ndarray | None):
    """Logits (1,K,d,h,w) and gates {k: (1,Ck,...)} in float64, from the files of a fixture."""
    cfg = json.loads((folder / "model_config.json").read_text())
    W = {k: v.double().numpy() for k, v in load_safetensors(str(folder / "unet.safetensors")).items()}
    size = tuple(cfg["input_size"])

    def block(x, p):
        x = _relu(_bn(_conv(x, W[p + ".0.weight"], W[p + ".0.bias"]), W, p + ".1"))
        return _relu(_bn(_conv(x, W[p + ".3.weight"], W[p + ".3.bias"]), W, p + ".4"))

    def conv1(x, p):
        return _conv(x, W[p + ".weight"], W[p + ".bias"])

    stages = sum(1 for k in W if k.startswith("learned_upsample.") and k.endswith(".weight") and W[k].ndim == 5 and W[k].shape[2] == 4)

    def learned_upsample(x):
        for s in range(stages):
            p = f"learned_upsample.{3 * s}"
            x = _relu(_bn(_conv_transpose(x, W[p + ".weight"], W[p + ".bias"]), W, f"learned_upsample.{3 * s + 1}"))
        x = conv1(x, f"learned_upsample.{3 * stages}")
        return _resize(x, size)

    x = conv1(features[0].astype(np.float64), "input_conv")
    if stages:
        x = learned_upsample(x)
    skips = []
    for k in range(1, 5):
        x = block(x, f"enc{k}")
        skips.append(x)
        x = _pool(x, np.max)
    x = block(x, "bottleneck")
    gates = {}
    if cfg["use_context_fusion"] and context is not None:
        c = conv1(context[0].astype(np.float64), "context_input_conv")
        if stages:
            c = learned_upsample(c)
        for k in range(1, 5):
            ck = conv1(c, f"context_proj{k}")
            p = f"context_fusion{k}"
            a = _relu(_bn(conv1(ck, p + ".context_proj.0"), W, p + ".context_proj.1"))
            gate = 1.0 / (1.0 + np.exp(-conv1(a, p + ".context_proj.3")))
            skips[k - 1] = skips[k - 1] + conv1(skips[k - 1], p + ".raw_proj") * gate
            gates[k] = gate[None]
            c = _pool(c, np.mean)
    for k in range(4, 0, -1):
        x = block(np.concatenate([_up2(x), skips[k - 1]]), f"dec{k}")
    return conv1(x, "final_conv")[None], gates


# ---------------------------------------------------------------------------------------------


def write_unet_fixture(out: Path, name: str, log) -> DINOv3UNet3D:
    spec = FIXTURES[name]
    config = fixture_config(name)
    model = build_model(config, spec["seed"])
    n_keys = check_state_dict_layout(model)
    inputs = make_inputs(config, spec["seed"] + 7)
    center_final_bias(model, inputs["features"], inputs.get("context"), spec["seed"] + 2)
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    save_safetensors(state_dict_for_file(model), str(folder / "unet.safetensors"), metadata={"format": "pt"})
    save_json(folder / "model_config.json", config)

    for key, arr in inputs.items():
        save_npy(folder / f"{key}.npy", arr)
    ctx = inputs.get("context")
    y, extras = run(model, inputs["features"], ctx)
    save_npy(folder / "logits.npy", to_f32(y))
    files = {"logits": y}
    if ctx is not None:
        for k in range(1, 5):
            save_npy(folder / f"gates_{k}.npy", to_f32(extras[f"gate_{k}"]))
        y0, _ = run(model, inputs["features"], None)
        save_npy(folder / "logits_nocontext.npy", to_f32(y0))
        files["logits_nocontext"] = y0
    if "upsampled" in extras:
        save_npy(folder / "upsampled.npy", to_f32(extras["upsampled"]))

    labels = y[0].argmax(0)
    fractions = [float((labels == k).float().mean()) for k in range(y.shape[1])]
    top2 = y[0].topk(2, dim=0).values
    gap = top2[0] - top2[1]
    log(
        f"{name}: {n_keys} state_dict entries, learned upsampling stages {model.upsample_stages}, "
        f"features {inputs['features'].shape} -> logits {tuple(y.shape)}, logits std {y.std():.2f}, "
        f"argmax class fractions {[round(f, 2) for f in fractions]}, "
        f"top-2 logit gap min {float(gap.min()):.1e} ({int((gap < 1e-4).sum())} voxels < 1e-4)"
    )
    if ctx is not None:
        y0 = files["logits_nocontext"]
        log(f"  context changes the logits by {100 * float((y - y0).abs().max() / y.abs().max()):.0f}% (max rel.)")
        for k in range(1, 5):
            g = extras[f"gate_{k}"]
            log(
                f"  gate_{k} {tuple(g.shape)}: mean {g.mean():.2f}, std {g.std():.2f}, "
                f"{100 * float(((g > 0.1) & (g < 0.9)).float().mean()):.0f}% in (0.1, 0.9)"
            )
    return model


def verify_fixture(out: Path, name: str, log) -> None:
    """Saved outputs vs (1) the torch model in float64 and (2) the independent NumPy forward."""
    folder = out / name
    config = json.loads((folder / "model_config.json").read_text())
    sd = load_safetensors(str(folder / "unet.safetensors"))
    model = model_from_config(config, sd.keys())
    model.load_state_dict(sd)
    model.eval().double()
    features = np.load(folder / "features.npy")
    ctx = np.load(folder / "context.npy") if (folder / "context.npy").exists() else None
    cases = [("logits", ctx)] + ([("logits_nocontext", None)] if ctx is not None else [])
    for fname, c in cases:
        saved = np.load(folder / f"{fname}.npy")
        y64, extras = run(model, features, c, torch.float64)
        y64 = y64.numpy()
        ynp, gates = numpy_forward(folder, features, c)
        scale = np.abs(y64).max()
        e32 = float(np.abs(saved - y64).max() / scale)
        enp = float(np.abs(ynp - y64).max() / scale)
        log(f"{name}/{fname}: fp32 vs float64 torch {e32:.1e}, NumPy float64 vs float64 torch {enp:.1e} (rel. to max |logit|)")
        if e32 > 1e-5 or enp > 1e-10:
            raise RuntimeError(f"{name}/{fname}: self-check failed ({e32}, {enp})")
        for k, g in gates.items():
            eg = float(np.abs(np.load(folder / f"gates_{k}.npy") - g).max())
            if eg > 1e-5:
                raise RuntimeError(f"{name}: gates_{k} disagree with the NumPy forward ({eg})")
    if (folder / "upsampled.npy").exists():
        up = extras["upsampled"].numpy()
        eu = float(np.abs(np.load(folder / "upsampled.npy") - up).max() / np.abs(up).max())
        if eu > 1e-5:
            raise RuntimeError(f"{name}: upsampled.npy disagrees with float64 ({eu})")


def write_bundle(out: Path, log) -> None:
    """A fake dinov3_playground export of unet_ctx (with 64 input channels), converted."""
    name = BUNDLE["name"]
    config = {**fixture_config(BUNDLE["source"]), "input_channels": BUNDLE["input_channels"], "model_id": BUNDLE["model_id"]}
    sd = load_safetensors(str(out / BUNDLE["source"] / "unet.safetensors"))
    gen = torch.Generator().manual_seed(BUNDLE["seed"])
    for key in ("input_conv.weight", "context_input_conv.weight"):
        shape = (sd[key].shape[0], BUNDLE["input_channels"], 1, 1, 1)
        sd[key] = torch.randn(shape, generator=gen) * math.sqrt(2.0 / BUNDLE["input_channels"])
    model = model_from_config(config)
    model.load_state_dict(sd)  # strict: the layout is the original one
    checkpoint = {
        "epoch": 17,
        "train_losses": [0.9, 0.5],
        "val_losses": [0.8, 0.6],
        "training_config": BUNDLE_TRAINING_CONFIG,
        "model_config": {**config, "input_size": tuple(config["input_size"])},
        "unet3d_state_dict": model.state_dict(),
        "optimizer_state_dict": {},
        "scheduler_state_dict": None,
    }
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "export" / "dinov3_unet3d_vit_gelu" / BUNDLE["run"]
        run_dir.mkdir(parents=True)
        with open(run_dir / "best.pkl", "wb") as f:
            pickle.dump(checkpoint, f)
        info = convert_checkpoint.convert(
            run_dir.parent, out / BUNDLE["backbone"], out / name, dtype=BUNDLE["dtype"], force=True, log=lambda *_: None
        )
    log(
        f"{name}: converted {Path(info['checkpoint']).name} of {BUNDLE['run']} with backbone "
        f"{BUNDLE['backbone']}, {info['num_tensors']} tensors, UNet stored as {BUNDLE['dtype']}"
    )


def build(out: Path, log) -> None:
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    for name in FIXTURES:
        write_unet_fixture(out, name, log)
    for name in FIXTURES:
        verify_fixture(out, name, log)
    write_bundle(out, log)


OUTPUTS = [*FIXTURES, BUNDLE["name"]]


def folder_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    root = Path(__file__).resolve().parent.parent
    parser.add_argument("--out", type=Path, default=root / "tests" / "fixtures")
    parser.add_argument("--check", action="store_true", help="rebuild in a temp dir and compare with --out")
    args = parser.parse_args()

    if not args.check:
        for name in OUTPUTS:
            shutil.rmtree(args.out / name, ignore_errors=True)
        build(args.out, print)
        for name in OUTPUTS:
            size = sum(p.stat().st_size for p in folder_files(args.out / name))
            print(f"{name}: {size} bytes")
        total = sum(p.stat().st_size for n in OUTPUTS for p in folder_files(args.out / n))
        print(f"total {total} bytes in {args.out}")
        return 0

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # The bundle copies the ViT fixture: take it from --out.
        shutil.copytree(args.out / BUNDLE["backbone"], tmp / BUNDLE["backbone"])
        build(tmp, lambda *_: None)
        bad = []
        for name in OUTPUTS:
            fresh = {p.relative_to(tmp / name) for p in folder_files(tmp / name)}
            have = {p.relative_to(args.out / name) for p in folder_files(args.out / name)} if (args.out / name).exists() else set()
            bad += [f"{name}/{p} (missing)" for p in sorted(fresh - have)]
            bad += [f"{name}/{p} (not built)" for p in sorted(have - fresh)]
            bad += [
                f"{name}/{p}"
                for p in sorted(fresh & have)
                if not filecmp.cmp(tmp / name / p, args.out / name / p, shallow=False)
            ]
        if bad:
            print("differs from a fresh build:", *bad, sep="\n  ")
            return 1
        print("fixtures are up to date")
        return 0


if __name__ == "__main__":
    sys.exit(main())
