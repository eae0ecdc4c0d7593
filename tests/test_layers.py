"""Streaming equals offline for randomly configured layers, plus the errors for what can't stream."""

from __future__ import annotations

import random
import re

import pytest
import torch
from conftest import assert_causal, assert_close_every_frame, randomize, stream
from torch import nn

import edge3d
from edge3d import nn as enn
from edge3d.convert import UnsupportedModelError


def random_conv(rng: random.Random) -> tuple[nn.Module, int]:
    cin = rng.choice([2, 4, 6])
    groups = rng.choice([1, 2, cin])
    cout = groups * rng.choice([1, 2, 3])
    kt, dt = rng.choice([1, 2, 3, 4]), rng.choice([1, 2, 3])
    k = rng.choice([1, 3])
    return enn.CausalConv3d(cin, cout, (kt, k, k), stride=(1, rng.choice([1, 2]), 1), padding=k // 2,
                            dilation=(dt, 1, 1), groups=groups, bias=rng.random() < 0.5), cin


@pytest.mark.parametrize("seed", range(12))
def test_random_causal_conv_streams_like_clip(seed: int) -> None:
    rng = random.Random(seed)
    layer, cin = random_conv(rng)
    model = randomize(nn.Sequential(layer, nn.ReLU(), enn.CausalConv3d(layer.out_channels, 3, (2, 3, 3),
                                                                           padding=1)), seed)
    clip = torch.randn(2, cin, 26, 9, 8)
    with torch.no_grad():
        ref = model(clip)
    step = edge3d.to_step(model, (cin, 9, 8))
    assert_close_every_frame(stream(step, clip), ref)


@pytest.mark.parametrize("seed", range(6))
def test_random_stack_of_every_layer_family(seed: int) -> None:
    rng = random.Random(seed)
    c = rng.choice([8, 16])
    model = nn.Sequential(
        enn.CausalConv3d(3, c, (rng.choice([1, 2, 3]), 3, 3), padding=1),
        enn.BatchNorm3d(c), nn.ReLU(),
        enn.TemporalShift(rng.choice([1 / 8, 1 / 4, 1 / 2])),
        enn.CausalTemporalAggregation(c, rng.choice([2, 3])),
        enn.RecurrentConv(c, c, 3, stride=rng.choice([1, 2]), padding=1),
        enn.RunningMean(),
        enn.SpatialMaxPool3d(3, 2, 1),
    )
    randomize(model, seed)
    clip = torch.randn(2, 3, 24, 12, 12)
    with torch.no_grad():
        ref = model(clip)
    assert_close_every_frame(stream(edge3d.to_step(model, (3, 12, 12)), clip), ref)


class Features(nn.Module):
    """A custom model with forward code written for clip tensors (time on axis 2)."""

    def __init__(self, head: str) -> None:
        super().__init__()
        self.conv = enn.CausalConv3d(3, 6, (3, 3, 3), padding=1)
        self.history = enn.FrameHistory(4)
        self.rnn = enn.LSTMHead(24, 10, 2) if head == "lstm" else enn.GRUHead(24, 10, 3)
        self.mean = enn.RunningMean()
        self.fc = nn.Linear(10, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = torch.relu(self.conv(x)).mean(dim=(3, 4))  # (N, C, T)
        h = self.mean(self.rnn(self.history(f)))
        return self.fc(h.transpose(1, 2)).transpose(1, 2)  # (N, K, T)


@pytest.mark.parametrize("head", ["lstm", "gru"])
def test_custom_clip_forward_code_streams(head: str) -> None:
    model = randomize(Features(head), 3)
    clip = torch.randn(3, 3, 30, 8, 8)
    with torch.no_grad():
        ref = model(clip)
    step = edge3d.to_step(model, (3, 8, 8))
    assert step.keep_time
    assert_close_every_frame(stream(step, clip), ref)
    kinds = {s.name: s.kind for s in step.state_specs}
    assert kinds["mean.sum"] == "accumulator" and kinds["rnn.h0"] == "recurrent"
    assert kinds["conv.cache"] == "ring" and step.state_specs[0].input_history


def test_running_mean_keeps_all_axes_but_time() -> None:
    rm = enn.RunningMean()
    for shape in [(2, 3, 7), (2, 3, 7, 4), (2, 3, 7, 4, 5)]:
        x = torch.randn(shape)
        y = rm(x)
        assert y.shape == x.shape
        torch.testing.assert_close(y[:, :, 3], x[:, :, :4].mean(dim=2))


def test_running_mean_streams_a_long_static_clip_exactly() -> None:
    """Step mode equals clip mode over 30,000 frames of a static scene (clip mode's cumsum
    accumulates in float64). A plain float32 running sum was 1.9e-4 to 3e-4 off here."""
    levels = torch.tensor([0.1, 0.3, 0.7, 1.3])
    clip = levels.view(1, 4, 1, 1, 1).expand(1, 4, 30_000, 1, 1)
    model = nn.Sequential(enn.RunningMean())
    with torch.no_grad():
        ref = model(clip)
    out = stream(edge3d.to_step(model, (4, 1, 1)), clip)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=0)
    torch.testing.assert_close(out[0, :, -1, 0, 0], levels, rtol=1e-6, atol=0)


