"""Deterministic frame streams and tiny models for the precision and compare tests.

The synthetic gesture source is being written on another branch, so these tests bring their own
stream: a coloured square moving in a class-specific direction over a fixed textured
background, with per-frame noise, in segments of 40-90 frames. It is numpy-only and seeded, so
every run sees the same frames.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

COLOURS = np.array([[230, 60, 60], [60, 220, 70], [70, 90, 240], [235, 220, 50]], np.float32)
DIRECTIONS = np.array([[0, 1], [0, -1], [1, 0], [-1, 0]], np.float32)  # (dy, dx) per class


def pattern_stream(n: int, size: int = 32, classes: int = 4, seed: int = 0) -> list[tuple[np.ndarray, int]]:
    """``n`` frames (H×W×3 uint8) with labels: class c = colour c moving in direction c.

    Segments come in rounds that show every class once, so that a calibration stream of a few
    hundred frames covers every colour: INT8 calibrated without one clips it (measured).
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    background = (rng.random((size // 4, size // 4, 3)) * 80 + 40).astype(np.float32)
    background = np.kron(background, np.ones((4, 4, 1), np.float32))
    out: list[tuple[np.ndarray, int]] = []
    order: list[int] = []
    while len(out) < n:
        if not order:  # every class once per round, in a random order: short streams see them all
            order = [int(c) for c in rng.permutation(classes)]
        c = order.pop()
        length = int(rng.integers(40, 91))
        pos = rng.random(2) * size
        step = DIRECTIONS[c % len(DIRECTIONS)] * (size / 40)
        half = size / 6
        for _ in range(length):
            pos = (pos + step) % size
            dy = np.minimum(np.abs(yy - pos[0]), size - np.abs(yy - pos[0]))
            dx = np.minimum(np.abs(xx - pos[1]), size - np.abs(xx - pos[1]))
            mask = ((dy < half) & (dx < half)).astype(np.float32)[..., None]
            img = background * (1 - mask) + COLOURS[c % len(COLOURS)] * mask
            img += rng.normal(0, 6, img.shape).astype(np.float32)
            out.append((np.clip(img, 0, 255).astype(np.uint8), c))
            if len(out) == n:
                break
    return out


def write_video(path: Path, frames: list[np.ndarray], fps: int = 30) -> Path:
    """A video of RGB frames: lossless FFV1 for .avi, lossy mp4v for .mp4.

    Calibration frames should look like the frames the model will run on: an mp4v file at
    32×32 smooths away the noise of the test stream, so INT8 calibrated on it clips the real
    frames (measured: 14× the mean error). The tests calibrate on lossless .avi.
    """
    import cv2

    h, w = frames[0].shape[:2]
    codec = "FFV1" if Path(path).suffix == ".avi" else "mp4v"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*codec), fps, (w, h))
    for f in frames:
        writer.write(cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
    writer.release()
    return path


def normalise(frame: np.ndarray, mean: float = 0.45, std: float = 0.225) -> np.ndarray:
    """HxWx3 uint8 -> 3xHxW float32 as the manifest's default normalisation does."""
    return ((frame.astype(np.float32) / 255.0 - mean) / std).transpose(2, 0, 1).copy()


def prototype_head(features: np.ndarray, labels: np.ndarray, classes: int, scale: float = 8.0):
    """A nearest-class-mean output layer: row c = unit vector of (mean feature of class c - mean).

    Random weights give nearly tied logits, so top-1 agreement would count ties, not precision
    errors. This layer makes the logits depend on the input and is well conditioned (unit rows:
    a small feature error stays a small logit error, unlike a least-squares fit, whose large
    cancelling weights amplify it); ``scale`` spreads the logits over about ±scale.
    """
    mu = features.mean(0)
    protos = np.stack([features[labels == c].mean(0) - mu if (labels == c).any() else np.zeros_like(mu)
                       for c in range(classes)])
    w = protos / np.maximum(np.linalg.norm(protos, axis=1, keepdims=True), 1e-12)
    b = -w @ mu
    s = scale / max(float(np.abs(features @ w.T + b).max()), 1e-12)
    return (w * s).astype(np.float32), (b * s).astype(np.float32)


def tiny_dresnet(classes: int = 4, size: int = 32, seed: int = 0, fit_frames: int = 600):
    """d-resnet18 at width 0.125: random (seeded) backbone, prototype fc head (see prototype_head)."""
    import torch

    from edge3d import zoo

    torch.manual_seed(seed)
    model = zoo.build("d-resnet18", width=0.125, num_classes=classes, frame_size=size).eval()
    data = pattern_stream(fit_frames, size, classes, seed=1000 + seed)
    clip = torch.from_numpy(np.stack([normalise(f) for f, _ in data], axis=1))[None]
    with torch.no_grad():
        hist = model.head.temporal(model.features(clip))[0].T.numpy()
    w, b = prototype_head(hist, np.array([lab for _, lab in data]), classes)
    with torch.no_grad():
        model.head.fc.weight.copy_(torch.from_numpy(w))
        model.head.fc.bias.copy_(torch.from_numpy(b))
    return model


def stateful_net(classes: int = 4, size: int = 32, seed: int = 0, fit_frames: int = 600):
    """Causal conv stem, a GRU head (recurrent state) and a RunningMean branch, fitted output layer.

    Output per frame = Linear([GRU h_t, running mean of the features up to t, features_t]).
    """
    import torch
    import torch.nn.functional as F
    from torch import nn

    from edge3d.nn import CausalConv3d, GRUHead, RunningMean, spatial_mean

    class StatefulNet(nn.Module):
        steps_without_time_axis = True

        def __init__(self) -> None:
            super().__init__()
            self.conv1 = CausalConv3d(3, 8, (3, 3, 3), (1, 2, 2), 1)
            self.conv2 = CausalConv3d(8, 16, (2, 3, 3), (1, 2, 2), 1)
            self.gru = GRUHead(16, 24, 1)
            self.mean = RunningMean()
            self.fc = nn.Linear(24 + 16 + 16, classes)

        def features(self, x: torch.Tensor) -> torch.Tensor:
            f = spatial_mean(F.relu(self.conv2(F.relu(self.conv1(x)))))
            return torch.cat([self.gru(f), self.mean(f), f], dim=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.features(x).transpose(1, -1)).transpose(1, -1)

    torch.manual_seed(seed)
    model = StatefulNet().eval()
    data = pattern_stream(fit_frames, size, classes, seed=2000 + seed)
    clip = torch.from_numpy(np.stack([normalise(f) for f, _ in data], axis=1))[None]
    with torch.no_grad():
        feats = model.features(clip)[0].T.numpy()
    w, b = prototype_head(feats, np.array([lab for _, lab in data]), classes)
    with torch.no_grad():
        model.fc.weight.copy_(torch.from_numpy(w))
        model.fc.bias.copy_(torch.from_numpy(b))
    return model


def running_mean_net(channels: int = 3):
    """Spatial mean -> RunningMean -> identity Linear: the output *is* the running mean."""
    import torch
    from torch import nn

    from edge3d.nn import RunningMean, spatial_mean

    class MeanNet(nn.Module):
        steps_without_time_axis = True

        def __init__(self) -> None:
            super().__init__()
            self.mean = RunningMean()
            self.fc = nn.Linear(channels, channels)
            with torch.no_grad():
                self.fc.weight.copy_(torch.eye(channels))
                self.fc.bias.zero_()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.mean(spatial_mean(x)).transpose(1, -1)).transpose(1, -1)

    return MeanNet().eval()


def two_means_net(classes: int = 4):
    """Two running means in series with a conv between them, as in VoV3D's blocks: the first
    mean gates the features (squeeze-and-excitation over time), the second pools them."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    from edge3d.nn import CausalConv3d, RunningMean, spatial_mean

    class TwoMeans(nn.Module):
        steps_without_time_axis = True

        def __init__(self) -> None:
            super().__init__()
            self.conv1 = CausalConv3d(3, 8, (2, 3, 3), (1, 2, 2), 1)
            self.se_mean = RunningMean()
            self.conv2 = CausalConv3d(8, 16, (2, 3, 3), (1, 2, 2), 1)
            self.pool = RunningMean()
            self.fc = nn.Linear(16, classes)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            f = F.relu(self.conv1(x))
            gate = torch.sigmoid(self.se_mean(spatial_mean(f)))
            h = F.relu(self.conv2(f * gate[..., None, None]))
            return self.fc(self.pool(spatial_mean(h)).transpose(1, -1)).transpose(1, -1)

    torch.manual_seed(0)
    return TwoMeans().eval()


_BUILT: dict[str, Path] = {}
# More than the profiles' default 256: these random-weight nets have content-dependent activation
# peaks, and minmax ranges from 256 frames miss some (measured on the d-resnet: mean INT8 error
# 0.35 with 256 frames, 0.08 with 512, on logits spanning about ±8).
CALIB_FRAMES = 512


def built_artifact(kind: str, root: Path) -> Path:
    """Export ``kind`` ("dresnet" or "stateful") once per test process and add its precisions.

    The d-resnet is calibrated from a video file, the stateful net from a folder of two videos
    (one stream each), both lossless and on streams other than the ones tests measure.
    """
    if kind in _BUILT:
        return _BUILT[kind]
    from edge3d.exporters.onnx import export_artifact
    from edge3d.exporters.precision import add_precisions

    root.mkdir(parents=True, exist_ok=True)
    if kind == "dresnet":
        model = tiny_dresnet()
        source = write_video(root / "calib.avi", [f for f, _ in pattern_stream(600, seed=77)])
        profiles = ["fp16", "int8", "int8-lowmem", "int8-cpu"]
    elif kind == "stateful":
        model = stateful_net()
        folder = root / "calib_videos"
        folder.mkdir(exist_ok=True)
        write_video(folder / "a.avi", [f for f, _ in pattern_stream(300, seed=78)])
        write_video(folder / "b.avi", [f for f, _ in pattern_stream(300, seed=79)])
        source = folder
        profiles = ["fp16", "int8", "int8-lowmem"]
    else:
        raise KeyError(kind)
    art = export_artifact(model, root, kind, frame_size=32)
    # the stateful net: every frame of both videos after the warm-ups, 2 x (300 - 16); each video gives
    # an equal share, so 512 would leave out the last 28 frames of each
    add_precisions(art, profiles, calib_source=str(source), calib_frames=CALIB_FRAMES if kind == "dresnet" else 568)
    _BUILT[kind] = art
    return art
