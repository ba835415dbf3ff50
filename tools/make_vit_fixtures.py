#!/usr/bin/env python3
"""Build the tiny DINOv3 ViT and .npy test fixtures of volfuse.

Writes (relative to the repository root):

  tests/fixtures/vit_gelu/        fp32 weights, GELU MLP, inputs, outputs, layer-0 intermediates
  tests/fixtures/vit_swiglu/      fp32 weights, gated SiLU MLP (SwiGLU), same set of files
  tests/fixtures/vit_gelu_f16/    vit_gelu cast to float16 on disk, outputs of the upcast model
  tests/fixtures/vit_gelu_bf16/   vit_gelu cast to bfloat16 on disk, outputs of the upcast model
  tests/fixtures/npy/             small arrays written by numpy (every dtype, header v1/v2/v3,
                                  and the bad cases volfuse must reject)

The f16/bf16 folders hold no inputs of their own: they use ../vit_gelu/input_*.npy.

Everything is seeded and single-threaded, so a rerun gives identical files. See tools/README.md.

Usage:  tools/.venv/bin/python tools/make_vit_fixtures.py [--out tests/fixtures] [--check]
  --check  build everything in a temporary folder and compare it byte for byte with --out
"""

from __future__ import annotations

import argparse
import copy
import filecmp
import json
import math
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file as load_safetensors
from transformers import DINOv3ViTConfig, DINOv3ViTModel
from transformers.utils import logging as hf_logging

# Pixel inputs: name -> (batch, height, width). 48x32 is H x W (3 x 2 patches), non-square
# on purpose so that a swapped y/x in RoPE or in token order shows up.
INPUTS = {"32x32": (2, 32, 32), "48x32": (1, 48, 32)}

# Fixture models. Only the fields listed here differ from DINOv3ViTConfig's defaults.
MODELS = {
    "vit_gelu": dict(
        seed=1001,
        config=dict(
            hidden_size=64,
            num_attention_heads=4,
            num_hidden_layers=2,
            intermediate_size=256,
            num_register_tokens=4,
            patch_size=16,
            hidden_act="gelu",
            use_gated_mlp=False,
        ),
    ),
    "vit_swiglu": dict(
        seed=2002,
        config=dict(
            hidden_size=64,
            num_attention_heads=4,
            num_hidden_layers=2,
            # int(6 * 64 * 2 / 3) = 256 would be the S+ rule; 176 = int(4 * 64 * 2 / 3)
            # rounded up to a multiple of 8, so F is not a power of two.
            intermediate_size=176,
            num_register_tokens=4,
            patch_size=16,
            hidden_act="silu",
            use_gated_mlp=True,
        ),
    ),
}

# Low-precision copies of an fp32 fixture model: folder -> (source model, torch dtype).
LOW_PRECISION = {
    "vit_gelu_f16": ("vit_gelu", torch.float16),
    "vit_gelu_bf16": ("vit_gelu", torch.bfloat16),
}

# Scale applied to the q/k projection weights after the fan-in init below, so that
# attention logits have a standard deviation of a few units (attention far from uniform).
QK_SCALE = 1.6


def build_model(name: str, spec: dict) -> DINOv3ViTModel:
    """A DINOv3ViTModel with random, deliberately non-trivial weights, in eval mode."""
    torch.manual_seed(spec["seed"])
    config = DINOv3ViTConfig(**spec["config"])
    # The "eager" attention is the plain softmax(q k^T) v; fp32 SDPA computes the same.
    config._attn_implementation = "eager"
    model = DINOv3ViTModel(config)
    # A fresh model is in training mode, where RoPE coordinates are augmented at random.
    model.eval()

    gen = torch.Generator().manual_seed(spec["seed"] + 1)

    def normal(shape, std=1.0):
        return torch.randn(shape, generator=gen, dtype=torch.float32) * std

    with torch.no_grad():
        for pname, p in model.named_parameters():
            leaf = pname.rsplit(".", 1)[-1]
            module = pname.rsplit(".", 1)[0]
            if pname.endswith("lambda1"):
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)  # U(0.5, 1.5)
            elif ("norm" in module.rsplit(".", 1)[-1]) and leaf == "weight":
                p.copy_(1.0 + normal(p.shape, 0.2))
            elif leaf == "bias":
                p.copy_(normal(p.shape, 0.1))
            elif leaf == "weight":
                # Linear (out, in) and Conv2d (out, in, kh, kw): std 1/sqrt(fan_in) keeps every
                # activation O(1), so GELU/SiLU work in their non-linear range.
                fan_in = p[0].numel()
                w = normal(p.shape, 1.0 / math.sqrt(fan_in))
                if module.endswith("q_proj") or module.endswith("k_proj"):
                    w = w * QK_SCALE
                p.copy_(w)
            elif pname.startswith("embeddings."):
                # cls_token, register_tokens, mask_token (mask_token is unused at inference).
                p.copy_(normal(p.shape, 1.0))
            else:
                raise RuntimeError(f"{name}: parameter {pname} not handled")
    return model


