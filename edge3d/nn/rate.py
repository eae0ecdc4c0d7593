"""Rate-changing layers: causal temporal pooling with a stride.

Alignment shared by every strided layer (``CausalConv3d`` with temporal stride included):
a layer with temporal kernel k, dilation d and stride s emits its j-th output once input
frame j·s + s − 1 has arrived, computed from frames up to that one only::

    y_j = reduce_i x[j·s + s − 1 − (k−1−i)·d]      (frames before 0 are padding)

So output j is as fresh as possible (it ends at the newest frame of its group), and a clip of
T frames gives floor(T / s) outputs. Everything downstream runs s times slower; ``to_step``
splits such a model into stages (see :mod:`edge3d.staged`).
"""

from __future__ import annotations

import torch

from .conv import window_history, window_taps
from .state import StateSpec, StreamingModule

#: padding for max pooling: the lowest float32, so max() ignores frames before 0 without -inf
#: (which JSON manifests and some graph compilers handle badly).
LOWEST = float(torch.finfo(torch.float32).min)


class CausalTemporalPool(StreamingModule):
    """Average or max over the last ``kernel`` frames, every ``stride`` frames.

    ``mode="avg"`` counts frames before 0 as zeros (divides by k, like the causal conv's zero
    padding); ``mode="max"`` ignores them. Works on clips of any rank >= 3 (N, C, T, ...).
    With ``stride == 1`` it is an ordinary single-rate layer with a (k−1)-frame cache.
    """

    def __init__(self, kernel: int, stride: int | None = None, mode: str = "avg") -> None:
        super().__init__()
        if mode not in ("avg", "max"):
            raise ValueError(f"CausalTemporalPool: mode must be 'avg' or 'max', got {mode!r}")
        stride = kernel if stride is None else stride
        if kernel < 1 or stride < 1:
            raise ValueError(f"CausalTemporalPool: kernel and stride must be >= 1, got {kernel}, {stride}")
        self.kernel, self.temporal_stride, self.mode = kernel, stride, mode
        self.receptive_field = kernel
        self.pad_value = 0.0 if mode == "avg" else LOWEST

    def extra_repr(self) -> str:
        return f"kernel={self.kernel}, stride={self.temporal_stride}, mode={self.mode!r}"

    def _reduce(self, taps: list[torch.Tensor]) -> torch.Tensor:
        y = taps[0]
        for t in taps[1:]:
            y = (y + t) if self.mode == "avg" else torch.maximum(y, t)
        return y / self.kernel if self.mode == "avg" else y

    def forward_clip(self, x: torch.Tensor) -> torch.Tensor:
        k, s = self.kernel, self.temporal_stride
        pad = x.new_full((x.shape[0], x.shape[1], k - 1, *x.shape[3:]), self.pad_value)
        xp = torch.cat([pad, x], dim=2)[:, :, s - 1:]
        win = xp.unfold(2, k, s)  # (N, C, T_out, ..., k)
        return win.mean(-1) if self.mode == "avg" else win.amax(-1)

    # single-rate step (stride 1)
    def state_specs(self, frame_shape: tuple[int, ...]) -> list[StateSpec]:
        if self.kernel == 1:
            return []
        c, *rest = frame_shape
        return [StateSpec("cache", ((self.kernel - 1) * c, *rest), init=self.pad_value, kind="ring",
                          doc=f"last {self.kernel - 1} input frames, oldest first")]

    def forward_step(self, x: torch.Tensor, *state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.temporal_stride != 1:
            raise ValueError("CausalTemporalPool with stride > 1 steps through a staged step module (to_step).")
        if self.kernel == 1:
            return (x,)
        c = x.shape[1]
        full = torch.cat([state[0], x], dim=1)
        taps = [full[:, i * c:(i + 1) * c] for i in range(self.kernel)]
        return self._reduce(taps), full[:, c:]

    # multi-rate step (stride s): a window of the last s frames
    @property
    def window_history(self) -> int:
        return window_history(self.kernel, 1, self.temporal_stride)

    def window_state_specs(self, frame_shape: tuple[int, ...]) -> list[StateSpec]:
        h = self.window_history
        if h == 0:
            return []
        c, *rest = frame_shape
        return [StateSpec("cache", (h * c, *rest), init=self.pad_value, kind="ring",
                          doc=f"last {h} input frames before the window, oldest first")]

    def forward_window(self, window: torch.Tensor, *state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        s, h = self.temporal_stride, self.window_history
        c = window.shape[1] // s
        full = torch.cat([state[0], window], dim=1) if h else window
        taps = [full[:, j * c:(j + 1) * c] for j in window_taps(self.kernel, 1, s, h)]
        y = self._reduce(taps)
        return (y, full[:, s * c:]) if h else (y,)
