"""Shared helpers: tiny randomised models, so streaming tests cannot pass by accident.

Identity-initialised pieces (RCN's W_hh, TAM's taps) and fresh BatchNorm statistics would
make many layers trivially time-invariant; every test model is randomised first.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")


def randomize(model: torch.nn.Module, seed: int = 0, scale: float = 0.3) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)
            elif name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=g) + 0.5)
    return model.eval()


def stream(step, clip: torch.Tensor) -> torch.Tensor:
    """Run a StepModule over a clip (N, C, T, H, W) frame by frame; outputs stacked on axis 2."""
    states = step.initial_states(clip.shape[0])
    outs = []
    with torch.no_grad():
        for t in range(clip.shape[2]):
            y, *states = step(clip[:, :, t], *states)
            outs.append(y)
    return torch.stack(outs, dim=2)


def assert_close_every_frame(streamed, clip_out, tol: float = 1e-4) -> None:
    a = np.asarray(streamed)
    b = np.asarray(clip_out)
    assert a.shape == b.shape, (a.shape, b.shape)
    scale = max(1.0, float(np.abs(b).max()))
    err = np.abs(a - b).reshape(a.shape[0], a.shape[1], a.shape[2], -1).max(axis=(0, 1, 3))
    assert (err <= tol * scale).all(), f"max error per frame {err}, scale {scale}"


TINY = {"width": 0.125, "num_classes": 5}


def tiny_zoo_cases() -> list[tuple[str, dict]]:
    cases = [(n, {"head": "fc"}) for n in ("d-resnet18", "d-resnet50", "rcn-resnet18", "tsm-resnet18",
                                           "tam-resnet18", "vov3d-m", "vov3d-l")]
    cases += [("d-resnet18", {"head": "lstm"}), ("d-resnet101", {"head": "gru"})]
    return cases
