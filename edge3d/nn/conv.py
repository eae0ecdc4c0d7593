"""Causal temporal convolutions: a Conv3d whose temporal padding is all on the past.

Step mode keeps the last (k-1)·d input frames as a 4-D cache ``(N, (k-1)·d·C, H, W)`` (oldest
frame first on the channel axis). With ``groups == 1`` one Conv2d over the channel-stacked
cache and frame computes the step: TensorRT, DLA, INT8 kernels and ONNX Runtime's CPU
kernels all prefer 2-D convolutions to 5-D ones. Grouped and depthwise convs sum one grouped
Conv2d per temporal tap instead, which needs no rank-6 reshuffle of channels.
"""

from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F
from torch import nn

from .state import StateSpec, StepContext, StreamingModule


def window_history(kernel: int, dilation: int, stride: int) -> int:
    """Input frames a strided layer keeps from before its s-frame window.

    Output j needs frames j·s + s − 1 − (k−1)·d .. j·s + s − 1; the window holds the last s of
    them, so (k−1)·d − (s−1) older frames (never negative) must be cached.
    """
    return max(0, (kernel - 1) * dilation - (stride - 1))


def window_taps(kernel: int, dilation: int, stride: int, history: int) -> list[int]:
    """Frame indices, in concat(cache, window), of the k taps of the newest output (oldest tap first)."""
    last = history + stride - 1
    return [last - (kernel - 1 - i) * dilation for i in range(kernel)]


def _sizes(v: int | tuple[int, ...], n: int, name: str, owner: str, minimum: int) -> tuple[int, ...]:
    """``v`` as n integers of at least ``minimum``: a kernel, stride or dilation of 0 built a layer
    that only failed (or silently produced nothing) at its first call."""
    form = {1: "", 2: " or (h, w)", 3: " or (t, h, w)"}[n]
    sizes = tuple(v) if isinstance(v, (tuple, list)) else (v,) * n
    if len(sizes) != n:
        raise ValueError(f"{owner}: {name} must be an int{form}, got {v!r}")
    if not all(isinstance(x, numbers.Integral) and not isinstance(x, bool) and x >= minimum for x in sizes):
        raise ValueError(f"{owner}: {name} must be {'non-negative' if minimum == 0 else 'positive'} integers, "
                         f"got {v!r}")
    return tuple(int(x) for x in sizes)  # numpy integers included


def _pair(v: int | tuple[int, ...], name: str, owner: str, minimum: int = 1) -> tuple[int, int]:
    return _sizes(v, 2, name, owner, minimum)  # type: ignore[return-value]


def _triple(v: int | tuple[int, ...], name: str, owner: str) -> tuple[int, int, int]:
    return _sizes(v, 3, name, owner, 1)  # type: ignore[return-value]


def _channels(owner: str, groups: int = 1, **counts: int) -> None:
    for name, c in {**counts, "groups": groups}.items():
        if not isinstance(c, numbers.Integral) or isinstance(c, bool) or c < 1:
            raise ValueError(f"{owner}: {name} must be a positive integer, got {c!r}")