@pytest.mark.parametrize("layer, rank", [
    (enn.CausalConv3d(2, 3, (3, 1, 1), dilation=(2, 1, 1)), 5),
    (enn.CausalTemporalAggregation(2, 3), 5),
    (enn.TemporalShift(1 / 2), 5),
    (enn.FrameHistory(4), 3),
    (enn.RunningMean(), 3),
    (enn.RecurrentConv(2, 2, 1), 5),
    (enn.GRUHead(2, 3, 1), 3),
    (enn.LSTMHead(2, 3, 2), 3),
], ids=lambda v: type(v).__name__ if isinstance(v, nn.Module) else None)
def test_declared_receptive_field_is_what_the_layer_reads(layer: nn.Module, rank: int) -> None:
    """A change to frame 3 reaches outputs 3 .. 3 + receptive_field - 1 and no later one (every later
    one if 0). A dilated layer skips frames inside that span, so the span's ends are what is checked.
    Outputs a layer does not compute from frame 3 are bitwise equal, so any difference counts."""
    randomize(layer, 1)
    shape = (1, 2, 16, 3, 3) if rank == 5 else (1, 2, 16)
    x = torch.randn(shape)
    bumped = x.clone()
    bumped[:, :, 3] += 1.0
    with torch.no_grad():
        diff = (layer(bumped) - layer(x)).abs().flatten(3 if rank == 5 else 2).amax(dim=(0, 1, -1)) \
            if rank == 5 else (layer(bumped) - layer(x)).abs().amax(dim=(0, 1))
    changed = [t for t in range(16) if diff[t] > 0]
    rf = layer.receptive_field
    assert changed[0] == 3 and changed[-1] == (15 if rf == 0 else 3 + rf - 1), (rf, changed)


def test_initial_state_equals_zero_padding() -> None:
    conv = randomize(nn.Sequential(enn.CausalConv3d(2, 3, (3, 1, 1), dilation=(2, 1, 1))))
    clip = torch.randn(1, 2, 5, 2, 2)
    padded = torch.cat([torch.zeros(1, 2, 4, 2, 2), clip], dim=2)
    ref = nn.functional.conv3d(padded, conv[0].weight, conv[0].bias, dilation=(2, 1, 1))
    torch.testing.assert_close(conv(clip), ref)


def test_state_specs_bytes_and_initial_states() -> None:
    step = edge3d.to_step(nn.Sequential(enn.CausalConv3d(4, 4, (3, 3, 3), padding=1)), (4, 10, 6))
    (spec,) = step.state_specs
    assert spec.shape == (8, 10, 6) and spec.bytes == 8 * 10 * 6 * 4
    (s0,) = step.initial_states(5)
    assert s0.shape == (5, 8, 10, 6) and float(s0.abs().sum()) == 0.0


def test_causality_of_layers() -> None:
    model = randomize(nn.Sequential(enn.CausalConv3d(3, 4, (3, 3, 3), padding=1), enn.TemporalShift(),
                                    enn.RecurrentConv(4, 4, 3, padding=1), enn.RunningMean()))
    assert_causal(model, torch.randn(1, 3, 20, 6, 6), 11, 1e-3)


class Wrapped(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Identity(), inner)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


