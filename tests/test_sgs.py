"""Similarity-guided sampling: the fixed-shape streaming form equals the dynamic reference.

The dynamic reference drops empty bins (B' varies per chunk) and runs the post-SGS layers on
the B' bins alone; the fixed-shape stage compacts occupied bins to the front and masks. They
must agree on static chunks (one bin), all-different chunks (all bins), all-zero features
(Δ_max = 0, no NaN) and random chunks.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from conftest import randomize
from edge3d.exporters.onnx import export_artifact
from edge3d.runtime import Session

import edge3d
from edge3d import nn as enn
from edge3d import zoo
from edge3d.nn.sgs import SimilarityGuidedSampling, compaction

SIZE, K = 32, 4


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return randomize(zoo.build("sgs-resnet18", width=0.25, num_classes=5, chunk=K), seed=2)


def dynamic(m, chunk: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Reference on one chunk of SGS input features (1, C, K, H, W): logits and B'."""
    with torch.no_grad():
        bins, mask = m.sgs(chunk)
        assert torch.isfinite(bins).all()
        y = m.post(m.sgs.select(bins, mask))
        return m.classify(m.pool_features(y).mean(dim=2)), int(mask.sum())


def fixed(m, chunk: torch.Tensor) -> tuple[torch.Tensor, int]:
    stage = edge3d.to_step(m, (3, SIZE, SIZE)).stages[1]
    window = chunk.permute(0, 2, 1, 3, 4).reshape(1, -1, *chunk.shape[3:])
    with torch.no_grad():
        out, used = stage(window)
    return out, int(used)


def features(m, t: int = K) -> torch.Tensor:
    with torch.no_grad():
        return m.pre(torch.randn(1, 3, t, SIZE, SIZE))


def check(m, chunk: torch.Tensor) -> int:
    ref, b_ref = dynamic(m, chunk)
    out, b = fixed(m, chunk)
    assert b == b_ref
    assert torch.isfinite(out).all()
    assert (out - ref).abs().max() <= 1e-4 * max(1.0, float(ref.abs().max()))
    return b


def test_identical_frames_fill_one_bin(model) -> None:
    f = features(model, 1).repeat(1, 1, K, 1, 1)
    assert check(model, f) == 1


def test_all_zero_features_give_one_bin_and_no_nan(model) -> None:
    f = torch.zeros_like(features(model))
    psi = model.sgs.kernel(torch.zeros(1, K, f.shape[1]))
    assert torch.isfinite(psi).all()
    if model.sgs.magnitudes(torch.zeros(1, K, f.shape[1])).max() == 0:
        assert psi[0, :, 0].tolist() == [1.0] * K  # Δ_max = 0: every frame in bin 1
    assert check(model, f) == 1


def test_all_different_frames_fill_every_bin(model) -> None:
    # Δ_t = v_t exactly (identity embedding on channel 0); v at the bin centres 1, 3, 5 and Δ_max = 2K.
    sgs = model.sgs
    with torch.no_grad():
        for fc in (sgs.fc1, sgs.fc2):
            fc.weight.zero_()
            fc.bias.zero_()
            fc.weight[0, 0] = 1.0
    try:
        f = torch.zeros_like(features(model))
        for t, v in enumerate([2 * i + 1 for i in range(K - 1)] + [2 * K]):
            f[0, 0, t] = v
        assert check(model, f) == K
        # zero-magnitude embeddings everywhere: Δ_max = 0, one bin, no NaN
        assert check(model, torch.zeros_like(f)) == 1
    finally:
        randomize(model, seed=2)


@pytest.mark.parametrize("seed", range(4))
def test_random_chunks(model, seed: int) -> None:
    torch.manual_seed(seed)
    f = features(model) * (1 + 3 * torch.rand(1, 1, K, 1, 1))
    check(model, f)


def test_the_bins_run_as_one_batch_and_equal_the_bins_stepped_one_by_one(model) -> None:
    """The post-SGS layers ran bin by bin, unrolled: every conv 8 times per chunk at batch N, its
    weights read each time. They now run once with the bins folded into the batch; the causal
    convs of res5 (3×1×1) must still see only the bins before each one, zeros before the first."""
    stage = edge3d.to_step(model, (3, SIZE, SIZE)).stages[1]
    assert stage.batch_bins
    torch.manual_seed(5)
    window = (features(model, 2 * K) * (1 + 3 * torch.rand(1, 1, 2 * K, 1, 1)))  # chunks of 1 to K bins
    windows = torch.cat([window[:, :, :K], window[:, :, K:], torch.zeros_like(window[:, :, :K])])
    windows = windows.permute(0, 2, 1, 3, 4).reshape(3, -1, *windows.shape[3:])
    with torch.no_grad():
        batched, used = stage(windows)
        stage.batch_bins = False
        try:
            unrolled, used_unrolled = stage(windows)
        finally:
            stage.batch_bins = True
    assert used.tolist() == used_unrolled.tolist() and len(set(used.tolist())) > 1, used
    torch.testing.assert_close(batched, unrolled, rtol=1e-5, atol=1e-6)


