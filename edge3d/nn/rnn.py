"""Recurrent layers: the RCN recurrent convolution unit and LSTM/GRU heads.

Their state is a hidden tensor that the next frame needs, so step mode is exactly one cell
update. Clip mode runs the same recurrence over T, which is what makes streaming equal to
offline by construction.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .conv import _channels, _pair
from .state import StateSpec, StreamingModule


class RecurrentConv(StreamingModule):
    """RCN's recurrent convolution unit: h_t = W_hh * h_{t-1} + W_xh * x_t.

    W_xh is a spatial (1×k×k) convolution of the current frame, W_hh a 1×1 convolution of the
    previous hidden state initialised to the identity (RCN paper, Sec. 4.6), h_{-1} = 0.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        bias: bool = False,
    ) -> None:
        super().__init__()
        owner = f"RecurrentConv({in_channels}, {out_channels})"
        _channels(owner, in_channels=in_channels, out_channels=out_channels)
        k, s = _pair(kernel_size, "kernel_size", owner), _pair(stride, "stride", owner)
        if padding == "same" and s != (1, 1):
            raise ValueError(f"{owner}: padding='same' needs stride 1 (as torch.nn.Conv2d), got stride {s}; pass "
                             "the padding as integers.")
        if isinstance(padding, str) and padding not in ("same", "valid"):
            raise ValueError(f"{owner}: padding {padding!r} is not one of 'same', 'valid' or integers.")
        # "same" and "valid" go to torch's Conv2d as they are: it pads an even kernel's odd row after
        pad = padding if isinstance(padding, str) else _pair(padding, "padding", owner, minimum=0)
        self.xh = nn.Conv2d(in_channels, out_channels, k, s, pad, bias=bias)
        self.hh = nn.Conv2d(out_channels, out_channels, 1, bias=False)
        with torch.no_grad():
            self.hh.weight.copy_(torch.eye(out_channels).view(out_channels, out_channels, 1, 1))
        self.out_channels = out_channels
        self.receptive_field = 0  # unbounded: depends on every frame so far

    def _out_hw(self, h: int, w: int) -> tuple[int, int]:
        (kh, kw), (sh, sw), pad = self.xh.kernel_size, self.xh.stride, self.xh.padding
        if pad == "same":
            return h, w
        ph, pw = (0, 0) if pad == "valid" else pad
        return (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1

    def forward_clip(self, x: torch.Tensor) -> torch.Tensor:
        n, c, t, h, w = x.shape
        xs = self.xh(x.transpose(1, 2).reshape(n * t, c, h, w))
        xs = xs.view(n, t, *xs.shape[1:])
        hidden = torch.zeros_like(xs[:, 0])
        outs = []
        for i in range(t):
            hidden = self.hh(hidden) + xs[:, i]
            outs.append(hidden)
        return torch.stack(outs, dim=2)

    def state_specs(self, frame_shape: tuple[int, ...]) -> list[StateSpec]:
        _, h, w = frame_shape
        return [StateSpec("hidden", (self.out_channels, *self._out_hw(h, w)), kind="recurrent",
                          doc="h_{t-1}")]

    def forward_step(self, x: torch.Tensor, *state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        (hidden,) = state
        hidden = self.hh(hidden) + self.xh(x)
        return hidden, hidden


class _CellHead(StreamingModule):
    """Shared plumbing of the LSTM and GRU heads: per-frame features (N, C, T) -> (N, H, T)."""

    rnn_type: type[nn.RNNBase]
    states_per_layer: tuple[str, ...]

    def __init__(self, input_size: int, hidden_size: int = 1024, num_layers: int = 2) -> None:
        super().__init__()
        self.rnn = self.rnn_type(input_size, hidden_size, num_layers, batch_first=True)
        self.hidden_size, self.num_layers = hidden_size, num_layers
        self.receptive_field = 0

    def forward_clip(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3:
            raise ValueError(f"{type(self).__name__} expects per-frame features (N, C, T), got {tuple(x.shape)}")
        y, _ = self.rnn(x.transpose(1, 2))
        return y.transpose(1, 2)

    def state_specs(self, frame_shape: tuple[int, ...]) -> list[StateSpec]:
        return [StateSpec(f"{s}{i}", (self.hidden_size,), kind="recurrent")
                for i in range(self.num_layers) for s in self.states_per_layer]

    def _weights(self, layer: int) -> tuple[torch.Tensor, ...]:
        r = self.rnn
        return (getattr(r, f"weight_ih_l{layer}"), getattr(r, f"weight_hh_l{layer}"),
                getattr(r, f"bias_ih_l{layer}"), getattr(r, f"bias_hh_l{layer}"))


class LSTMHead(_CellHead):
    """Multi-layer LSTM over per-frame features (the D3D ``lstm`` head: 2 layers, 1024 hidden)."""

    rnn_type = nn.LSTM
    states_per_layer = ("h", "c")

    def forward_step(self, x: torch.Tensor, *state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        new: list[torch.Tensor] = []
        for layer in range(self.num_layers):
            h, c = state[2 * layer], state[2 * layer + 1]
            w_ih, w_hh, b_ih, b_hh = self._weights(layer)
            gates = F.linear(x, w_ih, b_ih) + F.linear(h, w_hh, b_hh)
            i, f, g, o = gates.chunk(4, dim=1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            new += [h, c]
            x = h
        return (x, *new)


class GRUHead(_CellHead):
    """Multi-layer GRU over per-frame features."""

    rnn_type = nn.GRU
    states_per_layer = ("h",)

    def forward_step(self, x: torch.Tensor, *state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        new: list[torch.Tensor] = []
        for layer in range(self.num_layers):
            h = state[layer]
            w_ih, w_hh, b_ih, b_hh = self._weights(layer)
            gi, gh = F.linear(x, w_ih, b_ih), F.linear(h, w_hh, b_hh)
            ir, iz, inn = gi.chunk(3, dim=1)
            hr, hz, hn = gh.chunk(3, dim=1)
            r, z = torch.sigmoid(ir + hr), torch.sigmoid(iz + hz)
            n = torch.tanh(inn + r * hn)
            h = (1 - z) * n + z * h
            new.append(h)
            x = h
        return (x, *new)