@pytest.mark.parametrize(
    "inner, fragment",
    [
        (nn.Conv3d(3, 3, (3, 3, 3), padding=1), "block.1: torch.nn.Conv3d with temporal kernel 3"),
        (nn.MaxPool3d((2, 2, 2)), "block.1: MaxPool3d pools over time"),
        (nn.AdaptiveAvgPool3d(1), "block.1: AdaptiveAvgPool3d averages over the whole clip"),
    ],
)
def test_unsupported_layers_name_the_module_path(inner: nn.Module, fragment: str) -> None:
    with pytest.raises(UnsupportedModelError, match=fragment.replace("(", r"\(")):
        edge3d.to_step(Wrapped(inner), (3, 8, 8))


class Pooled(nn.Module):
    """A clip classifier, (N, classes), or a per-frame one laid out (N, T, classes)."""

    def __init__(self, per_frame: bool) -> None:
        super().__init__()
        self.conv, self.fc, self.per_frame = enn.CausalConv3d(3, 4, (2, 1, 1)), nn.Linear(4, 5), per_frame

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = enn.spatial_mean(self.conv(x)).transpose(1, 2)  # (N, T, 4)
        return self.fc(feats if self.per_frame else feats.mean(dim=1))


@pytest.mark.parametrize(("per_frame", "fragment"), [
    (False, "Pooled's forward returns shape (1, 5), with no time axis, and edge3d streams one output per frame"),
    (True, "Pooled's forward returns shape (1, 1, 5) for a one-frame clip, so axis 2 is not its time axis"),
])
def test_an_output_without_a_time_axis_is_named(per_frame: bool, fragment: str) -> None:
    # a clip-level output raised an IndexError from inside the step
    with pytest.raises(UnsupportedModelError, match=re.escape(fragment)):
        edge3d.to_step(Pooled(per_frame), (3, 8, 8))


def test_bad_temporal_stride_and_future_padding_rejected() -> None:
    # Temporal stride >= 2 is a rate change (tests/test_multirate.py); zero is meaningless.
    with pytest.raises(ValueError, match=r"stride must be positive integers, got \(0, 1, 1\)"):
        enn.CausalConv3d(3, 3, 3, stride=(0, 1, 1))
    with pytest.raises(ValueError, match="would look into the future"):
        enn.CausalConv3d(3, 3, 3, padding=(1, 1, 1))


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning")  # torch's reference, below
@pytest.mark.parametrize("kernel, dilation", [((3, 3, 3), 1), ((2, 4, 2), 1), ((3, 2, 3), (2, 2, 3)),
                                              ((1, 5, 4), 1)])
