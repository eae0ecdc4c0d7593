"""Temporal pooling made causal, and the stateless 3-D layers that must also accept frames.

A global average over time needs the future; its causal counterpart is the running mean
of everything seen so far, kept as a float32 running sum and frame count (accumulators stay
float32 in every precision profile: float16 stops counting at 2,048 frames).

A plain float32 sum is not enough for a camera that runs for days. Each addition rounds to the
sum's precision, so once the sum is large every new frame is rounded the same way: the running
mean of a static scene was 0.4-1 % off after 10**6 frames (9 hours at 30 fps) and 9-10 % after
10**7, and the count stops at 2**24 frames (6.5 days), after which the mean grows without bound.
Both the sum and the count are therefore compensated (Kahan summation): a second state per
accumulator carries the low-order part each addition lost and feeds it back into the next one,
which keeps the mean within a few float32 ulps of the exact mean however long the stream runs
(the carried count is exact far beyond 2**24).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .state import StateSpec, StreamingModule


class RunningMean(StreamingModule):
    """Causal global average over time (axis 2 of a clip); every other axis is kept.

    Clip (N, C, T, ...) -> (N, C, T, ...) where output t is the mean of inputs 0..t.
    """

    receptive_field = 0  # unbounded: every frame so far

    def forward_clip(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 3:
            raise ValueError(f"RunningMean expects a clip of rank >= 3 (N, C, T, ...), got {tuple(x.shape)}")
        t = x.shape[2]
        count = torch.arange(1, t + 1, device=x.device, dtype=torch.float32)
        count = count.view(1, 1, t, *([1] * (x.dim() - 3)))
        return (torch.cumsum(x.float(), dim=2) / count).to(x.dtype)

    def state_specs(self, frame_shape: tuple[int, ...]) -> list[StateSpec]:
        return [
            StateSpec("sum", tuple(frame_shape), kind="accumulator", doc="running sum of inputs"),
            StateSpec("sum_carry", tuple(frame_shape), kind="accumulator",
                      doc="what rounding took from the sum, fed back into the next addition"),
            StateSpec("count", (1,), kind="accumulator", doc="frames seen"),
            StateSpec("count_carry", (1,), kind="accumulator",
                      doc="what rounding took from the count (non-zero after 2**24 frames)"),
        ]

    def forward_step(self, x: torch.Tensor, *state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        total, carry, count, count_carry = state
        total, carry = compensated_add(total, carry, x.float())
        count, count_carry = compensated_add(count, count_carry, 1.0)
        denom = count.view(count.shape[0], *([1] * (x.dim() - 1)))
        return (total / denom).to(x.dtype), total, carry, count, count_carry


def compensated_add(total: torch.Tensor, carry: torch.Tensor,
                    x: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of Kahan summation: returns the new sum and the new carry.

    ``carry`` is minus the part of earlier additions that rounding dropped. The order of the
    operations is the algorithm: a compiler that reassociates float additions (fast-math)
    would turn the carry into zero, which is why the tests run the exported graph in ONNX Runtime
    over 50,000 frames.
    """
    y = x - carry
    new_total = total + y
    return new_total, (new_total - total) - y


class BatchNorm3d(nn.BatchNorm3d):
    """``nn.BatchNorm3d`` that also normalises a single frame (N, C, H, W) in step mode."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() not in (4, 5):
            raise ValueError(f"BatchNorm3d expects a 5-D clip or a 4-D frame, got {input.dim()}-D input")


class SpatialMaxPool3d(nn.Module):
    """Max pooling over (H, W) only, as ``MaxPool3d((1, k, k))``, that also accepts a frame."""

    def __init__(self, kernel_size: int, stride: int | None = None, padding: int = 0) -> None:
        super().__init__()
        from .conv import _sizes

        owner = f"SpatialMaxPool3d({kernel_size})"
        (kernel_size,) = _sizes(kernel_size, 1, "kernel_size", owner, 1)
        (stride,) = _sizes(kernel_size if stride is None else stride, 1, "stride", owner, 1)  # 0 became the kernel
        (padding,) = _sizes(padding, 1, "padding", owner, 0)
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, s, p = self.kernel_size, self.stride, self.padding
        if x.dim() == 5:
            return F.max_pool3d(x, (1, k, k), (1, s, s), (0, p, p))
        return F.max_pool2d(x, k, s, p)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"


def spatial_mean(x: torch.Tensor) -> torch.Tensor:
    """Global average over the two trailing spatial axes of a clip or a frame."""
    return x.mean(dim=(-2, -1))