def test_a_dilated_grouped_causal_conv_over_all_bins_equals_the_bins_stepped() -> None:
    """A causal conv after SGS with temporal dilation 2 and groups reads bin j − 2: with every bin
    occupied (the identity embedding of test_all_different_frames_fill_every_bin), both forms agree."""
    m = randomize(zoo.build("sgs-resnet18", width=0.25, num_classes=5, chunk=K), seed=2)
    c = m.post[-1].conv3.out_channels
    m.post = torch.nn.Sequential(*m.post, enn.CausalConv3d(c, c, (2, 3, 3), padding=1, dilation=(2, 1, 1), groups=2))
    randomize(m, seed=3)
    with torch.no_grad():
        for fc in (m.sgs.fc1, m.sgs.fc2):
            fc.weight.zero_()
            fc.bias.zero_()
            fc.weight[0, 0] = 1.0
        f = features(m)
        f[0, 0] = 0.0
        for t, v in enumerate([2 * i + 1 for i in range(K - 1)] + [2 * K]):
            f[0, 0, t] = v
    stage = edge3d.to_step(m, (3, SIZE, SIZE)).stages[1]
    assert stage.batch_bins
    window = f.permute(0, 2, 1, 3, 4).reshape(1, -1, *f.shape[3:])
    with torch.no_grad():
        batched, used = stage(window)
        stage.batch_bins = False
        unrolled, _ = stage(window)
    assert used.tolist() == [K]
    assert (batched - unrolled).abs().max() <= 1e-5 * max(1.0, float(unrolled.abs().max()))
    assert check(m, f) == K  # and the stage equals the dynamic reference


def test_a_post_sgs_layer_the_batch_cannot_run_steps_the_bins_one_by_one(tmp_path) -> None:
    """A temporal shift carries one bin into the next: the stage falls back to stepping the bins."""
    m = randomize(zoo.build("sgs-resnet18", width=0.25, num_classes=5, chunk=K), seed=2)
    m.post = torch.nn.Sequential(enn.TemporalShift(), *m.post)
    randomize(m, seed=2)
    assert not edge3d.to_step(m, (3, SIZE, SIZE)).stages[1].batch_bins
    torch.manual_seed(6)
    check(m, features(m) * (1 + 3 * torch.rand(1, 1, K, 1, 1)))
    # The unrolled steps run one set of weights K times: the graph holds it once (ONNX Runtime's Conv+BN
    # fusion had written a copy per step, K times the parameters)
    art = export_artifact(m, tmp_path, "sgs_shift", frame_size=SIZE)
    params = sum(p.numel() for p in m.parameters())
    weights = json.loads((art / "manifest.json").read_text())["precisions"]["fp32"]["weight_bytes"]
    assert weights <= 1.1 * 4 * params, (weights, params)


def test_compaction_moves_occupied_bins_to_the_front() -> None:
    mask = torch.tensor([[False, True, False, True]])
    p = compaction(mask)[0]
    assert p.tolist() == [[0, 1, 0, 0], [0, 0, 0, 1], [0, 0, 0, 0], [0, 0, 0, 0]]


def test_sgs_kernel_paper_formula_inside_the_range() -> None:
    sgs = SimilarityGuidedSampling(1, 1, bins=4, chunk=4)
    with torch.no_grad():
        for fc in (sgs.fc1, sgs.fc2):
            fc.weight.fill_(1.0)
            fc.bias.zero_()
    delta = torch.tensor([[2.0, 2.5, 4.0, 8.0]])  # Δ_max = 8, γ = 1, β = 1, 3, 5, 7
    psi = sgs.kernel(delta.unsqueeze(-1))[0]
    assert psi[0].tolist() == [0.0, 0.0, 0.0, 0.0]  # on the edge between bins 1 and 2: paper's kernel is 0
    assert psi[1].tolist() == [0.0, 0.5, 0.0, 0.0]
    assert psi[2].tolist() == [0.0, 0.0, 0.0, 0.0]
    assert psi[3].tolist() == [0.0, 0.0, 0.0, 1.0]  # Δ_max clamped to β_B