def make_inputs(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        key: rng.standard_normal((b, 3, h, w)).astype(np.float32)
        for key, (b, h, w) in INPUTS.items()
    }


def forward(model: DINOv3ViTModel, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        out = model(pixel_values=torch.from_numpy(x)).last_hidden_state
    assert out.dtype == torch.float32
    return out.numpy().astype(np.float32)


def layer0_intermediates(model: DINOv3ViTModel, x: np.ndarray) -> dict[str, np.ndarray]:
    """Tensors of the embeddings and of layer 0 for one input, captured with hooks."""
    captured: dict[str, torch.Tensor] = {}
    layer0 = model.model.layer[0]

    def keep(key, index=None):
        def hook(_module, _inputs, output):
            t = output[index] if index is not None else output
            captured[key] = t.detach().clone()

        return hook

    hooks = [
        model.embeddings.register_forward_hook(keep("embeddings")),
        model.rope_embeddings.register_forward_hook(keep("rope_cos", 0)),
        model.rope_embeddings.register_forward_hook(keep("rope_sin", 1)),
        layer0.norm1.register_forward_hook(keep("layer0_norm1")),
        layer0.attention.o_proj.register_forward_hook(keep("layer0_attn")),
        layer0.mlp.register_forward_hook(keep("layer0_mlp")),
        layer0.register_forward_hook(keep("layer0_out")),
    ]
    try:
        forward(model, x)
    finally:
        for h in hooks:
            h.remove()
    return {k: v.numpy().astype(np.float32) for k, v in captured.items()}


def rope_sensitivity(model: DINOv3ViTModel, x: np.ndarray) -> float:
    """Relative change of the output when the RoPE y/x coordinates are swapped.

    Guards against fixtures on which a RoPE mistake would go unnoticed.
    """
    rope = model.rope_embeddings
    ref = forward(model, x)
    original = rope.forward
    nf = rope.head_dim // 4

    def swapped(pixel_values):
        cos, sin = original(pixel_values)
        # angles are [y | x | y | x], each of length nf: swap the y and x blocks
        perm = torch.cat(
            [torch.arange(nf, 2 * nf), torch.arange(0, nf)]
        ).repeat(2) + torch.arange(2).repeat_interleave(2 * nf) * 2 * nf
        return cos[:, perm], sin[:, perm]

    rope.forward = swapped
    try:
        bad = forward(model, x)
    finally:
        rope.forward = original
    return float(np.abs(bad - ref).max() / np.abs(ref).max())


def attention_peak(model: DINOv3ViTModel, x: np.ndarray) -> float:
    """Mean over heads/queries of the largest attention probability (1/N would be uniform)."""
    with torch.no_grad():
        out = model(pixel_values=torch.from_numpy(x), output_attentions=True)
    return float(torch.stack([a.amax(-1).mean() for a in out.attentions]).mean())


def save_npy(path: Path, arr: np.ndarray) -> None:
    np.save(path, arr, allow_pickle=False)


def stored_keys(folder: Path) -> list[str]:
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return sorted(f.keys())


def write_vit_fixtures(out: Path, log) -> None:
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    models = {}
    for name, spec in MODELS.items():
        model = build_model(name, spec)
        models[name] = model
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(folder)
        keys = stored_keys(folder)
        prefix = "layer.0." if "layer.0.norm1.weight" in keys else "model.layer.0."
        log(f"{name}: {len(keys)} tensors, layer keys stored as '{prefix}…'")

        inputs = make_inputs(spec["seed"] + 7)
        for key, x in inputs.items():
            save_npy(folder / f"input_{key}.npy", x)
            y = forward(model, x)
            save_npy(folder / f"output_{key}.npy", y)
            log(
                f"  {key}: input {x.shape} -> output {y.shape}, "
                f"attention peak {attention_peak(model, x):.2f} (uniform {1 / y.shape[1]:.2f}), "
                f"RoPE y/x swap changes output by {100 * rope_sensitivity(model, x):.0f}%"
            )
        # Batch element 0 only, to keep the fixtures small.
        for key, t in layer0_intermediates(model, inputs["32x32"][:1]).items():
            save_npy(folder / f"debug_32x32_{key}.npy", t)

    for name, (source, dtype) in LOW_PRECISION.items():
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        low = copy.deepcopy(models[source]).to(dtype)
        low.save_pretrained(folder)
        with safe_open(str(folder / "model.safetensors"), "pt") as f:
            dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
        # The reference: the file read back and upcast to fp32, run entirely in fp32.
        back = DINOv3ViTModel.from_pretrained(folder, dtype=torch.float32)
        back.config._attn_implementation = "eager"
        back.eval()
        for (pn, p), (_, q) in zip(back.named_parameters(), low.named_parameters()):
            assert p.dtype == torch.float32, pn
            assert torch.equal(p, q.float()), f"{name}: {pn} not the exact upcast"
        inputs = make_inputs(MODELS[source]["seed"] + 7)
        for key, x in inputs.items():
            y = forward(back, x)
            save_npy(folder / f"output_{key}.npy", y)
            ref = np.load(out / source / f"output_{key}.npy")
            log(
                f"{name} ({'/'.join(sorted(dtypes))} on disk): {key} max |Δ| vs fp32 weights "
                f"{np.abs(y - ref).max():.2e}"
            )


def numpy_forward(folder: Path, x: np.ndarray) -> np.ndarray:
    """An independent float64 NumPy forward of DINOv3ViTModel from config.json and the
    safetensors file, written from the maths (see shared/reference/dinov3_vit.md): it checks
    that the saved outputs are the computation the Rust side must reproduce."""
    cfg = json.loads((folder / "config.json").read_text())
    weights = load_safetensors(str(folder / "model.safetensors"))
    W = {k: v.double().numpy() for k, v in weights.items()}
    D, H, P = cfg["hidden_size"], cfg["num_attention_heads"], cfg["patch_size"]
    hd, eps, R = D // H, cfg["layer_norm_eps"], cfg["num_register_tokens"]
    B, C, hp, wp = x.shape
    gh, gw = hp // P, wp // P
    x = x[:, :, : gh * P, : gw * P].astype(np.float64)
    # patch embedding: a 16x16 stride-16 conv = matmul over (c, ky, kx) patches, row-major tokens
    patches = x.reshape(B, C, gh, P, gw, P).transpose(0, 2, 4, 1, 3, 5).reshape(B, gh * gw, -1)
    pe = patches @ W["embeddings.patch_embeddings.weight"].reshape(D, -1).T
    pe = pe + W["embeddings.patch_embeddings.bias"]
    h = np.concatenate(
        [
            np.broadcast_to(W["embeddings.cls_token"], (B, 1, D)),
            np.broadcast_to(W["embeddings.register_tokens"], (B, R, D)),
            pe,
        ],
        axis=1,
    )
    # RoPE: angles [y | x | y | x], patch tokens only
    nf = hd // 4
    inv_freq = 1.0 / cfg["rope_theta"] ** (np.arange(nf) * 4 / hd)
    ys, xs = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")
    cy = 2 * (ys.ravel() + 0.5) / gh - 1
    cx = 2 * (xs.ravel() + 0.5) / gw - 1
    ang = 2 * np.pi * np.concatenate([cy[:, None] * inv_freq, cx[:, None] * inv_freq], axis=1)
    ang = np.concatenate([ang, ang], axis=1)
    cos, sin = np.cos(ang), np.sin(ang)

    def layer_norm(t, p):
        m = t.mean(-1, keepdims=True)
        v = ((t - m) ** 2).mean(-1, keepdims=True)
        return (t - m) / np.sqrt(v + eps) * W[p + ".weight"] + W[p + ".bias"]

    def linear(t, p):
        y = t @ W[p + ".weight"].T
        return y + W[p + ".bias"] if p + ".bias" in W else y

    def rope(t):
        s = 1 + R
        p = t[:, :, s:]
        rot = np.concatenate([-p[..., hd // 2 :], p[..., : hd // 2]], axis=-1)
        return np.concatenate([t[:, :, :s], p * cos + rot * sin], axis=2)

    erf = np.vectorize(math.erf)
    N = h.shape[1]
    for layer in range(cfg["num_hidden_layers"]):
        p = f"layer.{layer}."
        a = layer_norm(h, p + "norm1")
        q, k, v = (
            linear(a, p + f"attention.{n}_proj").reshape(B, N, H, hd).transpose(0, 2, 1, 3)
            for n in "qkv"
        )
        q, k = rope(q), rope(k)
        s = q @ k.transpose(0, 1, 3, 2) / math.sqrt(hd)
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        o = (s @ v).transpose(0, 2, 1, 3).reshape(B, N, D)
        h = h + W[p + "layer_scale1.lambda1"] * linear(o, p + "attention.o_proj")
        a = layer_norm(h, p + "norm2")
        if cfg["use_gated_mlp"]:
            g = linear(a, p + "mlp.gate_proj")
            m = g / (1 + np.exp(-g)) * linear(a, p + "mlp.up_proj")
        else:
            u = linear(a, p + "mlp.up_proj")
            m = 0.5 * u * (1 + erf(u / math.sqrt(2)))
        h = h + W[p + "layer_scale2.lambda1"] * linear(m, p + "mlp.down_proj")
    return layer_norm(h, "norm")


def verify_with_numpy(out: Path, log) -> None:
    for name in [*MODELS, *LOW_PRECISION]:
        source = LOW_PRECISION[name][0] if name in LOW_PRECISION else name
        for key in INPUTS:
            x = np.load(out / source / f"input_{key}.npy")
            y = np.load(out / name / f"output_{key}.npy")
            err = float(np.abs(numpy_forward(out / name, x) - y).max())
            log(f"{name} {key}: float64 NumPy forward matches, max |Δ| {err:.1e}")
            if err > 1e-4:
                raise RuntimeError(f"{name} {key}: fixture disagrees with the NumPy forward ({err})")


def write_npy_fixtures(out: Path) -> None:
    """Small .npy files written by numpy itself, for volfuse's reader tests.

    Values follow formulas the Rust tests recompute: v[i] = f(i) over the flat C-order index.
    """
    d = out / "npy"
    d.mkdir(parents=True, exist_ok=True)
    i6 = np.arange(6)
    arrays = {
        "f4_2x3": ((i6 * 0.5 - 1.0).astype("<f4").reshape(2, 3)),
        "f8_2x3": ((i6 * 0.25 - 0.5).astype("<f8").reshape(2, 3)),
        "f2_2x3": ((i6 * 0.5 - 1.0).astype("<f2").reshape(2, 3)),
        "u1_2x3": ((i6 * 50).astype("|u1").reshape(2, 3)),
        "u2_2x3": ((i6 * 13000).astype("<u2").reshape(2, 3)),
        "i2_2x3": ((i6 * 1000 - 2500).astype("<i2").reshape(2, 3)),
        "i4_2x3": ((i6 * 100000 - 250000).astype("<i4").reshape(2, 3)),
        "u4_2x3": ((i6 * 800000000).astype("<u4").reshape(2, 3)),
        "i8_2x3": ((i6 * 3000000000 - 7500000000).astype("<i8").reshape(2, 3)),
        "b1_2x3": ((i6 % 2 == 0).astype("|b1").reshape(2, 3)),
        "f4_scalar": np.array(3.5, dtype="<f4"),
        "f4_empty_0x3": np.zeros((0, 3), dtype="<f4"),
        "u1_2x3x4": (np.arange(24) % 256).astype("|u1").reshape(2, 3, 4),
    }
    for name, arr in arrays.items():
        save_npy(d / f"{name}.npy", arr)
    a = arrays["f4_2x3"]
    for version in [(2, 0), (3, 0)]:
        with open(d / f"f4_2x3_v{version[0]}.npy", "wb") as f:
            np.lib.format.write_array(f, a, version=version, allow_pickle=False)
    # Bad cases the reader must reject with a clear message.
    with open(d / "bad_fortran_2x3.npy", "wb") as f:
        np.lib.format.write_array(f, np.asfortranarray(a), allow_pickle=False)
    save_npy(d / "bad_bigendian_f4_2x3.npy", a.astype(">f4"))
    save_npy(d / "bad_complex_2.npy", np.array([1 + 2j, 3 - 4j], dtype="<c8"))


def build(out: Path, log) -> None:
    write_vit_fixtures(out, log)
    verify_with_numpy(out, log)
    write_npy_fixtures(out)


def main() -> int:
    hf_logging.disable_progress_bar()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    root = Path(__file__).resolve().parent.parent
    parser.add_argument("--out", type=Path, default=root / "tests" / "fixtures")
    parser.add_argument("--check", action="store_true", help="rebuild in a temp dir and compare with --out")
    args = parser.parse_args()

    if not args.check:
        for name in [*MODELS, *LOW_PRECISION, "npy"]:
            shutil.rmtree(args.out / name, ignore_errors=True)
        build(args.out, print)
        total = sum(p.stat().st_size for n in [*MODELS, *LOW_PRECISION, "npy"] for p in (args.out / n).iterdir())
        print(f"total {total} bytes in {args.out}")
        return 0

    with tempfile.TemporaryDirectory() as tmp:
        build(Path(tmp), lambda *_: None)
        bad = []
        for name in [*MODELS, *LOW_PRECISION, "npy"]:
            cmp = filecmp.dircmp(Path(tmp) / name, args.out / name)
            _, mismatch, errors = filecmp.cmpfiles(
                Path(tmp) / name, args.out / name, cmp.common_files, shallow=False
            )
            bad += [f"{name}/{f}" for f in mismatch + errors + cmp.left_only + cmp.right_only]
        if bad:
            print("differs from a fresh build:", *bad, sep="\n  ")
            return 1
        print("fixtures are up to date")
        return 0


if __name__ == "__main__":
    sys.exit(main())
