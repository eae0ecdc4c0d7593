"""Trained gesture models: the zoo's ``gestures`` (D-ResNet-18) and ``gestures-tsm`` (TSM ResNet-18).

Both are small (width 0.25) causal networks trained on the synthetic gesture streams of
``edge3d.data.gestures`` by ``examples/train_gestures.py``; the checkpoints ship inside the package
(``edge3d/zoo/weights/``, package data), so ``edge3d export gestures`` works from a wheel as from a
checkout. ``SPECS`` is the single source of the architecture
and preprocessing that the training script and the factories share, so the exported manifest
(frame size, mean, std, class names) always matches what the network was trained on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data import gestures as data
from . import ZooEntry, register
from .resnet import StreamingResNet, d_resnet, tsm_resnet18

CHECKPOINTS = Path(__file__).resolve().parent / "weights"

# Normalisation the networks were trained with: (x / 255 - mean) / std per RGB channel.
FRAME_MEAN = (0.5, 0.5, 0.5)
FRAME_STD = (0.25, 0.25, 0.25)

SPECS: dict[str, dict[str, Any]] = {
    "d-resnet18": {"frame_size": 48, "width": 0.25, "head": "fc", "history": 8,
                   "checkpoint": "gestures_d_resnet18.pt"},
    "tsm-resnet18": {"frame_size": 48, "width": 0.25, "head": "fc", "history": 8,
                     "checkpoint": "gestures_tsm_resnet18.pt"},
}


def make_network(arch: str) -> StreamingResNet:
    """The untrained network of ``SPECS[arch]`` (used by training and by the factories)."""
    spec = SPECS[arch]
    kw = {"num_classes": len(data.classes), "frame_size": spec["frame_size"], "width": spec["width"],
          "head": spec["head"], "history": spec["history"]}
    if arch == "d-resnet18":
        return d_resnet(18, **kw)
    if arch == "tsm-resnet18":
        return tsm_resnet18(**kw)
    raise ValueError(f"unknown gesture architecture {arch!r}; choose one of {', '.join(SPECS)}.")


def _build(arch: str, zoo_name: str, options: dict[str, Any]) -> StreamingResNet:
    spec = SPECS[arch]
    expected = {"num_classes": len(data.classes), "frame_size": spec["frame_size"], "width": spec["width"],
                "head": spec["head"]}
    for key, value in options.items():
        if key not in expected:
            raise ValueError(f"{zoo_name} takes no option {key!r}; it is a trained model with fixed "
                             f"{', '.join(expected)}.")
        if value is not None and value != expected[key]:
            from . import SIZE_OPTIONS

            flag = {**SIZE_OPTIONS, "head": "--head"}[key]
            given = "x".join(map(str, value)) if isinstance(value, tuple) else value  # --size HxW as typed
            raise ValueError(f"{zoo_name} was trained with {flag} {expected[key]} ({key} in Python), so "
                             f"{flag} {given} cannot load its checkpoint; leave the option out.")
    path = CHECKPOINTS / spec["checkpoint"]
    if not path.is_file():
        raise ValueError(f"checkpoint {path} is missing; it ships inside the edge3d package (reinstall it), or recreate "
                         f"it with `python3 examples/train_gestures.py --model {arch}`.")
    model = make_network(arch)
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    model.eval()
    model.class_names = list(data.classes)
    model.frame_mean = tuple(float(v) for v in FRAME_MEAN)
    model.frame_std = tuple(float(v) for v in FRAME_STD)
    return model


def build_gestures(**options: Any) -> StreamingResNet:
    """The trained D-ResNet-18 gesture model, ready to export (class names, size, mean/std set)."""
    return _build("d-resnet18", "gestures", options)


def build_gestures_tsm(**options: Any) -> StreamingResNet:
    """The trained TSM ResNet-18 gesture model."""
    return _build("tsm-resnet18", "gestures-tsm", options)


def score(pred: np.ndarray, labels: np.ndarray, skip: int = 8) -> tuple[float, float, int, int]:
    """Held-out metrics: (per-frame accuracy, gesture accuracy, frames counted, gestures counted).

    Per frame: every segment's frames from its ``skip``-th on (a causal model needs a few
    frames of a gesture to know it). Per gesture: majority vote over all frames of each
    gesture segment that ends before the stream does (the last one may be cut short).
    """
    pred, labels = np.asarray(pred).reshape(-1), np.asarray(labels).reshape(-1)
    hit = total = g_hit = g_total = 0
    for a, b, lab in data.gesture_segments(labels):
        hit += int((pred[a + skip:b] == lab).sum())
        total += max(b - a - skip, 0)
        if lab != data.NO_GESTURE and b < labels.size:
            g_hit += int(np.bincount(pred[a:b], minlength=len(data.classes)).argmax() == lab)
            g_total += 1
    return hit / max(total, 1), g_hit / max(g_total, 1), total, g_total


register(ZooEntry("gestures", "edge3d.zoo.gestures:build_gestures",
                  "Trained D-ResNet-18 (width 0.25, 48 px) for the synthetic gesture stream",
                  "dissected-3d-cnns", {}, ("fc",)))
register(ZooEntry("gestures-tsm", "edge3d.zoo.gestures:build_gestures_tsm",
                  "Trained TSM ResNet-18 (width 0.25, 48 px) for the synthetic gesture stream",
                  "deep-analysis-2d-3d-temporal-modules", {}, ("fc",)))
