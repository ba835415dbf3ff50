#!/usr/bin/env python3
"""PyTorch reference of dinov3_playground's DINOv3UNet3D (inference/eval semantics).

Written from shared/reference/dinov3_playground.md, sections (a) architecture, (b) context
path and (c) learned upsampling. Module and parameter names are chosen so that
`state_dict()` has exactly the keys (and order) of the original, so a dinov3_playground
`unet3d_state_dict` loads with strict=True and our fixtures load in the original.

Only eval mode matters here: BatchNorm uses running statistics, dropouts are identity.
BatchRenorm3d (used in some trainings) has the same eval formula and keys, so nn.BatchNorm3d
stands in for it.

Usage as a library:

    from reference_unet import DINOv3UNet3D, model_from_config
    model = model_from_config(model_config, state_dict_keys=sd.keys())
    model.load_state_dict(sd); model.eval()
    logits = model(features, context)                  # context may be None
    logits, extras = model(features, context, return_intermediates=True)

`python tools/reference_unet.py` runs a quick self-test of the key layout.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

# Norm entries of one BatchNorm3d in state_dict order.
NORM_ENTRIES = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
BLOCKS = ("enc1", "enc2", "enc3", "enc4", "bottleneck", "dec4", "dec3", "dec2", "dec1")


def conv_block(cin: int, cout: int) -> nn.Sequential:
    """[0] Conv3d k3 p1 → [1] BN → [2] ReLU → [3] Conv3d k3 p1 → [4] BN → [5] ReLU → [6] Dropout3d."""
    return nn.Sequential(
        nn.Conv3d(cin, cout, kernel_size=3, padding=1),
        nn.BatchNorm3d(cout),
        nn.ReLU(),
        nn.Conv3d(cout, cout, kernel_size=3, padding=1),
        nn.BatchNorm3d(cout),
        nn.ReLU(),
        nn.Dropout3d(0.1),
    )


class ContextAttentionFusion(nn.Module):
    """skip = raw + raw_proj(raw) * sigmoid(conv3(relu(bn1(conv0(ctx)))))."""

    def __init__(self, channels: int):
        super().__init__()
        if channels // 4 < 1:
            raise ValueError(f"context fusion needs at least 4 channels per level, got {channels}")
        self.channels = channels
        # Index 4 (Sigmoid) has no parameters; it is part of the Sequential as in the original.
        self.context_proj = nn.Sequential(
            nn.Conv3d(channels, channels // 4, 1),
            nn.BatchNorm3d(channels // 4),
            nn.ReLU(),
            nn.Conv3d(channels // 4, channels, 1),
            nn.Sigmoid(),
        )
        self.raw_proj = nn.Conv3d(channels, channels, 1)

    def forward(self, raw: torch.Tensor, context: torch.Tensor):
        gate = self.context_proj(context)
        return raw + self.raw_proj(raw) * gate, gate


def upsampling_stages(input_size: Sequence[int], feature_size: Sequence[float]) -> int:
    """Number of ConvTranspose3d stages: from max_i int(input_size_i / feature_size_i)."""
    factor = max(int(t / f) for t, f in zip(input_size, feature_size))
    if factor >= 8:
        return 3
    if factor >= 4:
        return 2
    if factor >= 2:
        return 1
    return 0


class DINOv3UNet3D(nn.Module):
    def __init__(
        self,
        input_channels: int,
        num_classes: int,
        base_channels: int,
        input_size: Sequence[int],
        use_context_fusion: bool = False,
        learn_upsampling: bool = False,
        feature_size: Sequence[float] | None = None,
        context_channels: int | None = None,
    ):
        super().__init__()
        C = base_channels
        self.input_size = tuple(int(s) for s in input_size)
        if any(s % 16 for s in self.input_size):
            raise ValueError(f"input_size {self.input_size}: each axis must be divisible by 16")
        self.input_channels = input_channels
        self.num_classes = num_classes
        self.base_channels = C
        self.use_context_fusion = use_context_fusion
        self.feature_size = tuple(feature_size) if feature_size is not None else self.input_size

        # Registration order = state_dict order of the original:
        # input_conv, learned_upsample, enc1..4, bottleneck, dec4..1, final_conv, context_*.
        self.input_conv = nn.Conv3d(input_channels, C, kernel_size=1)

        self.upsample_stages = upsampling_stages(self.input_size, self.feature_size) if learn_upsampling else 0
        if self.upsample_stages:
            layers: list[nn.Module] = []
            for _ in range(self.upsample_stages):
                layers += [
                    nn.ConvTranspose3d(C, C, kernel_size=4, stride=2, padding=1),
                    nn.BatchNorm3d(C),
                    nn.ReLU(),
                ]
            layers.append(nn.Conv3d(C, C, kernel_size=3, padding=1))
            self.learned_upsample = nn.Sequential(*layers)
        else:
            self.learned_upsample = None

        self.enc1 = conv_block(C, C)
        self.enc2 = conv_block(C, 2 * C)
        self.enc3 = conv_block(2 * C, 4 * C)
        self.enc4 = conv_block(4 * C, 8 * C)
        self.bottleneck = conv_block(8 * C, 16 * C)
        self.dec4 = conv_block(24 * C, 8 * C)
        self.dec3 = conv_block(12 * C, 4 * C)
        self.dec2 = conv_block(6 * C, 2 * C)
        self.dec1 = conv_block(3 * C, C)
        self.final_conv = nn.Conv3d(C, num_classes, kernel_size=1)
        self.pool = nn.MaxPool3d(2)
        self.dropout = nn.Dropout3d(0.2)

        if use_context_fusion:
            self.context_input_conv = nn.Conv3d(context_channels or input_channels, C, kernel_size=1)
            self.context_proj1 = nn.Conv3d(C, C, kernel_size=1)
            self.context_proj2 = nn.Conv3d(C, 2 * C, kernel_size=1)
            self.context_proj3 = nn.Conv3d(C, 4 * C, kernel_size=1)
            self.context_proj4 = nn.Conv3d(C, 8 * C, kernel_size=1)
            self.context_fusion1 = ContextAttentionFusion(C)
            self.context_fusion2 = ContextAttentionFusion(2 * C)
            self.context_fusion3 = ContextAttentionFusion(4 * C)
            self.context_fusion4 = ContextAttentionFusion(8 * C)

    def _upsample(self, x: torch.Tensor) -> torch.Tensor:
        """Learned upsampling (§c), then trilinear resize back to input_size if it differs."""
        x = self.learned_upsample(x)
        if tuple(x.shape[2:]) != self.input_size:
            x = F.interpolate(x, size=self.input_size, mode="trilinear", align_corners=False)
        return x

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, return_intermediates: bool = False):
        """x: (B, Cd, d, h, w) features at input_size; context: same shape or None.

        With context None (or use_context_fusion False) the skips are not fused.
        """
        extras: dict[str, torch.Tensor] = {}
        up = lambda t: F.interpolate(t, scale_factor=2, mode="trilinear", align_corners=False)

        x = self.input_conv(x)
        if self.learned_upsample is not None:
            x = self._upsample(x)
            extras["upsampled"] = x

        e1 = self.enc1(x)
        e2 = self.enc2(self.pool(e1))
        e3 = self.enc3(self.pool(e2))
        e4 = self.enc4(self.pool(e3))
        b = self.dropout(self.bottleneck(self.pool(e4)))
        skips = [e1, e2, e3, e4]

        if self.use_context_fusion and context is not None:
            c = self.context_input_conv(context)
            if self.learned_upsample is not None:
                c = self._upsample(c)  # the same weights as for the raw path
            pyramid = [c]
            for _ in range(3):
                pyramid.append(F.avg_pool3d(pyramid[-1], kernel_size=2, stride=2))
            for k in range(4):
                ctx_k = getattr(self, f"context_proj{k + 1}")(pyramid[k])
                skips[k], gate = getattr(self, f"context_fusion{k + 1}")(skips[k], ctx_k)
                extras[f"gate_{k + 1}"] = gate

        d = self.dec4(torch.cat([up(b), skips[3]], dim=1))
        d = self.dec3(torch.cat([up(d), skips[2]], dim=1))
        d = self.dec2(torch.cat([up(d), skips[1]], dim=1))
        d = self.dec1(torch.cat([up(d), skips[0]], dim=1))
        out = self.final_conv(d)
        return (out, extras) if return_intermediates else out


def expected_keys(use_context_fusion: bool, upsample_stages: int = 0) -> list[str]:
    """The state_dict keys of DINOv3UNet3D in order, written out from the reference tables."""
    norm = lambda p: [f"{p}.{e}" for e in NORM_ENTRIES]
    conv = lambda p: [f"{p}.weight", f"{p}.bias"]
    keys = conv("input_conv")
    if upsample_stages:
        for s in range(upsample_stages):
            keys += conv(f"learned_upsample.{3 * s}") + norm(f"learned_upsample.{3 * s + 1}")
        keys += conv(f"learned_upsample.{3 * upsample_stages}")
    for blk in BLOCKS:
        keys += conv(f"{blk}.0") + norm(f"{blk}.1") + conv(f"{blk}.3") + norm(f"{blk}.4")
    keys += conv("final_conv")
    if use_context_fusion:
        keys += conv("context_input_conv")
        for k in range(1, 5):
            keys += conv(f"context_proj{k}")
        for k in range(1, 5):
            p = f"context_fusion{k}"
            keys += conv(f"{p}.context_proj.0") + norm(f"{p}.context_proj.1")
            keys += conv(f"{p}.context_proj.3") + conv(f"{p}.raw_proj")
    return keys


def check_state_dict_layout(model: DINOv3UNet3D) -> int:
    """Assert that the model's state_dict keys equal the documented list; return the count."""
    keys = list(model.state_dict().keys())
    want = expected_keys(model.use_context_fusion, model.upsample_stages)
    if keys != want:
        raise AssertionError(
            "state_dict layout differs from the reference:\n"
            f"  missing {sorted(set(want) - set(keys))}\n  extra {sorted(set(keys) - set(want))}"
        )
    if model.upsample_stages == 0:
        assert len(keys) == (184 if model.use_context_fusion else 130), len(keys)
    return len(keys)


