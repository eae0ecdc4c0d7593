"""Shared helpers: tiny randomised models, so streaming tests cannot pass by accident.

Identity-initialised pieces (RCN's W_hh, TAM's taps) and fresh BatchNorm statistics would
make many layers trivially time-invariant; every test model is randomised first.
"""

from __future__ import annotations

import re

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


def assert_causal(model: torch.nn.Module, clip: torch.Tensor, t: int, min_change: float) -> None:
    """Outputs before frame ``t`` ignore frames from ``t`` on, and later outputs do depend on them
    (by more than ``min_change``), so the check cannot pass on a model that ignores its input."""
    changed = clip.clone()
    changed[:, :, t:] = torch.randn_like(changed[:, :, t:])
    with torch.no_grad():
        ya, yb = model(clip), model(changed)
    torch.testing.assert_close(ya[:, :, :t], yb[:, :, :t])
    assert (ya[:, :, t:] - yb[:, :, t:]).abs().max() > min_change


TINY = {"width": 0.125, "num_classes": 5}


@pytest.fixture(scope="module")
def one_torch_thread():
    """The CI box is small and shared: one intra-op thread is faster than two oversubscribed."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def dresnet(tmp_path_factory):
    """A tiny trained-looking d-resnet18 artifact with every precision (tests/precision_helpers.py)."""
    from precision_helpers import built_artifact

    return built_artifact("dresnet", tmp_path_factory.getbasetemp() / "precision-artifacts")


@pytest.fixture(scope="session")
def stateful(tmp_path_factory):
    """A conv + GRU + RunningMean artifact with every precision (tests/precision_helpers.py)."""
    from precision_helpers import built_artifact

    return built_artifact("stateful", tmp_path_factory.getbasetemp() / "precision-artifacts")


def tiny_zoo_cases(slow_exports: bool = False) -> list:
    """Every zoo model family and head. With ``slow_exports`` the largest graph (VoV3D-L) is marked
    slow: its export takes minutes and adds no layer family that VoV3D-M does not cover in CI."""
    slow = [pytest.mark.slow] if slow_exports else []
    cases = [pytest.param(n, {"head": "fc"}, id=f"{n}-fc") for n in
             ("d-resnet18", "d-resnet50", "rcn-resnet18", "tsm-resnet18", "tam-resnet18", "vov3d-m")]
    cases += [pytest.param("vov3d-l", {"head": "fc"}, id="vov3d-l-fc", marks=slow),
              pytest.param("d-resnet18", {"head": "lstm"}, id="d-resnet18-lstm"),
              pytest.param("d-resnet18", {"head": "gru"}, id="d-resnet18-gru"),
              pytest.param("d-resnet101", {"head": "gru"}, id="d-resnet101-gru")]
    return cases


@pytest.fixture(scope="session")
def stream_artifact(tmp_path_factory: pytest.TempPathFactory):
    """d-resnet18 at width 0.125, 5 classes, 32x32 frames, exported once per run (ten states, ~10 s),
    shared by the multi-stream and Triton tests."""
    from edge3d.exporters.onnx import export_artifact

    from edge3d import zoo

    model = randomize(zoo.build("d-resnet18", **TINY))
    return export_artifact(model, tmp_path_factory.mktemp("artifacts"), "tiny", frame_size=32)


def unwrapped(output: str) -> str:
    """A two-column rich table's text on one line, a value that wrapped onto the next row joined up."""
    return re.sub(r" │ │ │ ", " ", " ".join(output.split()))
