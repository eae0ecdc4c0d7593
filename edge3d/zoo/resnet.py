"""ResNet-family streaming models: Dissected 3D ResNets, RCN, causal TSM and TAM ResNet-18.

All models share one skeleton (stem, four stages, per-frame features, a temporal head) and
are written so their forward works on clips (N, C, T, H, W) and on single frames (N, C, H, W):
every op is either a streaming layer or acts on channel and trailing spatial axes only. That
is what lets the exported step graph carry no rank-5 tensor at all.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..nn import (
    BatchNorm3d,
    CausalConv3d,
    CausalTemporalAggregation,
    FrameHistory,
    GRUHead,
    LSTMHead,
    RecurrentConv,
    SpatialMaxPool3d,
    TemporalShift,
    spatial_mean,
)


def scaled(channels: int, width: float) -> int:
    """Channel count under a width multiplier; never below 1."""
    return max(1, int(round(channels * width)))


def conv(cin: int, cout: int, k: int, kt: int = 1, stride: int = 1, padding: int = 0,
         recurrent: bool = False) -> nn.Module:
    """A (kt×k×k) causal conv, or an RCN recurrent unit where the model replaces 3D convs."""
    if recurrent:
        return RecurrentConv(cin, cout, k, stride, padding, bias=False)
    return CausalConv3d(cin, cout, (kt, k, k), (1, stride, stride), padding, bias=False)


def shortcut_a(x: torch.Tensor, stride: int, cout: int) -> torch.Tensor:
    """Parameter-free (type A) shortcut: subsample space, zero-pad channels."""
    if stride > 1:
        x = x[..., ::stride, ::stride]
    extra = cout - x.shape[1]
    if extra > 0:
        x = F.pad(x, [0, 0] * (x.dim() - 2) + [0, extra])
    return x


class BasicBlock(nn.Module):
    """Two 3×3 convs and a spatial skip; ``kt_first`` is the first conv's temporal kernel.

    D-ResNet uses kt_first=2 (the temporal skip: concat of the cached previous volume and the
    current one) and 1 for the second conv. ``temporal`` inserts a module (TSM shift or TAM) at
    the start of the residual branch.
    """

    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int, kt_first: int = 1, shortcut: str = "B",
                 recurrent: bool = False, temporal: Callable[[int], nn.Module] | None = None) -> None:
        super().__init__()
        self.temporal = temporal(cin) if temporal else None
        self.conv1 = conv(cin, planes, 3, kt_first, stride, 1, recurrent)
        self.bn1 = BatchNorm3d(planes)
        self.conv2 = conv(planes, planes, 3, 1, 1, 1, recurrent)
        self.bn2 = BatchNorm3d(planes)
        self.stride, self.cout, self.shortcut = stride, planes, shortcut
        self.downsample = None
        if shortcut == "B" and (stride != 1 or cin != planes):
            self.downsample = nn.Sequential(conv(cin, planes, 1, 1, stride), BatchNorm3d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.temporal(x) if self.temporal is not None else x
        out = F.relu(self.bn1(self.conv1(out)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            skip = self.downsample(x)
        else:
            skip = shortcut_a(x, self.stride, self.cout)
        return F.relu(out + skip)


class Bottleneck(nn.Module):
    """1×1, 3×3 (temporal kernel ``kt_mid``), 1×1 with a 4× expansion and a projection skip."""

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int, kt_mid: int = 1, shortcut: str = "B",
                 recurrent: bool = False, temporal: Callable[[int], nn.Module] | None = None) -> None:
        super().__init__()
        cout = planes * self.expansion
        self.temporal = temporal(cin) if temporal else None
        self.conv1 = conv(cin, planes, 1, 1, 1, 0, recurrent)
        self.bn1 = BatchNorm3d(planes)
        self.conv2 = conv(planes, planes, 3, kt_mid, stride, 1, recurrent)
        self.bn2 = BatchNorm3d(planes)
        self.conv3 = conv(planes, cout, 1, 1, 1, 0, recurrent)
        self.bn3 = BatchNorm3d(cout)
        self.stride, self.cout, self.shortcut = stride, cout, shortcut
        self.downsample = None
        if shortcut == "B" and (stride != 1 or cin != cout):
            self.downsample = nn.Sequential(conv(cin, cout, 1, 1, stride), BatchNorm3d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.temporal(x) if self.temporal is not None else x
        out = F.relu(self.bn1(self.conv1(out)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        skip = self.downsample(x) if self.downsample is not None else shortcut_a(x, self.stride, self.cout)
        return F.relu(out + skip)


class Head(nn.Module):
    """Per-frame features (N, C[, T]) -> class scores (N, K[, T]).

    ``fc``: linear over the last ``history`` frames' features (the D3D fc head); ``lstm`` /
    ``gru``: a 2-layer recurrent head with 1024 hidden units, then a linear layer.
    """

    def __init__(self, kind: str, features: int, num_classes: int, history: int = 16,
                 hidden: int = 1024, layers: int = 2) -> None:
        super().__init__()
        if kind == "fc":
            self.temporal: nn.Module = FrameHistory(history)
            fc_in = history * features
        elif kind in ("lstm", "gru"):
            self.temporal = (LSTMHead if kind == "lstm" else GRUHead)(features, hidden, layers)
            fc_in = hidden
        else:
            raise ValueError(f"unknown head {kind!r}; choose fc, lstm or gru")
        self.fc = nn.Linear(fc_in, num_classes)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        h = self.temporal(f)
        return self.fc(h.transpose(1, -1)).transpose(1, -1)


class StreamingResNet(nn.Module):
    """Stem, four stages, optional 1×1 ``conv_last``, spatial average, temporal head.

    Clip mode: (N, 3, T, H, W) -> (N, num_classes, T), one prediction per frame.
    """

    steps_without_time_axis = True

    def __init__(self, block: type[nn.Module], layers: list[int], *, num_classes: int = 400,
                 width: float = 1.0, stem_kt: int = 3, block_kt: int = 1, shortcut: str = "B",
                 recurrent: bool = False, temporal: Callable[[int], nn.Module] | None = None,
                 conv_last: int | None = None, head: str = "fc", history: int = 16,
                 head_hidden: int = 1024, frame_size: int = 112) -> None:
        super().__init__()
        self.frame_size = frame_size
        c = scaled(64, width)
        self.conv1 = conv(3, c, 7, stem_kt, 2, 3, recurrent)
        self.bn1 = BatchNorm3d(c)
        self.pool = SpatialMaxPool3d(3, 2, 1)
        stages = []
        cin = c
        for i, n in enumerate(layers):
            planes = scaled(64 * 2 ** i, width)
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(block(cin, planes, stride, block_kt, shortcut, recurrent, temporal))
                cin = planes * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.conv_last = None
        if conv_last is not None:
            out = scaled(conv_last, width)
            self.conv_last = nn.Sequential(conv(cin, out, 1), BatchNorm3d(out), nn.ReLU())
            cin = out
        self.feature_dim = cin
        self.head = Head(head, cin, num_classes, history, scaled(head_hidden, width) if width < 1 else head_hidden)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        if self.conv_last is not None:
            x = self.conv_last(x)
        return spatial_mean(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def d_resnet(depth: int, *, num_classes: int = 400, frame_size: int = 112, width: float = 1.0,
             head: str = "fc", history: int = 16) -> StreamingResNet:
    """Dissected 3D ResNet (Köpüklü et al., Table 1): conv1 3×7×7 over the current and two
    previous frames, temporal kernel 2 in the basic block's first conv / the bottleneck's
    middle conv, no temporal downsampling, type-A shortcuts for 18 and type-B for 50/101.
    ``history`` is the number of frames the fc head sees (16 in the paper)."""
    if depth == 18:
        return StreamingResNet(BasicBlock, [2, 2, 2, 2], num_classes=num_classes, width=width, stem_kt=3,
                               block_kt=2, shortcut="A", head=head, history=history, frame_size=frame_size)
    layers = {50: [3, 4, 6, 3], 101: [3, 4, 23, 3]}[depth]
    return StreamingResNet(Bottleneck, layers, num_classes=num_classes, width=width, stem_kt=3, block_kt=2,
                           shortcut="B", conv_last=512, head=head, history=history, frame_size=frame_size)


def rcn_resnet18(*, num_classes: int = 400, frame_size: int = 112, width: float = 1.0,
                 head: str = "fc") -> StreamingResNet:
    """RCN (Singh & Cuzzolin): every spatial conv of ResNet-18 becomes a recurrent conv unit;
    projection shortcuts stay 1×1 convs. Per-frame logits, so the head is a 1-frame linear
    layer unless ``head`` asks for more."""
    return StreamingResNet(BasicBlock, [2, 2, 2, 2], num_classes=num_classes, width=width, stem_kt=1,
                           block_kt=1, shortcut="B", recurrent=True, head=head,
                           history=1 if head == "fc" else 16, frame_size=frame_size)


def tsm_resnet18(*, num_classes: int = 400, frame_size: int = 112, width: float = 1.0,
                 head: str = "fc", history: int | None = None) -> StreamingResNet:
    """Online TSM on a 2D ResNet-18: 1/8 of the channels shifted from the previous frame at the
    start of every residual branch. ``history``: frames the fc head sees (default 1)."""
    return StreamingResNet(BasicBlock, [2, 2, 2, 2], num_classes=num_classes, width=width, stem_kt=1,
                           block_kt=1, shortcut="B", temporal=lambda c: TemporalShift(1 / 8), head=head,
                           history=history or (1 if head == "fc" else 16), frame_size=frame_size)


def tam_resnet18(*, num_classes: int = 400, frame_size: int = 112, width: float = 1.0,
                 head: str = "fc") -> StreamingResNet:
    """Causal TAM on a 2D ResNet-18: a depthwise temporal conv over (t-1, t) at the start of
    every residual branch."""
    return StreamingResNet(BasicBlock, [2, 2, 2, 2], num_classes=num_classes, width=width, stem_kt=1,
                           block_kt=1, shortcut="B", temporal=lambda c: CausalTemporalAggregation(c, 2),
                           head=head, history=1 if head == "fc" else 16, frame_size=frame_size)