def feature_size_from_config(model_config: dict) -> tuple:
    """feat = (input_size[0], S//16, S//16) as dinov3_playground computes it (S may be a float)."""
    S = model_config["dinov3_slice_size"]
    return (model_config["input_size"][0], S // 16, S // 16)


def model_from_config(model_config: dict, state_dict_keys: Iterable[str] | None = None) -> DINOv3UNet3D:
    """Build the model as dinov3_playground's inference does from a checkpoint's model_config.

    Learned upsampling is on when model_config says so or when any state_dict key contains
    'learned_upsample'; it is then built only if the size factor is at least 2.
    """
    learn = bool(model_config.get("learn_upsampling", False))
    if state_dict_keys is not None and any("learned_upsample" in k for k in state_dict_keys):
        learn = True
    return DINOv3UNet3D(
        input_channels=int(model_config["input_channels"]),
        num_classes=int(model_config["num_classes"]),
        base_channels=int(model_config["base_channels"]),
        input_size=model_config["input_size"],
        use_context_fusion=bool(model_config.get("use_context_fusion", False)),
        learn_upsampling=learn,
        feature_size=feature_size_from_config(model_config) if learn else None,
    )


if __name__ == "__main__":
    for fusion in (True, False):
        for stages, feat in ((0, None), (1, (16, 8, 8)), (2, (16, 4, 4)), (3, (16, 2, 2))):
            m = DINOv3UNet3D(8, 3, 4, (16, 16, 16), fusion, stages > 0, feat)
            assert m.upsample_stages == stages
            n = check_state_dict_layout(m)
            m.eval()
            x = torch.randn(1, 8, 16, 16, 16)
            y = m(x, torch.randn_like(x) if fusion else None)
            assert y.shape == (1, 3, 16, 16, 16)
            print(f"fusion={fusion} stages={stages}: {n} state_dict entries, forward ok")