def test_same_padding_is_torchs_spatially_and_causal_in_time(kernel, dilation) -> None:
    """padding='same' (as torch.nn.Conv3d takes it) was refused: "padding must be non-negative
    integers". Even kernels pad their odd row and column after, as torch does."""
    layer = randomize(enn.CausalConv3d(3, 5, kernel, padding="same", dilation=dilation), 1)
    clip = torch.randn(2, 3, 9, 10, 11)
    ref = nn.Conv3d(3, 5, kernel, padding="same", dilation=dilation)
    with torch.no_grad():
        ref.weight.copy_(layer.weight)
        ref.bias.copy_(layer.bias)
        h = layer.history  # torch pads time h // 2 before and the rest after: its frame t + h // 2 is our t
        want = ref(torch.nn.functional.pad(clip, (0, 0, 0, 0, h, 0)))[:, :, h // 2:h // 2 + clip.shape[2]]
        got = layer(clip)
    assert got.shape == (2, 5, 9, 10, 11)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for lower in (True, False):  # the exported 2-D form and the naive Conv3d one
        assert_close_every_frame(stream(edge3d.to_step(layer, (3, 10, 11), lower=lower), clip), got)
    assert enn.CausalConv3d(3, 5, kernel, padding="valid").padding == (0, 0)


@pytest.mark.parametrize("kernel", [3, (2, 4)])
def test_recurrent_conv_takes_same_padding(kernel) -> None:
    layer = randomize(enn.RecurrentConv(3, 4, kernel, padding="same"), 3)
    clip = torch.randn(2, 3, 12, 9, 7)
    with torch.no_grad():
        ref = layer(clip)
    assert ref.shape == (2, 4, 12, 9, 7)
    step = edge3d.to_step(layer, (3, 9, 7))
    assert step.state_specs[0].shape == (4, 9, 7)
    assert_close_every_frame(stream(step, clip), ref)
    assert enn.RecurrentConv(3, 4, 3, padding="valid").state_specs((3, 9, 7))[0].shape == (4, 7, 5)


def test_a_per_frame_torch_conv3d_takes_same_padding() -> None:
    # nn.Conv3d((1, 3, 3), padding="same") pads time by nothing, yet it was refused as "padding s"
    model = randomize(Wrapped(nn.Conv3d(3, 3, (1, 3, 3), padding="same")), 2)
    clip = torch.randn(1, 3, 5, 8, 8)
    with torch.no_grad():
        assert_close_every_frame(stream(edge3d.to_step(model, (3, 8, 8)), clip), model(clip))
    with pytest.raises(UnsupportedModelError, match="temporal kernel 3, stride 1, padding 'same' is not causal"):
        edge3d.to_step(Wrapped(nn.Conv3d(3, 3, (3, 3, 3), padding="same")), (3, 8, 8))


@pytest.mark.parametrize("build, says", [
    (lambda: enn.CausalConv3d(3, 8, 0), "kernel_size must be positive integers, got 0"),
    (lambda: enn.CausalConv3d(3, 8, (2, 0, 3)), "kernel_size must be positive integers, got (2, 0, 3)"),
    (lambda: enn.CausalConv3d(3, 8, 3, dilation=0), "dilation must be positive integers, got 0"),
    (lambda: enn.CausalConv3d(3, 8, 3, padding=-1), "padding must be non-negative integers, got -1"),
    (lambda: enn.CausalConv3d(3, 8, 3, stride=(1, 2, 2), padding="same"), "padding='same' needs spatial stride 1"),
    (lambda: enn.CausalConv3d(3, 8, 3, padding="full"), "padding 'full' is not one of 'same', 'valid' or integers"),
    (lambda: enn.CausalConv3d(3, 8, 2.5), "kernel_size must be positive integers, got 2.5"),
    (lambda: enn.CausalConv3d(0, 8, 3), "in_channels must be a positive integer, got 0"),
    (lambda: enn.CausalConv3d(3, 8, 3, groups=0), "groups must be a positive integer, got 0"),
    (lambda: enn.CausalTemporalAggregation(8, kernel_size=0), "kernel_size must be positive integers"),
    (lambda: enn.RecurrentConv(3, 8, 0), "RecurrentConv(3, 8): kernel_size must be positive integers, got 0"),
    (lambda: enn.RecurrentConv(3, 0, 3), "out_channels must be a positive integer, got 0"),
    (lambda: enn.RecurrentConv(3, 8, 3, stride=2, padding="same"), "padding='same' needs stride 1"),
    (lambda: enn.SpatialMaxPool3d(0), "SpatialMaxPool3d(0): kernel_size must be positive integers, got 0"),
    (lambda: enn.SpatialMaxPool3d(3, stride=0), "stride must be positive integers, got 0"),  # it became 3
    (lambda: enn.SpatialMaxPool3d((3, 3)), "kernel_size must be an int, got (3, 3)"),
])
def test_layer_sizes_that_are_not_positive_are_refused_when_built(build, says: str) -> None:
    """Each of these was accepted: a zero kernel or channel count built an empty weight (a warning at
    most) and failed, or produced nothing, only when the model first ran."""
    with pytest.raises(ValueError, match=re.escape(says)):
        build()


def test_layer_called_twice_is_rejected() -> None:
    conv = enn.CausalConv3d(3, 3, (2, 1, 1))

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = conv

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(self.conv(x))

    with pytest.raises(ValueError, match="conv: a streaming layer was called twice"):
        edge3d.to_step(Twice(), (3, 4, 4))


def test_wrong_number_of_states() -> None:
    step = edge3d.to_step(nn.Sequential(enn.CausalConv3d(3, 3, (2, 1, 1))), (3, 4, 4))
    with pytest.raises(ValueError, match="expects 1 state tensors"):
        step(torch.zeros(1, 3, 4, 4))
