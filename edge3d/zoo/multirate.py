"""Multi-rate zoo models: a causal R3D-18 with temporal strides, and the SGS paper's 3D ResNet-18.

Both are written like the other zoo models (clip (N, C, T, H, W) and frame (N, C, H, W) run
the same forward, ``steps_without_time_axis = True``); ``to_step`` turns them into staged step
modules because their frame rate changes inside.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from ..nn import BatchNorm3d, CausalConv3d, SpatialMaxPool3d, spatial_mean
from ..nn.sgs import SimilarityGuidedSampling
from .resnet import scaled


class R3DBlock(nn.Module):
    """Basic block of R3D-18 with 3×3×3 causal convs; ``stride`` applies to time and space.

    The skip is a 1×1×1 projection with the same temporal stride whenever the block changes
    rate or width (type B): a parameter-free skip would cross the rate change without a
    strided layer, which the staged step module rejects.
    """

    def __init__(self, cin: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = CausalConv3d(cin, planes, 3, (stride, stride, stride), 1, bias=False)
        self.bn1 = BatchNorm3d(planes)
        self.conv2 = CausalConv3d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = BatchNorm3d(planes)
        self.downsample = None
        if stride != 1 or cin != planes:
            self.downsample = nn.Sequential(CausalConv3d(cin, planes, 1, (stride, stride, stride), bias=False),
                                            BatchNorm3d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        skip = self.downsample(x) if self.downsample is not None else x
        return F.relu(out + skip)


class R3D18Causal(nn.Module):
    """Causal 3D ResNet-18 (Hara et al.'s R3D-18 layout): stem 3×7×7 (spatial stride 2), max pool,
    res2 at the input rate, and temporal stride 2 at the start of res3, res4 and res5.

    Clip (N, 3, T, H, W) -> (N, num_classes, T // 8): output j ends at frame 8j + 7.
    """

    steps_without_time_axis = True

    def __init__(self, *, num_classes: int = 400, width: float = 1.0, frame_size: int = 112) -> None:
        super().__init__()
        self.frame_size = frame_size
        c = scaled(64, width)
        self.conv1 = CausalConv3d(3, c, (3, 7, 7), (1, 2, 2), 3, bias=False)
        self.bn1 = BatchNorm3d(c)
        self.pool = SpatialMaxPool3d(3, 2, 1)
        cin, stages = c, []
        for i in range(4):
            planes = scaled(64 * 2 ** i, width)
            s = 1 if i == 0 else 2
            stages.append(nn.Sequential(R3DBlock(cin, planes, s), R3DBlock(planes, planes, 1)))
            cin = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        f = spatial_mean(x)
        return self.fc(f.transpose(1, -1)).transpose(1, -1)


def r3d18_causal(*, num_classes: int = 400, frame_size: int = 112, width: float = 1.0,
                 head: str = "fc") -> R3D18Causal:
    """Causal R3D-18 with temporal stride 2 in res3-res5 (8 input frames per output)."""
    return R3D18Causal(num_classes=num_classes, width=width, frame_size=frame_size)


class BottleneckT(nn.Module):
    """Table A.1 bottleneck: [kt×1×1, p; 1×3×3, p (spatial stride); 1×1×1, out], projection skip."""

    def __init__(self, cin: int, planes: int, cout: int, stride: int, kt: int) -> None:
        super().__init__()
        self.conv1 = CausalConv3d(cin, planes, (kt, 1, 1), bias=False)
        self.bn1 = BatchNorm3d(planes)
        self.conv2 = CausalConv3d(planes, planes, (1, 3, 3), (1, stride, stride), 1, bias=False)
        self.bn2 = BatchNorm3d(planes)
        self.conv3 = CausalConv3d(planes, cout, 1, bias=False)
        self.bn3 = BatchNorm3d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(CausalConv3d(cin, cout, 1, (1, stride, stride), bias=False),
                                            BatchNorm3d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        skip = self.downsample(x) if self.downsample is not None else x
        return F.relu(out + skip)


class _Frames(nn.Sequential):
    """The causal part before SGS; steps on frames like the other zoo models."""

    steps_without_time_axis = True


class SGSResNet18(nn.Module):
    """The SGS paper's modified 3D ResNet-18 (Table A.1), causal before SGS, SGS after res2.

    conv1 5×7×7 (8 ch, spatial stride 2), pool1 1×3×3 max, res2 [3×1×1, 8; 1×3×3, 8; 1×1×1, 32]×2,
    SGS over chunks of K frames (B = K bins, L = 8), then res3 [64, 64, 256]×2, res4
    [128, 128, 512]×2, res5 [3×1×1 256, 256, 1024]×2 (spatial stride 2 at res3-5), global
    average pool, fc. After SGS every chunk is its own short clip of B' bins: the temporal convs
    of res5 see only that chunk's bins (zero before its first bin), and the temporal pooling
    averages over its B' bins. Clip (N, 3, T, H, W) -> (N, num_classes, T // K).
    """

    def __init__(self, *, num_classes: int = 400, width: float = 1.0, frame_size: int = 112, chunk: int = 8,
                 bins: int | None = None, embed_dim: int = 8) -> None:
        super().__init__()
        self.frame_size = frame_size
        w = lambda c: scaled(c, width)  # noqa: E731
        c1 = w(8)
        self.pre = _Frames(OrderedDict([
            ("conv1", CausalConv3d(3, c1, (5, 7, 7), (1, 2, 2), 3, bias=False)),
            ("bn1", BatchNorm3d(c1)), ("relu", nn.ReLU()), ("pool1", SpatialMaxPool3d(3, 2, 1)),
            ("res2", nn.Sequential(BottleneckT(c1, w(8), w(32), 1, 3), BottleneckT(w(32), w(8), w(32), 1, 3))),
        ]))
        self.sgs = SimilarityGuidedSampling(w(32), embed_dim, bins or chunk, chunk)
        blocks, cin = [], w(32)
        for planes, cout, kt in ((64, 256, 1), (128, 512, 1), (256, 1024, 3)):
            blocks += [BottleneckT(cin, w(planes), w(cout), 2, kt), BottleneckT(w(cout), w(planes), w(cout), 1, kt)]
            cin = w(cout)
        self.post = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, num_classes)

    def pool_features(self, y: torch.Tensor) -> torch.Tensor:
        return spatial_mean(y)

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The dynamic reference: per chunk and per sample, SGS keeps a variable number B' of bins."""
        f = self.pre(x)
        K = self.sgs.chunk
        outs = []
        for j in range(f.shape[2] // K):
            chunk = f[:, :, j * K:(j + 1) * K]
            per_sample = []
            for n in range(f.shape[0]):
                bins, mask = self.sgs(chunk[n:n + 1])
                y = self.post(self.sgs.select(bins, mask))
                per_sample.append(self.classify(self.pool_features(y).mean(dim=2)))
            outs.append(torch.cat(per_sample, dim=0))
        return torch.stack(outs, dim=2)

    def bins_used(self, x: torch.Tensor) -> torch.Tensor:
        """B' per sample and chunk (N, T // K) of the dynamic reference."""
        f = self.pre(x)
        K = self.sgs.chunk
        return torch.stack([self.sgs(f[:, :, j * K:(j + 1) * K])[1].sum(1) for j in range(f.shape[2] // K)], 1)


def sgs_resnet18(*, num_classes: int = 400, frame_size: int = 112, width: float = 1.0, head: str = "fc",
                 chunk: int = 8) -> SGSResNet18:
    """SGS 3D ResNet-18 (Table A.1) with SGS after res2 in chunk mode, K = B = ``chunk``."""
    return SGSResNet18(num_classes=num_classes, width=width, frame_size=frame_size, chunk=chunk)
