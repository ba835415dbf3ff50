#!/usr/bin/env python3
"""Convert a dinov3_playground DINOv3UNet3D export plus an HF DINOv3 folder into a volfuse bundle.

    tools/.venv/bin/python tools/convert_checkpoint.py EXPORT BACKBONE OUT [options]
    tools/.venv/bin/python tools/convert_checkpoint.py --self-test

EXPORT is one of
  - an export folder holding run_YYYYMMDD_HHMMSS (or YYYYMMDD_HHMMSS) subfolders: the newest
    (by name, as dinov3_playground's load_inference_model) is used;
  - such a run folder itself (best.pkl, checkpoint_epoch_NNNN.pkl, ... directly inside, or in
    a model/ subfolder as in older versions);
  - a checkpoint .pkl file.
The checkpoint is a plain pickle of a dict with model_config, training_config and
unet3d_state_dict (training stats and optimizer state are ignored). Its tensors may have been
saved on CUDA: they are mapped to the CPU while unpickling, so no GPU is needed. Classes of
packages that are not installed (dinov3_playground itself) are replaced by placeholders.

BACKBONE is a local HF transformers DINOv3ViTModel folder (config.json + model.safetensors, or
sharded safetensors / pytorch_model.bin, which are merged/converted into one model.safetensors),
e.g. a snapshot downloaded with `hf download facebook/dinov3-vitl16-pretrain-sat493m`.

OUT receives (interfaces.md, "Model bundle"):
  volfuse.json         {"format": "volfuse-model/1", "model_config", "training_config",
                        "backbone": "backbone", "image_mean", "image_std"}
  unet.safetensors     the state dict, PyTorch key names unchanged, floats as --dtype,
                       num_batches_tracked kept as int64
  backbone/config.json, backbone/model.safetensors

Checks before writing: the state dict has exactly the keys and shapes of DINOv3UNet3D built
from model_config (tools/reference_unet.py), and model_config.input_channels equals the
backbone's hidden_size.

--self-test builds fake exports in a temporary folder (with CUDA-tagged tensors, several runs
and checkpoints) from tests/fixtures/unet_ctx and converts them; see tools/README.md.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import pickle
import re
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reference_unet import model_from_config  # noqa: E402

FORMAT = "volfuse-model/1"
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
RUN_PATTERN = re.compile(r"(run_)?\d{8}_\d{6}")
EPOCH_PATTERN = re.compile(r"checkpoint_epoch_(\d+)\.pkl")
STATE_DICT_KEYS = ("unet3d_state_dict", "model_state_dict", "state_dict")


class ConversionError(RuntimeError):
    pass


# ---------------------------------------------------------------------------------------------
# Finding and loading the checkpoint


def find_checkpoint_dir(export: Path, log=print) -> Path:
    """The run folder: export itself if named (run_)YYYYMMDD_HHMMSS, else its newest such child."""
    if RUN_PATTERN.match(export.name):
        run = export
    else:
        runs = sorted(d for d in export.iterdir() if d.is_dir() and RUN_PATTERN.match(d.name))
        if runs:
            run = runs[-1]
            log(f"using the newest of {len(runs)} run folder(s): {run.name}")
        else:
            run = export  # a folder holding the checkpoints directly
    if not list(run.glob("*.pkl")) and (run / "model").is_dir():
        run = run / "model"  # layout of older dinov3_playground versions
    return run


def choose_checkpoint(folder: Path, preference: str = "best", log=print) -> Path:
    """best.pkl, the latest checkpoint, or checkpoint_epoch_NNNN.pkl for an epoch number.

    'latest' is the most recently written of best.pkl and checkpoint_epoch_*.pkl (modification
    time, then epoch number): periodic checkpoints are only written in epochs that were not
    the best, so the newest file holds the newest weights. 'best' falls back to 'latest' with a
    warning when there is no best.pkl.
    """
    epochs = {}
    for p in folder.glob("checkpoint_epoch_*.pkl"):
        m = EPOCH_PATTERN.fullmatch(p.name)
        if m:
            epochs[int(m.group(1))] = p
    best = folder / "best.pkl"
    if str(preference).isdigit():
        n = int(preference)
        if n not in epochs:
            raise ConversionError(f"no checkpoint_epoch_{n:04d}.pkl in {folder} (have epochs {sorted(epochs)})")
        return epochs[n]
    if preference not in ("best", "latest"):
        raise ConversionError(f"checkpoint preference must be best, latest or an epoch number, not {preference!r}")
    if preference == "best" and best.exists():
        return best
    candidates = [(p.stat().st_mtime, n, p) for n, p in epochs.items()]
    if best.exists():
        candidates.append((best.stat().st_mtime, math.inf, best))
    if not candidates:
        raise ConversionError(f"no best.pkl or checkpoint_epoch_*.pkl in {folder}")
    chosen = max(candidates, key=lambda c: (c[0], c[1]))[2]
    if preference == "best":
        log(f"warning: no best.pkl in {folder}, using the latest checkpoint {chosen.name}")
    return chosen


def _load_storage_on_cpu(b: bytes):
    # Replaces torch.storage._load_from_bytes, which would restore CUDA-saved storages on CUDA.
    return torch.load(io.BytesIO(b), map_location="cpu", weights_only=False)


class _Missing:
    """Stands in for classes of modules that are not installed (kept out of the bundle)."""

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state):
        self.state = state

    def __repr__(self):
        return f"<unpickled {self.__class__.__module__}.{self.__class__.__name__}>"


class _CPUUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if module == "torch.storage" and name == "_load_from_bytes":
            return _load_storage_on_cpu
        try:
            return super().find_class(module, name)
        except (ImportError, AttributeError):
            return type(name, (_Missing,), {"__module__": module})


def load_checkpoint(path: Path) -> dict:
    """A dinov3_playground checkpoint: plain pickle (any device) or a torch.save file."""
    import zipfile

    if zipfile.is_zipfile(path):
        return torch.load(path, map_location="cpu", weights_only=False)
    with open(path, "rb") as f:
        obj = _CPUUnpickler(f).load()
    if isinstance(obj, int):  # legacy torch.save: the first pickle is a magic number
        obj = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(obj, dict):
        raise ConversionError(f"{path}: expected a dict, found {type(obj).__name__}")
    return obj


# ---------------------------------------------------------------------------------------------
# Checks and conversion


def jsonable(x):
    """Configs as JSON: tuples -> lists, numpy/torch scalars -> numbers, other objects -> str."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, (np.ndarray, torch.Tensor)):
        return jsonable(x.tolist())
    if isinstance(x, np.floating) and x.dtype.itemsize < 8:
        return jsonable(float(str(x)))  # shortest repr of the float32/16 value: 1e-4, not 9.99999974e-05
    if isinstance(x, np.generic):
        return jsonable(x.item())
    if isinstance(x, bool) or x is None or isinstance(x, (int, str)):
        return x
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    return str(x)