def test_streaming_sgs_model_equals_dynamic_clip(model) -> None:
    clip = torch.randn(2, 3, 3 * K, SIZE, SIZE)
    clip[:, :, K:2 * K] = clip[:, :, K:K + 1]
    step = edge3d.to_step(model, (3, SIZE, SIZE))
    with torch.no_grad():
        ref = model(clip)
    out, when = step.run_clip(clip)
    assert when == [K - 1, 2 * K - 1, 3 * K - 1]
    assert (out - ref).abs().max() <= 1e-4 * max(1.0, float(ref.abs().max()))


def test_sgs_artifact_equals_dynamic_reference_and_reports_bins(model, tmp_path) -> None:
    art = export_artifact(model, tmp_path, "sgs", frame_size=SIZE)
    clip = torch.randn(1, 3, 3 * K, SIZE, SIZE)
    clip[:, :, K:2 * K] = clip[:, :, K:K + 1]
    with torch.no_grad():
        ref = model(clip)[0].numpy()
        bins_ref = model.bins_used(clip)[0].tolist()
    s = Session(art)
    outs, bins = [], []
    for t in range(clip.shape[2]):
        y = s.step(clip[0, :, t].numpy())
        if s.last_fresh:
            outs.append(y)
            bins.append(int(s.last_extras["bins_used"][0]))
    assert bins == bins_ref and bins[1] == 1
    assert np.abs(np.stack(outs, 1) - ref).max() <= 1e-4 * max(1.0, float(np.abs(ref).max()))
    assert s.stage_summary()["bins_used"]["chunks"] == 3
    # The stages take any number of streams (traced on one, the SGS stage's graph took exactly one),
    # and the export checked the stage graphs on two.
    manifest = json.loads((art / "manifest.json").read_text())
    assert [i["shape"][0] for st in manifest["stages"] for i in st["inputs"]] == ["N", "N"]
    assert 0 <= manifest["model"]["step_check"]["onnx_max_error_relative"] <= 1e-4
    # The post-SGS layers run once per bin, unrolled, with one set of weights: the stage graphs hold
    # them once (ONNX Runtime's Conv+BN fusion had written a copy per bin, K times the parameters).
    params = sum(p.numel() for p in model.parameters())
    assert manifest["precisions"]["fp32"]["weight_bytes"] <= 1.1 * 4 * params, (manifest["precisions"], params)


def test_sgs_streams_batched_in_one_session_each_equal_their_dynamic_reference(model, tmp_path) -> None:
    """Three streams in one session, each with its own bins per chunk: every stream's outputs and B'
    equal the dynamic reference run on that stream alone."""
    art = export_artifact(model, tmp_path, "sgs", frame_size=SIZE)
    g = torch.Generator().manual_seed(0)  # frames of random brightness, so chunks differ in their bins
    clips = torch.randn(3, 3, 3 * K, SIZE, SIZE, generator=g) * (0.2 + 5 * torch.rand(3, 1, 3 * K, 1, 1, generator=g))
    with torch.no_grad():
        ref = model(clips).numpy()  # (3, classes, 3): the reference runs each sample on its own
        bins_ref = model.bins_used(clips).tolist()
    s = Session(art, streams=3)
    outs, bins = [], []
    for t in range(clips.shape[2]):
        y = s.step_batch(list(clips[:, :, t].numpy()))
        if s.last_fresh:
            outs.append(y.copy())
            bins.append(s.last_extras["bins_used"].tolist())
    assert np.array(bins).T.tolist() == bins_ref
    assert len({tuple(b) for b in np.array(bins_ref).T.tolist()}) > 1  # in some chunk, streams differ in B'
    got = np.stack(outs, axis=2)  # (3, classes, 3)
    assert np.abs(got - ref).max() <= 1e-4 * max(1.0, float(np.abs(ref).max()))
    # An artifact whose stage takes one stream (as SGS stages were exported before) is refused for
    # more when the session opens, not with an ONNX Runtime dimension error at the first chunk.
    from edge3d.runtime.manifest import file_sha256

    stage1 = art / "stage1.fp32.onnx"
    g = onnx.load(str(stage1))
    for v in [*g.graph.input, *g.graph.output]:
        v.type.tensor_type.shape.dim[0].dim_value = 1
    onnx.save(g, str(stage1))
    manifest = json.loads((art / "manifest.json").read_text())
    manifest["precisions"]["fp32"]["sha256"][1] = file_sha256(stage1)
    (art / "manifest.json").write_text(json.dumps(manifest))
    assert Session(art).step(clips[0, :, 0].numpy()) is not None  # one stream still runs
    with pytest.raises(ValueError, match=r"stage 1 of this artifact takes a batch of exactly 1 \(buffer.sgs\), so one "
                                         r"session cannot hold 2 streams; re-export it .* or open one Session per"):
        Session(art, streams=2)
