"""Layers whose state is a short history of their input: online temporal shift, frame history."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .state import StateSpec, StreamingModule


class TemporalShift(StreamingModule):
    """Online (uni-directional) temporal shift of TSM.

    A fraction of the channels is replaced by the same channels of the previous frame; the
    bidirectional shift of offline TSM would need the next frame, so only the past is used.
    """

    receptive_field = 2

    def __init__(self, fraction: float = 1 / 8) -> None:
        super().__init__()
        if not 0 < fraction <= 1:
            raise ValueError(f"TemporalShift: fraction must be in (0, 1], got {fraction}")
        self.fraction = fraction

    def fold(self, channels: int) -> int:
        return max(1, int(channels * self.fraction))

    def extra_repr(self) -> str:
        return f"fraction={self.fraction}"

    def forward_clip(self, x: torch.Tensor) -> torch.Tensor:
        f = self.fold(x.shape[1])
        past = x[:, :f]
        pad = [0, 0] * (x.dim() - 3) + [1, 0]
        shifted = F.pad(past, pad)[:, :, : x.shape[2]]
        return torch.cat([shifted, x[:, f:]], dim=1)

    def state_specs(self, frame_shape: tuple[int, ...]) -> list[StateSpec]:
        return [StateSpec("shifted", (self.fold(frame_shape[0]), *frame_shape[1:]), kind="ring",
                          doc="shifted channels of the previous frame")]

    def forward_step(self, x: torch.Tensor, *state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        (prev,) = state
        f = prev.shape[1]
        return torch.cat([prev, x[:, f:]], dim=1), x[:, :f]


class FrameHistory(StreamingModule):
    """Concatenate the last K per-frame feature vectors (zeros before the stream starts).

    This is the input of the D3D "fc" head: a linear layer over the last 16 frames' features.
    Clip (N, C, T) -> (N, K·C, T), oldest frame first.
    """

    def __init__(self, frames: int = 16) -> None:
        super().__init__()
        if frames < 1:
            raise ValueError(f"FrameHistory: frames must be >= 1, got {frames}")
        self.frames = frames
        self.receptive_field = frames

    def extra_repr(self) -> str:
        return f"frames={self.frames}"

    def forward_clip(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3:
            raise ValueError(f"FrameHistory expects per-frame features (N, C, T), got {tuple(x.shape)}")
        k, t = self.frames, x.shape[2]
        padded = F.pad(x, (k - 1, 0))
        return torch.cat([padded[:, :, i:i + t] for i in range(k)], dim=1)

    def state_specs(self, frame_shape: tuple[int, ...]) -> list[StateSpec]:
        if self.frames == 1:
            return []
        (c,) = frame_shape
        return [StateSpec("history", ((self.frames - 1) * c,), kind="ring",
                          doc=f"last {self.frames - 1} feature vectors, oldest first")]

    def forward_step(self, x: torch.Tensor, *state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.frames == 1:
            return (x,)
        (hist,) = state
        full = torch.cat([hist, x], dim=1)
        return full, full[:, x.shape[1]:]