def get_state_dict(checkpoint: dict) -> dict[str, torch.Tensor]:
    for key in STATE_DICT_KEYS:
        if key in checkpoint:
            sd = checkpoint[key]
            break
    else:
        raise ConversionError(f"checkpoint has none of {STATE_DICT_KEYS}; keys: {sorted(checkpoint)}")
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ConversionError(f"state dict entries that are not tensors: {bad[:5]}")
    return dict(sd)


def validate_state_dict(model_config: dict, sd: dict[str, torch.Tensor]) -> None:
    """Same keys and shapes as DINOv3UNet3D built from model_config (on the meta device)."""
    with torch.device("meta"):
        model = model_from_config(model_config, sd.keys())
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in sd.items()}
    problems = [f"missing {k} {s}" for k, s in want.items() if k not in have]
    problems += [f"unexpected {k} {s}" for k, s in have.items() if k not in want]
    problems += [f"{k}: shape {have[k]}, model_config implies {s}" for k, s in want.items() if k in have and have[k] != s]
    if problems:
        raise ConversionError(
            "the state dict does not match DINOv3UNet3D built from model_config:\n  "
            + "\n  ".join(problems[:20])
            + ("\n  ..." if len(problems) > 20 else "")
        )


def read_backbone_config(backbone: Path) -> dict:
    path = backbone / "config.json"
    if not path.is_file():
        raise ConversionError(f"{backbone}: no config.json (expected an HF DINOv3ViTModel folder)")
    return json.loads(path.read_text())