class CausalConv3d(StreamingModule):
    """``torch.nn.Conv3d`` with causal temporal padding ((k-1)·d frames on the left, none right).

    ``padding`` is the spatial padding only; temporal padding is implied by causality.

    Temporal stride s > 1 changes the frame rate (see :mod:`edge3d.nn.rate`): output j is
    emitted once input frame j·s + s − 1 has arrived and is computed from frames up to that
    one only, ``y_j = Σ_i w_i · x[j·s + s − 1 − (k−1−i)·d]`` (zero before frame 0). A clip of
    T frames gives floor(T / s) outputs: a trailing incomplete group produces nothing, exactly
    as a stream that stops mid-group. ``to_step`` turns such models into a staged step module
    in which this layer reads a buffer of its last s input frames.
    """

    # the odd row and column of padding="same" after an even kernel: (rows, columns). A class default
    # too, so a layer pickled whole before "same" existed still runs.
    _pad_after: tuple[int, int] = (0, 0)

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int, int],
        stride: int | tuple[int, int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        dilation: int | tuple[int, int, int] = 1,
        groups: int = 1,
        bias: bool = True,
    ) -> None:
        super().__init__()
        owner = f"CausalConv3d({in_channels}, {out_channels}, kernel_size={kernel_size})"
        k = _triple(kernel_size, "kernel_size", owner)
        s = _triple(stride, "stride", owner)
        d = _triple(dilation, "dilation", owner)
        # Spatial "same" as torch.nn.Conv3d pads it (time is causal whatever the string): d·(k−1) in all,
        # half before, the odd one after, which needs stride 1 there; "valid" is no padding.
        if padding == "valid":
            padding = 0
        elif padding == "same":
            if s[1:] != (1, 1):
                raise ValueError(f"{owner}: padding='same' needs spatial stride 1 (as torch.nn.Conv3d), got "
                                 f"stride {s}; pass the spatial padding as integers.")
            total = [di * (ki - 1) for ki, di in zip(k[1:], d[1:], strict=True)]
            padding = tuple(t // 2 for t in total)
            self._pad_after = (total[0] % 2, total[1] % 2)
        elif isinstance(padding, str):
            raise ValueError(f"{owner}: padding {padding!r} is not one of 'same', 'valid' or integers.")
        if isinstance(padding, (tuple, list)) and len(padding) == 3:
            if padding[0] != 0:
                raise ValueError(
                    f"{owner}: temporal padding {padding[0]} would look into the future; "
                    "pass the spatial padding only (ph, pw) - causal padding is added automatically."
                )
            padding = tuple(padding[1:])
        p = _pair(padding, "padding", owner, minimum=0)
        _channels(owner, groups, in_channels=in_channels, out_channels=out_channels)
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"{owner}: channels must be divisible by groups={groups}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding, self.dilation = k, s, p, d
        self.groups = groups
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, *k))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.reset_parameters()
        self.receptive_field = (k[0] - 1) * d[0] + 1
        self.temporal_stride = s[0]

    def reset_parameters(self) -> None:
        # Same initialisation as torch.nn.Conv3d, so swapping one for the other trains the same.
        ref = nn.Conv3d(self.in_channels, self.out_channels, self.kernel_size, groups=self.groups,
                        bias=self.bias is not None)
        with torch.no_grad():
            self.weight.copy_(ref.weight)
            if self.bias is not None:
                self.bias.copy_(ref.bias)

    @property
    def history(self) -> int:
        """Input frames the cache holds."""
        return (self.kernel_size[0] - 1) * self.dilation[0]

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
                f"groups={self.groups}, bias={self.bias is not None}")

    def forward_clip(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, (0, self._pad_after[1], 0, self._pad_after[0], self.history, 0))
        st = self.temporal_stride
        if st > 1:
            # Drop the first s-1 padded frames so that output j ends at input frame j·s + s − 1.
            x = x[:, :, st - 1:]
        return F.conv3d(x, self.weight, self.bias, (st, *self.stride[1:]), (0, *self.padding),
                        self.dilation, self.groups)

    # ----------------------------------------------------------- strided (multi-rate) step
    @property
    def window_history(self) -> int:
        """Frames kept before the s-frame window: only what the oldest tap still needs."""
        return window_history(self.kernel_size[0], self.dilation[0], self.temporal_stride)

    def window_state_specs(self, frame_shape: tuple[int, ...]) -> list[StateSpec]:
        h = self.window_history
        if h == 0:
            return []
        c, hh, ww = frame_shape
        return [StateSpec("cache", (h * c, hh, ww), kind="ring",
                          doc=f"last {h} input frames before the window, oldest first")]

    def forward_window(self, window: torch.Tensor, *state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """One output from the last s input frames (channel-stacked, oldest first) and the cache."""
        kt, dt, s = self.kernel_size[0], self.dilation[0], self.temporal_stride
        h = self.window_history
        c = window.shape[1] // s
        full = torch.cat([state[0], window], dim=1) if h else window
        y = self._conv_frames(full, window_taps(kt, dt, s, h), c)
        return (y, full[:, s * c:]) if h else (y,)

    def state_specs(self, frame_shape: tuple[int, ...]) -> list[StateSpec]:
        if self.history == 0:
            return []
        c, h, w = frame_shape
        return [StateSpec("cache", (self.history * c, h, w), kind="ring",
                          doc=f"last {self.history} input frames, oldest first")]

    def forward_step(self, x: torch.Tensor, *state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        kt, dt = self.kernel_size[0], self.dilation[0]
        if self.history == 0:
            return (self._conv_frames(x, [0], x.shape[1]),)
        (cache,) = state
        c = x.shape[1]
        full = torch.cat([cache, x], dim=1)
        return self._conv_frames(full, [i * dt for i in range(kt)], c), full[:, c:]

    def _conv_frames(self, full: torch.Tensor, idx: list[int], c: int) -> torch.Tensor:
        """The conv output from frames ``idx`` (one per temporal tap) of channel-stacked ``full``.

        groups == 1: one Conv2d with the kernel reshaped time-major over the stacked taps (a
        contiguous slice when the taps are adjacent); grouped: one grouped Conv2d per tap, summed.
        """
        st, pd, dl = self.stride[1:], self.padding, self.dilation[1:]
        if any(self._pad_after):  # the extra row and column of "same" after an even kernel
            full = F.pad(full, (0, self._pad_after[1], 0, self._pad_after[0]))
        taps = [full[:, j * c:(j + 1) * c] for j in idx]
        if self.groups == 1:
            adjacent = all(b - a == 1 for a, b in zip(idx, idx[1:], strict=False))
            stacked = full[:, idx[0] * c:(idx[-1] + 1) * c] if adjacent else torch.cat(taps, dim=1)
            kt = len(idx)
            w2d = self.weight.permute(0, 2, 1, 3, 4).reshape(self.out_channels, kt * c, *self.kernel_size[1:])
            return F.conv2d(stacked, w2d, self.bias, st, pd, dl)
        y = F.conv2d(taps[0], self.weight[:, :, 0], self.bias, st, pd, dl, self.groups)
        for i in range(1, len(taps)):
            y = y + F.conv2d(taps[i], self.weight[:, :, i], None, st, pd, dl, self.groups)
        return y

    def _step_in_context(self, x, state, ctx: StepContext):  # type: ignore[override]
        if ctx.lower or self.history == 0:
            return super()._step_in_context(x, state, ctx)
        # The naive form kept for benchmarks: a rank-5 Conv3d over concat(cache, frame).
        frame = x if ctx.keep_time else x.unsqueeze(2)
        n, c = frame.shape[:2]
        (cache,) = state
        past = cache.reshape(n, self.history, c, *cache.shape[2:]).permute(0, 2, 1, 3, 4)
        full = torch.cat([past, frame], dim=2)
        padded = F.pad(full, (0, self._pad_after[1], 0, self._pad_after[0])) if any(self._pad_after) else full
        y = F.conv3d(padded, self.weight, self.bias, (1, *self.stride[1:]), (0, *self.padding),
                     self.dilation, self.groups)
        new_cache = full[:, :, 1:].permute(0, 2, 1, 3, 4).reshape(cache.shape)
        return (y if ctx.keep_time else y.squeeze(2)), (new_cache,)


class CausalTemporalAggregation(CausalConv3d):
    """TAM made causal: a depthwise temporal conv over the previous and current frames.

    Fan et al.'s temporal aggregation module is a 1-D depthwise convolution over time; with
    ``kernel_size=2`` the taps are (t-1, t), so no future frame is needed.
    """

    def __init__(self, channels: int, kernel_size: int = 2, bias: bool = False) -> None:
        super().__init__(channels, channels, (kernel_size, 1, 1), groups=channels, bias=bias)

    def reset_parameters(self) -> None:
        # Start as identity on the current frame so inserting TAM does not disturb a 2D net.
        with torch.no_grad():
            self.weight.zero_()
            self.weight[:, :, -1] = 1.0
            if self.bias is not None:
                self.bias.zero_()
