"""Your own causal video model through edge3d: build it, check it streams, export it, run it.

The model below is an ordinary PyTorch module written for clips ``(N, C, T, H, W)``. What makes
it streamable is only that everything looking across time is an ``edge3d.nn`` layer:

- ``CausalConv3d``: a 3-D conv whose temporal padding is all on the past side;
- ``TemporalShift``: online TSM, a few channels of the previous frame;
- ``GRUHead``: a recurrent head over per-frame features.

Everything else (the per-frame 2-D convs, BatchNorm, the reshapes that fold time into the batch
for them) is plain PyTorch and runs on one frame at a time when edge3d steps the model.

Run it (seconds on two CPU cores)::

    python examples/custom_model.py --out /tmp/custom

It saves a checkpoint, checks that stepping frame by frame equals the clip forward, exports the
artifact and streams 64 frames through it with the torch-free runtime. The same export from the
command line, with the factory ``build`` of this file::

    edge3d export examples/custom_model.py:build --checkpoint /tmp/custom/ck.pt \
        --size 64 --classes 6 -o /tmp/custom
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from torch import nn

import edge3d
from edge3d import nn as enn


class ShiftBlock(nn.Module):
    """TSM-style residual block: shift in time, then a 2-D conv of each frame."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.shift = enn.TemporalShift(fraction=1 / 4)
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, t, h, w = x.shape
        y = self.shift(x)
        y = y.transpose(1, 2).reshape(n * t, c, h, w)  # frames as a batch for the 2-D layers
        y = torch.relu(self.bn(self.conv(y)))
        return x + y.reshape(n, t, c, h, w).transpose(1, 2)


class TinyStreamNet(nn.Module):
    """Causal 3-D stem, two shift blocks, spatial mean, GRU head: (N, 3, T, H, W) -> (N, classes, T)."""

    def __init__(self, num_classes: int = 6, width: float = 1.0) -> None:
        super().__init__()
        c = max(4, int(32 * width))
        # temporal kernel 3 over the past, spatial stride 4: the step caches the last two input frames
        self.stem = enn.CausalConv3d(3, c, (3, 5, 5), stride=(1, 4, 4), padding=(2, 2))
        self.bn = nn.BatchNorm3d(c)
        self.blocks = nn.Sequential(ShiftBlock(c), ShiftBlock(c))
        self.head = enn.GRUHead(c, hidden_size=2 * c, num_layers=1)
        self.fc = nn.Linear(2 * c, num_classes)

    def forward(self, clip: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.stem(clip)))
        x = self.blocks(x)
        feats = enn.spatial_mean(x)  # (N, C, T): one feature vector per frame
        h = self.head(feats)  # (N, 2C, T)
        return self.fc(h.transpose(1, 2)).transpose(1, 2)


def build(num_classes: int = 6, width: float = 1.0) -> TinyStreamNet:
    """The factory `edge3d export examples/custom_model.py:build` calls, with --classes and --width."""
    return TinyStreamNet(num_classes, width)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("custom_out"), help="folder for the checkpoint and artifact")
    p.add_argument("--size", type=int, default=64, help="frame size the artifact takes")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(0)
    model = build().eval()
    with torch.no_grad():  # a stand-in for training: BatchNorm statistics that are not the identity
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.BatchNorm3d)):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    ckpt = args.out / "ck.pt"
    torch.save(model.state_dict(), ckpt)

    # 1. Streaming equals offline, in PyTorch: one frame at a time from the initial state.
    clip = torch.randn(1, 3, 64, args.size, args.size)
    step = edge3d.to_step(model, (3, args.size, args.size))
    states = step.initial_states(batch=1)
    streamed = []
    with torch.no_grad():
        offline = model(clip)
        for t in range(clip.shape[2]):
            y, *states = step(clip[:, :, t], *states)
            streamed.append(y)
    err = (torch.stack(streamed, dim=2) - offline).abs().max().item()
    print(f"step vs clip forward over 64 frames: max error {err:.2g}")
    print(f"state per stream: {edge3d.inspect(model, args.size)['state_bytes']:,} bytes "
          "(input-frame history apart)")

    # 2. Export (this also checks the step against the clip forward) and run without torch.
    from edge3d.exporters.onnx import export_artifact
    from edge3d.runtime import Session

    artifact = export_artifact(model, args.out, "custom", frame_size=args.size)
    with Session(artifact) as session:
        outs = np.stack([session.step(clip[0, :, t].numpy()) for t in range(clip.shape[2])], axis=1)
        s = session.stats.summary()
        print(f"wrote {artifact}; ONNX Runtime vs PyTorch over 64 frames: max error "
              f"{np.abs(outs - offline[0].numpy()).max():.2g}; {s['ms_p50']:.2f} ms/frame p50, "
              f"cache {session.cache_bytes:,} bytes per stream")
    print(f"checkpoint: {ckpt}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