def copy_backbone(src: Path, dst: Path, log=print) -> None:
    dst.mkdir(parents=True)
    shutil.copyfile(src / "config.json", dst / "config.json")
    if (src / "model.safetensors").is_file():
        shutil.copyfile(src / "model.safetensors", dst / "model.safetensors")
        return
    from safetensors import safe_open
    from safetensors.torch import save_file

    index = src / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        tensors = {}
        for shard in shards:
            with safe_open(str(src / shard), "pt") as f:
                for k in f.keys():
                    tensors[k] = f.get_tensor(k)
        log(f"merged {len(shards)} safetensors shards into one model.safetensors")
    elif (src / "pytorch_model.bin").is_file():
        tensors = torch.load(src / "pytorch_model.bin", map_location="cpu", weights_only=True)
        tensors = {k: v.contiguous() for k, v in tensors.items()}
        log("converted pytorch_model.bin to model.safetensors")
    else:
        raise ConversionError(f"{src}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})


def convert(
    export: Path,
    backbone: Path,
    out: Path,
    checkpoint: str = "best",
    dtype: str = "f32",
    image_mean=None,
    image_std=None,
    force: bool = False,
    allow_channel_mismatch: bool = False,
    log=print,
) -> dict:
    """Write the bundle; returns {"checkpoint": path, "num_tensors": n, "epoch": ...}."""
    from safetensors.torch import save_file

    export, backbone, out = Path(export), Path(backbone), Path(out)
    if dtype not in DTYPES:
        raise ConversionError(f"--dtype must be one of {list(DTYPES)}")
    for p in (export, backbone):
        if not p.exists():
            raise ConversionError(f"{p} does not exist")
    if export.is_file():
        ckpt_path = export
    else:
        ckpt_path = choose_checkpoint(find_checkpoint_dir(export, log), checkpoint, log)
    log(f"loading {ckpt_path}")
    ckpt = load_checkpoint(ckpt_path)
    if "model_config" not in ckpt or not ckpt["model_config"]:
        raise ConversionError(f"{ckpt_path}: no model_config in the checkpoint")
    model_config = jsonable(ckpt["model_config"])
    training_config = jsonable(ckpt.get("training_config") or {})
    if model_config.get("model_type", "dinov3_unet3d") != "dinov3_unet3d":
        raise ConversionError(f"model_type {model_config.get('model_type')!r}: only dinov3_unet3d is supported")
    sd = get_state_dict(ckpt)
    validate_state_dict(model_config, sd)

    bcfg = read_backbone_config(backbone)
    if bcfg.get("model_type") != "dinov3_vit":
        log(f"warning: backbone model_type is {bcfg.get('model_type')!r}, not 'dinov3_vit'")
    if bcfg.get("patch_size", 16) != 16:
        log(f"warning: backbone patch_size {bcfg.get('patch_size')}; dinov3_playground assumes 16")
    cd = model_config.get("input_channels")
    if cd != bcfg.get("hidden_size"):
        msg = f"model_config input_channels {cd} != backbone hidden_size {bcfg.get('hidden_size')}"
        if not allow_channel_mismatch:
            raise ConversionError(msg + " (wrong backbone? --allow-channel-mismatch to write it anyway)")
        log("warning: " + msg)
    pre = backbone / "preprocessor_config.json"
    mean = list(image_mean) if image_mean is not None else IMAGENET_MEAN
    std = list(image_std) if image_std is not None else IMAGENET_STD
    if pre.is_file():
        pc = json.loads(pre.read_text())
        if pc.get("image_mean") not in (None, mean) or pc.get("image_std") not in (None, std):
            log(f"note: {pre.name} has mean {pc.get('image_mean')} std {pc.get('image_std')}; "
                f"the bundle uses mean {mean} std {std}")

    if out.exists():
        if any(out.iterdir()):
            if not force:
                raise ConversionError(f"{out} exists (use --force to replace it)")
            if not (out / "volfuse.json").is_file():
                raise ConversionError(f"{out} exists and is not a volfuse bundle; not replacing it")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    target = DTYPES[dtype]
    tensors = {
        k: (v.detach().to("cpu", target if v.is_floating_point() else v.dtype)).clone().contiguous()
        for k, v in sd.items()
    }
    save_file(tensors, str(out / "unet.safetensors"), metadata={"format": "pt"})
    copy_backbone(backbone, out / "backbone", log)
    meta = {
        "format": FORMAT,
        "model_config": model_config,
        "training_config": training_config,
        "backbone": "backbone",
        "image_mean": mean,
        "image_std": std,
    }
    (out / "volfuse.json").write_text(json.dumps(meta, indent=2) + "\n")
    log(f"wrote {out}: {len(tensors)} UNet tensors ({dtype}), backbone hidden_size {bcfg.get('hidden_size')}")
    return {"checkpoint": str(ckpt_path), "num_tensors": len(tensors), "epoch": ckpt.get("epoch")}


# ---------------------------------------------------------------------------------------------
# Self-test


def self_test() -> int:
    """Fake exports from tests/fixtures/unet_ctx, converted and checked in a temp folder."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    root = Path(__file__).resolve().parent.parent
    fixture = root / "tests" / "fixtures" / "unet_ctx"
    model_config = json.loads((fixture / "model_config.json").read_text())
    sd = load_file(str(fixture / "unet.safetensors"))
    # the state dict in module order, as state_dict() returns it
    with torch.device("meta"):
        order = list(model_from_config(model_config).state_dict().keys())
    sd = {k: sd[k] for k in order}
    training_config = {"target_volume_size": (16, 16, 16), "image_size": 64, "lr": np.float32(1e-4),
                       "epochs": np.int64(3), "use_orthogonal_planes": True, "bad": float("nan")}

    def checkpoint_dict(epoch: int, scale: float) -> dict:
        return {
            "epoch": epoch,
            "train_losses": [1.0] * epoch,
            "training_config": training_config,
            "model_config": {**model_config, "input_size": tuple(model_config["input_size"])},
            "unet3d_state_dict": {k: (v * scale if v.is_floating_point() else v) for k, v in sd.items()},
            "optimizer_state_dict": {"state": {}, "param_groups": []},
            "scheduler_state_dict": None,
        }

    def dump(path: Path, obj, mtime: float, cuda: bool = True) -> None:
        """Plain pickle, with storages tagged as saved on cuda:0 like a GPU training run."""
        path.parent.mkdir(parents=True, exist_ok=True)
        import torch.serialization as ser

        original = ser.location_tag
        if cuda:
            ser.location_tag = lambda storage: "cuda:0"
        try:
            with open(path, "wb") as f:
                pickle.dump(obj, f)
        finally:
            ser.location_tag = original
        os.utime(path, (mtime, mtime))

    checks = 0

    def check(cond, what):
        nonlocal checks
        if not cond:
            raise AssertionError(what)
        checks += 1

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        export = tmp / "export" / "dinov3_unet3d_tiny"
        old = export / "run_20240101_000000"
        new = export / "run_20250102_030405"
        t0 = 1_700_000_000
        dump(old / "best.pkl", checkpoint_dict(1, 5.0), t0)
        dump(new / "checkpoint_epoch_0002.pkl", checkpoint_dict(2, 2.0), t0 + 10)
        dump(new / "best.pkl", checkpoint_dict(3, 1.0), t0 + 20)
        dump(new / "checkpoint_epoch_0004.pkl", checkpoint_dict(4, 4.0), t0 + 30)
        dump(new / "stats_epoch_0004.pkl", {"epoch": 4}, t0 + 31, cuda=False)
        dump(new / "latest_stats.pkl", {"epoch": 4}, t0 + 32, cuda=False)
        (new / "tensorboard").mkdir()

        # A CUDA-tagged pickle cannot be read by plain pickle on a machine without CUDA.
        if not torch.cuda.is_available():
            try:
                with open(new / "best.pkl", "rb") as f:
                    pickle.load(f)
                check(False, "plain pickle.load of a CUDA-tagged checkpoint should fail without CUDA")
            except RuntimeError:
                checks += 1

        # Backbones: a tiny random DINOv3 ViT with hidden_size = input_channels, and vit_gelu (64).
        torch.manual_seed(0)
        vit = DINOv3ViTModel(DINOv3ViTConfig(hidden_size=model_config["input_channels"], num_attention_heads=2,
                                             num_hidden_layers=1, intermediate_size=32, num_register_tokens=4))
        backbone = tmp / "vit16"
        vit.save_pretrained(backbone)
        sharded = tmp / "vit16_sharded"
        vit.save_pretrained(sharded, max_shard_size="20KB")
        check((sharded / "model.safetensors.index.json").is_file(), "sharded backbone was not sharded")
        vit_gelu = root / "tests" / "fixtures" / "vit_gelu"
        quiet = lambda *_: None

        # 1. default: newest run, best.pkl, f32
        out = tmp / "bundle"
        info = convert(export, backbone, out, log=quiet)
        check(Path(info["checkpoint"]) == new / "best.pkl" and info["epoch"] == 3, f"chose {info}")
        meta = json.loads((out / "volfuse.json").read_text())
        check(sorted(meta) == ["backbone", "format", "image_mean", "image_std", "model_config", "training_config"],
              f"volfuse.json keys {sorted(meta)}")
        check(meta["format"] == FORMAT and meta["backbone"] == "backbone", "format/backbone")
        check(meta["model_config"] == model_config, "model_config must round-trip unchanged")
        check(meta["training_config"] == {"target_volume_size": [16, 16, 16], "image_size": 64,
                                          "lr": 1e-4, "epochs": 3,
                                          "use_orthogonal_planes": True, "bad": None}, "training_config")
        check(meta["image_mean"] == IMAGENET_MEAN and meta["image_std"] == IMAGENET_STD, "ImageNet stats")
        got = load_file(str(out / "unet.safetensors"))
        check(set(got) == set(sd) and len(got) == 184, "unet keys")
        check(all(torch.equal(got[k], sd[k]) and got[k].dtype == sd[k].dtype for k in sd), "f32 values")
        check(got["enc1.1.num_batches_tracked"].dtype == torch.int64, "num_batches_tracked int64")
        for f in ("config.json", "model.safetensors"):
            check((out / "backbone" / f).read_bytes() == (backbone / f).read_bytes(), f"backbone/{f} copied")
        # the bundle reproduces the fixture's logits
        model = model_from_config(meta["model_config"], got.keys())
        model.load_state_dict(got)
        model.eval()
        x = torch.from_numpy(np.load(fixture / "features.npy"))
        c = torch.from_numpy(np.load(fixture / "context.npy"))
        with torch.no_grad():
            y = model(x, c).numpy()
        check(np.array_equal(y, np.load(fixture / "logits.npy")), "bundle logits == fixture logits")

        # 2. refusing to overwrite; --force replaces a bundle but never a foreign folder
        try:
            convert(export, backbone, out, log=quiet)
            check(False, "overwrote without force")
        except ConversionError:
            checks += 1
        foreign = tmp / "foreign"
        foreign.mkdir()
        (foreign / "keep.txt").write_text("x")
        try:
            convert(export, backbone, foreign, force=True, log=quiet)
            check(False, "replaced a non-bundle folder")
        except ConversionError:
            check((foreign / "keep.txt").exists(), "foreign folder touched")

        # 3. checkpoint preference, run folder given directly, .pkl given directly, dtypes, stats
        info = convert(export, backbone, out, checkpoint="latest", dtype="f16", force=True, log=quiet)
        check(Path(info["checkpoint"]).name == "checkpoint_epoch_0004.pkl", f"latest chose {info}")
        got = load_file(str(out / "unet.safetensors"))
        check(all(torch.equal(got[k], (sd[k] * 4.0).half()) for k in sd if sd[k].is_floating_point()), "f16 values")
        check(got["enc1.1.num_batches_tracked"].dtype == torch.int64, "int64 kept with f16")
        info = convert(new, backbone, out, checkpoint="2", dtype="bf16", force=True,
                       image_mean=[0.43, 0.411, 0.296], image_std=[0.213, 0.156, 0.143], log=quiet)
        check(Path(info["checkpoint"]).name == "checkpoint_epoch_0002.pkl", f"epoch 2 chose {info}")
        got = load_file(str(out / "unet.safetensors"))
        check(all(torch.equal(got[k], (sd[k] * 2.0).bfloat16()) for k in sd if sd[k].is_floating_point()), "bf16 values")
        meta = json.loads((out / "volfuse.json").read_text())
        check(meta["image_mean"] == [0.43, 0.411, 0.296] and meta["image_std"] == [0.213, 0.156, 0.143], "stats flags")
        info = convert(old / "best.pkl", sharded, out, force=True, log=quiet)
        check(info["epoch"] == 1, "explicit .pkl")
        with safe_open(str(out / "backbone" / "model.safetensors"), "pt") as f:
            merged = {k: f.get_tensor(k) for k in f.keys()}
        ref = load_file(str(backbone / "model.safetensors"))
        check(set(merged) == set(ref) and all(torch.equal(merged[k], ref[k]) for k in ref), "merged shards")
        try:
            convert(new, backbone, out, checkpoint="7", force=True, log=quiet)
            check(False, "missing epoch accepted")
        except ConversionError:
            checks += 1

        # 4. the checks: wrong backbone width, state dict not matching model_config
        try:
            convert(export, vit_gelu, out, force=True, log=quiet)
            check(False, "channel mismatch accepted")
        except ConversionError as e:
            check("hidden_size" in str(e), str(e))
        bad = checkpoint_dict(5, 1.0)
        bad["model_config"] = {**model_config, "base_channels": 8}
        dump(tmp / "bad.pkl", bad, t0)
        try:
            convert(tmp / "bad.pkl", backbone, out, force=True, log=quiet)
            check(False, "mismatching state dict accepted")
        except ConversionError as e:
            check("does not match" in str(e), str(e))
        # an unknown class inside training_config (dinov3_playground objects) becomes a string
        odd = checkpoint_dict(6, 1.0)
        odd["training_config"] = {"loss": _Missing()}
        odd_bytes = pickle.dumps(odd).replace(b"__main__", b"dinov3_x").replace(b"convert_checkpoint", b"dinov3_x")
        (tmp / "odd.pkl").write_bytes(odd_bytes)
        convert(tmp / "odd.pkl", backbone, out, force=True, log=quiet)
        meta = json.loads((out / "volfuse.json").read_text())
        check(meta["training_config"]["loss"].startswith("<unpickled dinov3_x."), meta["training_config"])

    print(f"convert_checkpoint self-test passed ({checks} checks)")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("export", nargs="?", type=Path, help="export folder, run folder or .pkl")
    parser.add_argument("backbone", nargs="?", type=Path, help="HF DINOv3ViTModel folder")
    parser.add_argument("out", nargs="?", type=Path, help="bundle folder to write")
    parser.add_argument("--checkpoint", default="best", help="best (default), latest, or an epoch number")
    parser.add_argument("--dtype", choices=list(DTYPES), default="f32", help="UNet float storage (default f32)")
    parser.add_argument("--mean", type=float, nargs=3, metavar=("R", "G", "B"), help="image_mean (default ImageNet)")
    parser.add_argument("--std", type=float, nargs=3, metavar=("R", "G", "B"), help="image_std (default ImageNet)")
    parser.add_argument("--force", action="store_true", help="replace an existing bundle folder")
    parser.add_argument("--allow-channel-mismatch", action="store_true",
                        help="write the bundle even if input_channels != backbone hidden_size")
    parser.add_argument("--self-test", action="store_true", help="convert fake exports in a temp folder")
    args = parser.parse_args()
    if args.self_test:
        warnings.simplefilter("ignore")
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        return self_test()
    if not (args.export and args.backbone and args.out):
        parser.error("EXPORT, BACKBONE and OUT are required (or --self-test)")
    try:
        convert(args.export, args.backbone, args.out, args.checkpoint, args.dtype, args.mean, args.std,
                args.force, args.allow_channel_mismatch)
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
