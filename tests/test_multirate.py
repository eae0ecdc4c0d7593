"""Multi-rate streaming: temporal strides, stages and their schedule, export per stage, runtime.

The contract: the stage-scheduled step loop equals the clip forward at every frame where an
output is produced (output j at frame j·P + P − 1, P = frames per output), through PyTorch and
through the ONNX Runtime artifact.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import randomize
from edge3d.exporters.onnx import export_artifact
from edge3d.runtime import ArtifactError, Session
from torch import nn

import edge3d
from edge3d import nn as enn
from edge3d import zoo
from edge3d.convert import StepModule, UnsupportedModelError
from edge3d.staged import StagedStepModule

SIZE = 32


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def assert_fresh_equal(step: StagedStepModule, model: nn.Module, clip: torch.Tensor, tol: float = 1e-4) -> None:
    with torch.no_grad():
        ref = model(clip)
    out, when = step.run_clip(clip)
    P = step.periods[-1]
    assert when == [j * P + P - 1 for j in range(ref.shape[2])], when
    assert out.shape == ref.shape, (out.shape, ref.shape)
    scale = max(1.0, float(ref.abs().max()))
    err = (out - ref).abs().amax(dim=tuple(i for i in range(ref.dim()) if i != 2))
    assert (err <= tol * scale).all(), f"max error per output {err.tolist()}, scale {scale}"


def test_strided_conv_clip_alignment_is_the_documented_formula() -> None:
    # y_j = Σ_i w_i · x[j·s + s − 1 − (k−1−i)·d], zero before frame 0
    conv = enn.CausalConv3d(1, 1, (3, 1, 1), stride=(2, 1, 1), dilation=(2, 1, 1), bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([100.0, 10.0, 1.0]).view(1, 1, 3, 1, 1))
    x = torch.arange(1, 10, dtype=torch.float32).view(1, 1, 9, 1, 1)  # frame t holds t + 1
    y = conv(x).flatten().tolist()
    s, k, d = 2, 3, 2
    want = []
    for j in range(9 // s):
        taps = [j * s + s - 1 - (k - 1 - i) * d for i in range(k)]
        want.append(sum(w * (t + 1 if t >= 0 else 0) for w, t in zip([100, 10, 1], taps, strict=True)))
    assert y == want  # 9 frames -> floor(9 / 2) = 4 outputs: the incomplete tail emits nothing


def random_multirate(rng: random.Random) -> nn.Module:
    c = rng.choice([2, 3])
    layers: list[nn.Module] = [enn.CausalConv3d(3, c, (rng.choice([1, 2, 3]), 3, 3), padding=1), nn.ReLU()]
    for _ in range(rng.choice([1, 2])):
        s = rng.choice([2, 3])
        if rng.random() < 0.5:
            layers.append(enn.CausalTemporalPool(rng.choice([1, 2, 3, 4]), s, rng.choice(["avg", "max"])))
        else:
            k, d = rng.choice([1, 2, 3, 4]), rng.choice([1, 2])
            layers.append(enn.CausalConv3d(c, c, (k, 1, 1), stride=(s, 1, 1), dilation=(d, 1, 1),
                                           groups=rng.choice([1, c])))
        layers += [enn.CausalConv3d(c, c, (rng.choice([1, 2, 3]), 3, 3), padding=1), nn.ReLU()]
    return nn.Sequential(*layers)


@pytest.mark.parametrize("seed", range(8))
def test_random_strided_stacks_stream_like_clip(seed: int) -> None:
    rng = random.Random(seed)
    model = randomize(random_multirate(rng), seed)
    step = edge3d.to_step(model, (3, 6, 5))
    assert isinstance(step, StagedStepModule)
    P = step.periods[-1]
    assert_fresh_equal(step, model, torch.randn(2, 3, 3 * P + rng.randrange(P), 6, 5))


def test_single_rate_models_keep_the_plain_step_module() -> None:
    assert isinstance(edge3d.to_step(zoo.build("d-resnet18", width=0.125, num_classes=5), (3, SIZE, SIZE)),
                      StepModule)
    pool = nn.Sequential(enn.CausalTemporalPool(3, 1, "max"))
    step = edge3d.to_step(pool, (2, 4, 4))
    assert isinstance(step, StepModule)


@pytest.fixture(scope="module")
def r3d(tmp_path_factory) -> tuple[nn.Module, Path]:
    model = randomize(zoo.build("r3d18-causal", width=0.125, num_classes=5), seed=3)
    return model, export_artifact(model, tmp_path_factory.mktemp("mr"), "r3d", frame_size=SIZE,
                                  progress=R3D_PHASES.append)


R3D_PHASES: list[str] = []  # what the r3d fixture's export announced, in order


def test_r3d18_causal_stages_equal_clip_in_pytorch(r3d) -> None:
    model, _ = r3d
    step = edge3d.to_step(model, (3, SIZE, SIZE))
    assert step.periods == [1, 2, 4, 8]
    # conv1 and the projection skip of each rate-changing block share one buffer
    assert [b.layers for b in step.buffers][0] == ("layer2.0.conv1", "layer2.0.downsample.0")
    assert_fresh_equal(step, model, torch.randn(2, 3, 35, SIZE, SIZE))


def test_r3d18_causal_artifact_equals_clip_through_session(r3d) -> None:
    model, art = r3d
    clip = torch.randn(1, 3, 40, SIZE, SIZE)
    with torch.no_grad():
        ref = model(clip)[0].numpy()
    s = Session(art)
    fresh, outs = [], []
    for t in range(clip.shape[2]):
        y, is_fresh = s.step_fresh(clip[0, :, t].numpy())
        if is_fresh:
            fresh.append(t)
            outs.append(y)
        elif outs:
            assert np.array_equal(y, outs[-1])  # between outputs the newest one is repeated
    assert fresh == [7, 15, 23, 31, 39]
    got = np.stack(outs, axis=1)
    scale = max(1.0, float(np.abs(ref).max()))
    assert np.abs(got - ref).max() <= 1e-4 * scale
    summary = s.stage_summary()
    assert [r["runs"] for r in summary["stages"]] == [40, 20, 10, 5]
    assert summary["amortised_ms_per_frame"] > 0
    # each stage graph is written with IR 8, as single-graph artifacts are (older onnxruntime loads it)
    assert {onnx.load(str(f), load_external_data=False).ir_version for f in art.glob("*.onnx")} == {8}
    # a stage file that is not the exported one fails at load
    import shutil

    from test_export_runtime import flip_a_weight_bit

    copy = Path(shutil.copytree(art, art.parent / "flipped.edge3d"))
    stage = sorted(copy.glob("*.onnx"))[-1]
    flip_a_weight_bit(stage)
    with pytest.raises(ArtifactError, match=f"{stage.name} is not the file manifest.json records"):
        Session(copy)
    # the export checked whole runs of the slowest stage (period 8): two outputs of 16 frames
    check = s.manifest["model"]["step_check"]
    assert (check["frames"], check["outputs"]) == (16, 2) and check["max_error"] <= 1e-3 * check["scale"]
    assert 0 <= check["onnx_max_error_relative"] <= 1e-4  # the stage graphs, run as the runtime runs them
    assert s.cache_bytes == sum(s.state_breakdown.values()) > sum(summary["buffer_bytes"].values()) > 0
    snap = s.get_state()
    for bad, says in ((None, "snapshot is a NoneType"), ({}, "snapshot lacks state"),
                      ({**snap, "c1.cache": snap[next(iter(snap))]}, "holds 'c1.cache', which this artifact has "
                                                                       "no state of")):
        with pytest.raises(ValueError, match=says):
            s.set_state(bad)
    after = s.get_state()
    assert snap.keys() == after.keys() and all(np.array_equal(snap[k], after[k]) for k in snap)
    s.close()
    with pytest.raises(ValueError, match=r"step_fresh\(\) on a closed session"):
        s.step_fresh(clip[0, :, 0].numpy())


def test_r3d18_causal_manifest_and_graphs(r3d) -> None:
    assert R3D_PHASES == ["building the step", "checking the step against the clip forward",
                          *(f"tracing stage {k} of 4 (torch.export)" for k in range(1, 5))]
    _, art = r3d
    m = json.loads((art / "manifest.json").read_text())
    assert [st["rate"] for st in m["stages"]] == [1, 2, 4, 8]
    assert [st["inputs"][0]["name"] for st in m["stages"]] == ["frame", "buffer.layer2.0.conv1",
                                                             "buffer.layer3.0.conv1", "buffer.layer4.0.conv1"]
    assert [b["bytes"] for b in m["buffers"]] == [4 * 2 * 8 * 8 * 8, 4 * 2 * 16 * 4 * 4, 4 * 2 * 32 * 2 * 2]
    assert m["state_bytes"] >= sum(b["bytes"] for b in m["buffers"])
    for st in m["stages"]:
        g = onnx.shape_inference.infer_shapes(onnx.load(str(art / st["file"]))).graph
        ranks = [len(v.type.tensor_type.shape.dim) for v in [*g.value_info, *g.input, *g.output]]
        assert max(ranks) <= 4, f"rank-5 tensor in {st['file']}"
        # upstream layers are dead code and dropped: each stage holds only its own two blocks
        convs = sum(n.op_type == "Conv" for n in g.node)
        assert convs == 5, (st["file"], convs)


class SkipAcrossRate(nn.Module):
    """A residual whose skip crosses a temporal stride without a strided layer."""

    steps_without_time_axis = True

    def __init__(self) -> None:
        super().__init__()
        self.stem = enn.CausalConv3d(3, 4, (2, 3, 3), padding=1)
        self.block = Block()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(self.stem(x))


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = enn.CausalConv3d(4, 4, (2, 1, 1), stride=(2, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) + x


class BroadcastBypass(nn.Module):
    """Clip mode broadcasts, so only the stage check can see that the skip bypasses the stride."""

    def __init__(self) -> None:
        super().__init__()
        self.pool = enn.CausalTemporalPool(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(x) + x[:, :, -1:]


class Unchained(nn.Module):
    """Two paths: strides 2·2 and 3 give periods 1, 2, 3, 4; the second stride 2 skips the period-3 stage."""

    def __init__(self) -> None:
        super().__init__()
        self.a1 = enn.CausalTemporalPool(2, 2)
        self.a2 = enn.CausalTemporalPool(2, 2)
        self.b = enn.CausalTemporalPool(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a2(self.a1(x)) + self.b(x)[:, :, :1]


@pytest.mark.parametrize("model, fragment", [
    (SkipAcrossRate(), "block: the clip forward fails"),
    (BroadcastBypass(), "BroadcastBypass: its output mixes frames from before the rate change"),
    (Unchained(), "a2: temporal stride 2 takes frames of period 2 to period 4, skipping the stage that runs every 3"),
])
def test_unsupported_rate_changes_fail_at_export_with_the_path(model: nn.Module, fragment: str,
                                                               tmp_path: Path) -> None:
    with pytest.raises(UnsupportedModelError, match=fragment):
        export_artifact(model, tmp_path, "bad", frame_size=8)
    assert not list(tmp_path.iterdir())


def test_single_graph_tools_refuse_a_multi_rate_artifact_in_one_sentence(r3d, tmp_path: Path) -> None:
    """TensorRT and Triton take one graph; on a staged artifact each used to fail deep inside (a
    KeyError, an AttributeError, a wrong build script). bench times multi-rate artifacts now (below)."""
    from typer.testing import CliRunner

    from edge3d.cli import app

    _, art = r3d
    before = sorted(p.name for p in art.iterdir())
    runner = CliRunner()
    for args in (["triton", str(art), "-o", str(tmp_path / "repo")], ["build", str(art)],
                 ["export", str(art), "--profile", "fp16", "--target", "tensorrt"],
                 ["compare", str(art), "--profiles", "fp32,fp16", "--save-polygraphy-inputs", "-o", str(tmp_path / "c")]):
        res = runner.invoke(app, args, terminal_width=400)
        assert res.exit_code == 2, (args, res.output)
        assert "r3d is a multi-rate model" in res.output and "docs/multirate.md" in res.output, (args, res.output)
    with pytest.raises(ValueError, match="multi-rate artifacts run on onnxruntime only"):
        Session(art, backend="tensorrt")
    assert sorted(p.name for p in art.iterdir()) == before
    assert not any(tmp_path.iterdir())
    # export checks before writing the FP32 stages, for every flag that needs one graph
    for flags in (["--target", "tensorrt"], ["--triton-repo", str(tmp_path / "repo")]):
        res = runner.invoke(app, ["export", "r3d18-causal", "--width", "0.125", "--size", "32", *flags,
                                  "-o", str(tmp_path / "out")], terminal_width=400)
        assert res.exit_code == 2 and "r3d18-causal is a multi-rate model" in res.output, (flags, res.output)
    assert not any(tmp_path.iterdir())


def test_int8_calibration_shorter_than_the_slowest_stage_is_refused_before_any_work(r3d, tmp_path: Path) -> None:
    """Fewer calibration frames than the output period gave the slowest stage no feed, and the reader said
    the source "gave no frames after the 16 warm-up frames", which synthetic never does."""
    import shutil

    from edge3d.exporters.precision import add_precisions
    from typer.testing import CliRunner

    from edge3d.cli import app

    _, src = r3d
    art = tmp_path / "r3d.edge3d"
    shutil.copytree(src, art)
    before = sorted(p.name for p in art.iterdir())
    said = "--calib-frames 4 is less than r3d's output period (8 frames): its slowest stage runs once every 8 frames"
    with pytest.raises(ValueError, match=re.escape(said)):
        add_precisions(art, ["fp16", "int8"], calib_frames=4)
    assert sorted(p.name for p in art.iterdir()) == before  # not even the fp16 graphs
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["export", "r3d18-causal", "--width", "0.125", "--size", str(SIZE), "--profile",
                                   "int8", "--calib-frames", "7", "-o", str(out)], terminal_width=300)
    assert res.exit_code == 2 and "--calib-frames 7 is less than r3d18-causal's output period (8 frames)" in res.output, \
        res.output
    assert not out.exists()  # refused before the FP32 stages were written


def test_int8_calibration_on_a_folder_of_clips_gives_each_clip_whole_cycles(r3d, tmp_path: Path) -> None:
    """Each clip of a calibration folder gets a share of the frames; 24 frames over 6 clips gave each 4
    frames after warm-up, none of them the 8th that runs the slowest stage, and the export failed saying
    the source "gave no frames". Shares are now whole cycles of the stages: 3 clips of 8 frames."""
    import json
    import shutil

    from edge3d.exporters.precision import add_precisions

    cv2 = pytest.importorskip("cv2")
    _, src = r3d
    for folder, clips, length in (("long", 6, 26), ("short", 3, 20)):
        (tmp_path / folder).mkdir()
        for c in range(clips):
            writer = cv2.VideoWriter(str(tmp_path / folder / f"c{c}.mp4"), cv2.VideoWriter_fourcc(*"mp4v"), 25,
                                     (SIZE, SIZE))
            for i in range(length):
                writer.write(np.random.default_rng(100 * c + i).integers(0, 255, (SIZE, SIZE, 3), np.uint8))
            writer.release()
    art = tmp_path / "r3d.edge3d"
    shutil.copytree(src, art)
    add_precisions(art, ["int8-cpu"], calib_source=str(tmp_path / "long"), calib_frames=24)
    calib = json.loads((art / "manifest.json").read_text())["precisions"]["int8-cpu"]["calibration"]
    assert calib["feeds"] == [24, 12, 6, 3] and calib["streams"] == 3, calib
    with pytest.raises(ValueError, match=re.escape(
            "gave 12 frames after the 16 warm-up frames of each stream, and stage 3, which runs once every 8 frames "
            "of a stream, ran on none of them; pass clips of at least 24 frames")):
        add_precisions(art, ["int8"], calib_source=str(tmp_path / "short"), calib_frames=24)


def test_multi_rate_artifacts_take_every_precision_and_compare_them(r3d, tmp_path: Path, monkeypatch) -> None:
    """Precisions were refused on a multi-rate artifact ("multi-rate artifacts run FP32"), so a model
    with temporal strides could not be shipped in FP16 or INT8, nor compared. Each stage graph is now
    converted on its own, INT8 calibrated on the feeds that stage gets in an FP32 rollout, and compare
    scores the frames where the slowest stage produces an output."""
    import shutil

    from edge3d.exporters.precision import add_precisions

    from edge3d.compare import compare
    from edge3d.data.gestures import make_stream

    art = Path(shutil.copytree(r3d[1], tmp_path / "r3d.edge3d"))
    frames, _ = make_stream(11, 96, SIZE)
    entries = add_precisions(art, ["fp16", "int8-lowmem"], calib_source=list(frames[:64]), calib_frames=48)
    # 48 frames after the 16 of warm-up: stage k runs on every 2**k-th of them
    assert entries["int8-lowmem"]["calibration"]["feeds"] == [48, 24, 12, 6]
    assert entries["int8-lowmem"]["calibration"]["nonzero_state_feeds"] == [48, 24, 12, 6]  # warm states, not zeros
    for p in ("fp16", "int8-lowmem"):
        assert entries[p]["files"] == [f"stage{k}.{p}.onnx" for k in range(4)]
        assert all((art / f).is_file() for f in entries[p]["files"]) and len(entries[p]["sha256"]) == 4
    # format 4: an edge3d from before multi-rate precisions refuses the artifact at load, naming the upgrade,
    # where it would have fed float32 states to the float16 and int8 stage graphs at the first step
    from edge3d.runtime import manifest as manifest_module

    assert json.loads((art / "manifest.json").read_text())["format_version"] == 4
    with pytest.MonkeyPatch.context() as older:
        older.setattr(manifest_module, "READS", (1, 2, 3))
        older.setattr(manifest_module, "FORMAT_VERSION", 3)
        with pytest.raises(ArtifactError, match="written by a newer edge3d: upgrade edge3d here"):
            Session(art, profile="fp16")
    sessions = {p: Session(art, profile=p) for p in ("fp32", "fp16", "int8-lowmem")}
    for p, want in (("fp32", np.float32), ("fp16", np.float16), ("int8-lowmem", np.int8)):
        snap = sessions[p].get_state()
        assert {snap[s].dtype for s in sessions[p].manifest["stages"][2]["states"]} == {np.dtype(want)}, p
    # the buffers between stages are stored in the profile's state dtype, int8 with a scale of their own
    buffers = [b["name"] for b in sessions["fp32"].manifest["buffers"]]
    assert len(buffers) == 3 and entries["fp16"]["buffer_dtypes"] == dict.fromkeys(buffers, "float16")
    assert entries["int8-lowmem"]["buffer_dtypes"] == dict.fromkeys(buffers, "int8")
    assert set(buffers) < set(entries["int8-lowmem"]["state_quant"])
    assert {p: {s.get_state()[b].dtype.name for b in buffers} for p, s in sessions.items()} == {
        "fp32": {"float32"}, "fp16": {"float16"}, "int8-lowmem": {"int8"}}
    cache = {p: s.cache_bytes for p, s in sessions.items()}
    assert cache["int8-lowmem"] < cache["fp16"] < cache["fp32"], cache
    # inspect's precisions table counts what the session holds, the buffers between stages included
    from edge3d.runtime.manifest import format_bytes
    from typer.testing import CliRunner

    from edge3d.cli import app

    shown = CliRunner().invoke(app, ["inspect", str(art)], terminal_width=200).output
    for p, n in cache.items():
        assert re.search(rf"│ {re.escape(p)}\s+│ stage0\.{re.escape(p)}\.onnx.*│ {re.escape(format_bytes(n))}\s+│", shown), (p, n)
    with pytest.raises(ValueError, match="wrong shape or dtype"):  # an FP32 snapshot is not cast silently
        sessions["fp16"].set_state(sessions["fp32"].get_state())
    for s in sessions.values():
        s.close()
    from edge3d.runtime.staged import StagedSession

    timed: dict[str, np.ndarray] = {}
    real_frame_ms = StagedSession.frame_ms

    def recording(sess):
        timed[sess.profile] = real_frame_ms(sess)
        return timed[sess.profile]

    monkeypatch.setattr(StagedSession, "frame_ms", recording)
    report = compare(art, "fp32,fp16,int8-lowmem", list(frames), 96, plots=False)
    assert (report["frames"], report["outputs"]) == (96, 12)
    rows, scale = report["profiles"], report["output_scale"]
    for p, row in rows.items():  # ms/frame over the 12 whole cycles, not the median frame's (stage 0's alone)
        assert len(timed[p]) == 12 and row["ms_p50"] == pytest.approx(float(np.median(timed[p]))), p
    assert rows["fp16"]["teacher_forced"]["max_abs_err"] < 1e-2 * scale, rows["fp16"]
    assert rows["int8-lowmem"]["teacher_forced"]["max_abs_err"] < 0.1 * scale, rows["int8-lowmem"]
    assert 0 < rows["fp16"]["teacher_forced"]["mean_abs_err"] < rows["int8-lowmem"]["teacher_forced"]["mean_abs_err"]
    assert rows["fp16"]["top1_agreement"] == 1.0 and rows["int8-lowmem"]["top1_agreement"] >= 0.9, rows
    for p in ("fp16", "int8-lowmem"):  # the worst output is at a frame where the slowest stage ran
        assert (rows[p]["free_running"]["worst_frame"] + 1) % 8 == 0, rows[p]
    res = CliRunner().invoke(app, ["compare", str(art), "--frames", "4", "-o", str(tmp_path / "c")], terminal_width=400)
    assert res.exit_code == 2 and "first runs on frame 8 of each clip; pass --frames 8 or more" in res.output, res.output
    assert not (tmp_path / "c").exists()


def test_run_on_a_multi_rate_artifact_reports_each_stage(r3d) -> None:
    from typer.testing import CliRunner

    from edge3d.cli import app

    _, art = r3d
    res = CliRunner().invoke(app, ["run", str(art), "--frames", "16", "--quiet"], terminal_width=200)
    assert res.exit_code == 0, res.output
    runs = {int(m[1]): (m[2], int(m[3])) for m in re.finditer(
        r"stage (\d) \((every frame|every \d+ frames)\)\s+│ [\d.]+ ms/run, (\d+) runs", res.output)}
    # res3-res5 halve the frame rate in turn: 16 frames run the stages 16, 8, 4 and 2 times
    assert runs == {0: ("every frame", 16), 1: ("every 2 frames", 8), 2: ("every 4 frames", 4),
                    3: ("every 8 frames", 2)}, res.output


def test_inspect_names_every_stage_graph_and_its_rate(r3d) -> None:
    """The precisions table named only stage0's file beside the weights of all four, and a stage run
    every frame was "1 frames"."""
    from typer.testing import CliRunner

    from edge3d.cli import app

    _, art = r3d
    res = CliRunner().invoke(app, ["inspect", str(art)], terminal_width=200)
    assert res.exit_code == 0, res.output
    assert all(f"stage{k}.fp32.onnx" in res.output for k in range(4)), res.output  # no other table names files
    rates = re.findall(r"│ (\d)\s+│ (frame|\d+ frames)\s+│", res.output)
    assert rates == [("0", "frame"), ("1", "2 frames"), ("2", "4 frames"), ("3", "8 frames")], res.output


def test_bench_streams_times_whole_cycles_of_a_multi_rate_artifact(r3d, monkeypatch) -> None:
    """bench-streams refused multi-rate artifacts. Each timed call now steps one cycle of the stages
    (8 frames), so every call runs the slowest stage once; a single-frame subset call would time
    whatever stages its frame runs, so there is no subset call and no gather/scatter figure."""
    from edge3d.runtime.staged import StagedSession

    from edge3d import bench_streams

    _, art = r3d
    frames_stepped: dict[int, int] = {}
    real = StagedSession.step_batch

    def counting(self, frames, stream_ids=None):
        frames_stepped[self.streams] = frames_stepped.get(self.streams, 0) + 1
        return real(self, frames, stream_ids)

    monkeypatch.setattr(StagedSession, "step_batch", counting)
    r = bench_streams.measure_streams(art, [2], frames=3, threads=1, rss=False)
    row = r["rows"][0]
    assert r["frames_per_call"] == row["frames_per_call"] == 8
    # warm-up and timed calls of the two-stream session, each a cycle of 8 frames
    assert frames_stepped[2] == 8 * (bench_streams.WARMUP_CALLS + 3)
    assert row["batched_fps"] == pytest.approx(1e3 * 2 * 8 / row["batched_ms_per_call"])
    assert row["gather_scatter_share"] is None and row["subset_over_full"] is None
    assert r["runtime_buffer_bytes_per_stream"] is None
    still = Session(art, spin=False)  # every stage's graph lets its threads sleep
    assert [sess.get_session_options().get_session_config_entry("session.intra_op.allow_spinning")
            for sess, _ in still._sess] == ["0"] * 4
    # and by default each stage's threads stop spinning when its run returns: spinning on, they competed
    # with the next stage's run, and full-size r3d18-causal took twice as long per frame
    assert [sess.get_session_options().get_session_config_entry("session.force_spinning_stop")
            for sess, _ in Session(art)._sess] == ["1"] * 4
    from typer.testing import CliRunner

    from edge3d.cli import app

    res = CliRunner().invoke(app, ["bench-streams", str(art), "--streams", "1,2", "--frames", "2", "--no-rss"],
                             terminal_width=200)
    said = " ".join(res.output.split())
    assert res.exit_code == 0 and "a call steps 8 frames of each stream, one cycle of the stages" in said, said
    assert re.search(r"│ 2 │.*│\s+- │", res.output), res.output  # gather+scatter: none


def test_cycle_ms_sums_whole_cycles_of_the_stages_only(r3d) -> None:
    """compare's ms/frame p50 of a multi-rate artifact was the median over single frames: half of them run
    stage 0 alone, so it read 9.1 ms/frame for a full-size r3d18-causal that took 11.0 over whole cycles."""
    _, art = r3d
    sess = Session(art)
    frame = np.zeros((3, SIZE, SIZE), np.float32)
    for _ in range(7):
        sess.step(frame)
    before = sess.latency()  # no whole cycle yet: over the calls so far
    assert not before["cycles"] and before["p50"] == pytest.approx(np.median(sess.stats.ms))
    for _ in range(13):
        sess.step(frame)
    ms = list(sess.stats.ms)
    assert list(sess.cycle_ms) == pytest.approx([sum(ms[:8]), sum(ms[8:16])])
    per_frame = np.asarray([sum(ms[:8]), sum(ms[8:16])]) / 8
    assert sess.frame_ms() == pytest.approx(per_frame)
    # what run and the Jetson app report: the cycles' median, not the median single frame (stage 0 alone)
    assert sess.latency()["cycles"] and sess.latency()["p50"] == pytest.approx(np.median(per_frame))
    sess.reset()  # frames 16-19 were a cycle cut short: the next one starts afresh
    for _ in range(3):
        sess.step(frame)
    snap = sess.get_state()
    for _ in range(5):
        sess.step(frame)
    assert len(sess.cycle_ms) == 3
    sess.set_state(snap)  # 5 frames to the next output: not a whole cycle
    for _ in range(5):
        sess.step(frame)
    assert len(sess.cycle_ms) == 3 and sess.last_fresh


def test_bare_cycle_runs_each_stage_as_often_as_the_schedule_and_keeps_nothing(r3d) -> None:
    """bench's bare baseline for a multi-rate artifact: one cycle of plain InferenceSession calls."""
    _, art = r3d
    sess = Session(art)
    for _ in range(5):
        sess.step(np.random.default_rng(0).standard_normal((3, SIZE, SIZE), dtype=np.float32))
    before = sess.get_state()
    runs = [0] * 4

    class Counting:
        def __init__(self, k: int, inner) -> None:
            self.k, self.inner = k, inner

        def run(self, names, feeds):
            runs[self.k] += 1
            return self.inner.run(names, feeds)

    sess._sess = [(Counting(k, s), outs) for k, (s, outs) in enumerate(sess._sess)]
    sess.bare_cycle()(0)
    assert runs == [8, 4, 2, 1]  # stage rates 1, 2, 4, 8 over one cycle of 8 frames
    after = sess.get_state()
    assert all(np.array_equal(before[k], after[k]) for k in before) and sess._t == 5


STRIDED = (  # a causal stem and two stride-2 convs: stages at periods 1, 2 and 4, exported in seconds
    "from torch import nn\nfrom edge3d.nn import CausalConv3d\n\n\ndef build():\n    return nn.Sequential("
    "CausalConv3d(3, 4, (2, 3, 3), padding=(0, 1, 1)), nn.ReLU(), "
    "CausalConv3d(4, 4, (2, 3, 3), stride=(2, 2, 2), padding=(0, 1, 1)), nn.ReLU(), "
    "CausalConv3d(4, 4, (2, 3, 3), stride=(2, 2, 2), padding=(0, 1, 1)))\n")


def test_bench_times_a_multi_rate_model_per_frame_over_whole_cycles(tmp_path: Path, monkeypatch) -> None:
    """bench refused multi-rate models. Each timed call now steps a whole cycle (4 frames here: a median
    over single frames would time stage 0 alone) and is reported per frame; the sliding window runs once
    per output, so its time per output is its time per call."""
    from edge3d.runtime.staged import StagedSession
    from typer.testing import CliRunner

    from edge3d import bench
    from edge3d.cli import app

    (tmp_path / "strided.py").write_text(STRIDED)
    target = f"{tmp_path / 'strided.py'}:build"
    raw: list = []
    real_rounds = bench._in_rounds

    def keep(groups, rounds, *a, **kw):
        raw.extend(real_rounds(groups, rounds, *a, **kw))
        return [{n: list(v) for n, v in r.items()} for r in raw]

    stepped: dict[int, int] = {}
    real_step = StagedSession.step

    def counting(self, frame, stream=0):
        stepped[id(self)] = stepped.get(id(self), 0) + 1
        return real_step(self, frame, stream)

    monkeypatch.setattr(bench, "_in_rounds", keep)
    monkeypatch.setattr(StagedSession, "step", counting)
    r = bench.run_bench(target, size=16, frames=8, rounds=1, profiles=["fp16"])
    assert r["output_period"] == 4 and r["window"] == 16 and r["profiles"] == ["fp32", "fp16"]
    # 3 warm-up calls and 2 timed calls per round, 4 frames each: the lowered and the Conv3d session, and the
    # fp16 session built for the bench
    assert sorted(stepped.values()) == [20, 20, 20]
    med = {n: float(np.median(v)) for n, v in raw[0].items()}
    res = r["results"]
    assert res["step_ms"] == pytest.approx(med["step"] / 4) and res["bare_ort_ms"] == pytest.approx(med["bare"] / 4)
    assert res["torch_eager_lowered_step_ms"] == pytest.approx(med["eager"] / 4)
    assert res["window_ms_per_output_frame"] == pytest.approx(med["window"])  # one clip forward per output
    assert res["matmul_gflops"] == pytest.approx(2 * bench.MATMUL_N**3 / (med["matmul"] * 1e-3) / 1e9)
    assert r["ratios"]["step_vs_window_speedup"] == pytest.approx(med["window"] / med["step"])
    assert r["ratios"]["lowered_vs_conv3d_speedup"] == pytest.approx(med["conv3d"] / med["step"])
    assert res["fp16_step_ms"] == pytest.approx(med["profile.fp16"] / 4)
    assert r["ratios"]["fp16_vs_fp32_speedup"] == pytest.approx(med["step"] / med["profile.fp16"])
    res = CliRunner().invoke(app, ["bench", target, "--size", "16", "--window", "2"], terminal_width=200)
    assert res.exit_code == 2 and "--window 2 is shorter than " + target + "'s output period (4 frames)" in res.output, \
        res.output


def test_run_predicts_nothing_before_the_slowest_stage_first_runs(r3d, tmp_path, monkeypatch) -> None:
    """Frames 0-6 of a stride-8 model have no output yet: the JSONL gave them class '0' at score
    1/classes (the softmax of zeros), and stages not run yet read '0.00 ms/run'."""
    import json

    from typer.testing import CliRunner

    from edge3d import cli
    from edge3d.cli import app

    monkeypatch.setattr(cli.console, "width", 200)  # one table row per line
    _, art = r3d
    preds = tmp_path / "p.jsonl"
    res = CliRunner().invoke(app, ["run", str(art), "--frames", "20", "--quiet", "--output", str(preds)],
                             terminal_width=200)
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in preds.read_text().splitlines()]
    with Session(art) as s:  # the same frames through the session: when each output is produced
        from edge3d.sources import open_source

        frames = [f for f, _ in zip(open_source("synthetic", SIZE), range(20), strict=False)]
        fresh = [s.step_fresh(f)[1] for f, _ in frames]
    assert [r["fresh"] for r in rows] == fresh == [(t + 1) % 8 == 0 for t in range(20)]
    with Session(art) as s:  # has_output follows the phase, so a restored snapshot carries it
        for t, (f, _) in enumerate(frames[:8]):
            y = s.step(f)
            if t < 7:  # zeros, which top() would have named as class 0 at a score of 1/classes
                assert not y.any()
                with pytest.raises(ValueError, match="this multi-rate session has no prediction yet: its slowest "
                                                     "stage first runs on frame 8 of each clip, counting from 1"):
                    s.top(y)
        assert s.top(y)[2] > 0
        snap = s.get_state()
        s.reset()
        assert not s.has_output
        s.set_state(snap)
        assert s.has_output
    assert all(r["top"] is None and r["class"] is None and r["score"] is None for r in rows[:7])
    assert all(isinstance(r["top"], int) and 0 < r["score"] <= 1 for r in rows[7:])
    assert re.search(r"frames without an output yet\s+│ 7 \(each clip's first 7,", res.output), res.output
    assert "model ms/frame over whole cycles p50 / p95 / p99" in res.output  # not the median single frame
    res = CliRunner().invoke(app, ["run", str(art), "--frames", "3", "--quiet"], terminal_width=200)
    assert res.exit_code == 0 and "not run: no clip reached 8 frames" in res.output, res.output
    import subprocess
    import sys

    example = Path(__file__).resolve().parents[1] / "examples" / "jetson_app.py"
    done = subprocess.run([sys.executable, str(example), str(art), "--source", "synthetic", "--frames", "8",
                           "--headless", "--log-every", "4", "--backend", "onnxruntime"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    logged = [line.split(" fps; ")[1] for line in done.stdout.splitlines() if line.startswith("frame ")]
    assert logged[0] == "no output yet" and re.fullmatch(r"top \S+ \(0\.\d\d\)", logged[1]), done.stdout


def test_a_rejected_frame_of_a_multi_rate_batch_names_its_stream(r3d) -> None:
    _, art = r3d
    s = Session(art, streams=2)
    good = np.zeros((3, SIZE, SIZE), np.float32)
    s.step_batch([good, good])
    before = s.get_state()
    with pytest.raises(ValueError, match=r"^stream 1 \(frame 1 of the call\): frame contains NaN"):
        s.step_batch([good, np.full((3, SIZE, SIZE), np.nan, np.float32)])
    with pytest.raises(ValueError, match="frames is a generator; pass a list or an array"):
        s.step_batch(f for f in [good, good])
    assert all(np.array_equal(before[k], v) for k, v in s.get_state().items())


@pytest.mark.parametrize("max_batch", [None, 2])
def test_multi_rate_streams_are_independent_as_separate_sessions(r3d, max_batch) -> None:
    """Streams that join at different frames, subset calls in any order, one stream reset or moved
    to another session: each stream gives what a session of its own gives (periods 1, 2, 4, 8), also
    with each stage run in chunks of at most ``max_batch`` rows."""
    _, art = r3d
    rng = np.random.default_rng(5)
    frames = rng.standard_normal((60, 3, 3, SIZE, SIZE)).astype(np.float32)
    s = Session(art, streams=3, max_batch=max_batch)
    batches: list[int] = []  # rows of every graph run

    class Counted:
        def __init__(self, sess) -> None:
            self.sess = sess

        def run(self, names, feeds):
            batches.append(len(feeds[next(iter(feeds))]))
            return self.sess.run(names, feeds)

    s._sess = [(Counted(sess), out) for sess, out in s._sess]
    alone = [Session(art) for _ in range(3)]
    joins = [0, 3, 6]  # stream k steps from call joins[k] on: three phases of the cycle
    fresh_seen = [0, 0, 0]
    for call in range(60):
        if call == 30:  # one stream starts over; the others keep their place in the cycle
            s.reset(1)
            alone[1].reset()
        if call == 40:  # stream 2 is saved, overwritten by stream 0's state, then put back
            saved = s.get_state(stream=2)
            s.set_state(s.get_state(stream=0), stream=2)
            s.set_state(saved, stream=2)
        ids = [k for k in rng.permutation(3).tolist() if call >= joins[k] and rng.random() < 0.85]
        if not ids:
            continue
        untouched = {k: s.get_state(stream=k) for k in range(3) if k not in ids}
        ys = s.step_batch([frames[call, k] for k in ids], ids)
        for row, k in enumerate(ids):
            y = alone[k].step(frames[call, k])
            assert np.allclose(ys[row], y, atol=2e-5 * max(1.0, float(np.abs(y).max()))), (call, k)
            assert bool(s.fresh[row]) == alone[k].last_fresh, (call, k)
            assert bool(s.has_outputs[k]) == alone[k].has_output
            fresh_seen[k] += alone[k].last_fresh
        for k, snap in untouched.items():  # a stream left out of the call keeps every array, bit for bit
            assert all(np.array_equal(snap[key], v) for key, v in s.get_state(stream=k).items())
    phases = s.get_state()["frame_index"] % 8  # where in the cycle each stream stands: not all in one place
    assert min(fresh_seen) >= 4 and len(set(phases.tolist())) == 3, (fresh_seen, phases)
    assert max(batches) == (max_batch or 3)  # three rows in one run, or never more than max_batch
    # a stream moved to a session of its own goes on exactly as it would have in the batch
    moved = Session(art)
    moved.set_state(s.get_state(stream=2))
    for t in range(9):
        f = frames[t, 0]
        assert np.array_equal(moved.step(f), s.step(f, stream=2))
        assert moved.last_fresh == s.last_fresh
    with pytest.raises(ValueError, match=r"snapshot lacks state .* pass a one-stream snapshot, get_state\(stream=k\)"):
        s.set_state(s.get_state(), stream=1)
    with pytest.raises(ValueError, match="stream id 3 is out of range"):
        s.get_state(stream=3)


def test_stage_graphs_that_differ_from_the_step_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The stage graphs as written, run by the runtime's staged session, are checked against the
    PyTorch step: a fault between them (a simplifier doubling the largest weight of the last stage,
    as a folding bug would) stops the export, and nothing is left behind."""
    from edge3d.exporters import staged as exporter

    simplify = exporter.simplify

    def faulty(src: Path, dst: Path) -> None:
        simplify(src, dst)
        if dst.name.startswith("stage3."):
            model = onnx.load(str(dst))
            t = max(model.graph.initializer, key=lambda i: len(i.raw_data))
            t.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(t) * 2, t.name))
            onnx.save(model, str(dst))

    monkeypatch.setattr(exporter, "simplify", faulty)
    # four stages at periods 1, 2, 4 and 8, as r3d18-causal has, in a model that exports in seconds
    model = randomize(nn.Sequential(
        enn.CausalConv3d(3, 4, (2, 3, 3), padding=(0, 1, 1)), nn.ReLU(),
        *(m for _ in range(3) for m in (enn.CausalConv3d(4, 4, (2, 3, 3), stride=(2, 2, 2), padding=(0, 1, 1)),
                                        nn.ReLU()))), seed=3)
    assert edge3d.to_step(model, (3, SIZE, SIZE)).periods == [1, 2, 4, 8]
    with pytest.raises(ValueError, match="the exported ONNX stage graphs differ from the PyTorch step at frame 7 of "
                                         "a random 16-frame clip"):
        export_artifact(model, tmp_path, "faulty", frame_size=SIZE)
    assert not list(tmp_path.iterdir())  # neither the artifact nor its temporary folder
    assert export_artifact(model, tmp_path, "unchecked", frame_size=SIZE, verify=False).is_dir()


def test_run_steps_several_sources_of_a_multi_rate_artifact_each_on_its_own(r3d, tmp_path) -> None:
    """Several cameras step together in one call, a folder of clips restarts its own stream at each
    clip, and a source that ends leaves the others running: every stream's lines are those of its
    source run alone."""
    import json

    from typer.testing import CliRunner

    from edge3d.cli import app

    cv2 = pytest.importorskip("cv2")
    _, art = r3d
    runner = CliRunner()

    def lines(*sources: str, frames: int = 16) -> list[dict]:
        out = tmp_path / "p.jsonl"
        args = [a for src in sources for a in ("--source", src)]
        res = runner.invoke(app, ["run", str(art), *args, "--frames", str(frames), "--quiet", "--output", str(out)],
                            terminal_width=200)
        assert res.exit_code == 0, res.output
        return [json.loads(line) for line in out.read_text().splitlines()]

    clips = tmp_path / "clips"
    clips.mkdir()
    rng = np.random.default_rng(2)
    for name in ("a.mp4", "b.mp4"):  # 10 frames each: an output at frame 8 of each, counting from 1
        writer = cv2.VideoWriter(str(clips / name), cv2.VideoWriter_fourcc(*"mp4v"), 25, (SIZE, SIZE))
        for _ in range(10):
            writer.write(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
        writer.release()
    rows = lines("synthetic:1", str(clips), "synthetic:2", frames=24)
    assert [r["stream"] for r in rows[:3]] == [0, 1, 2]
    for i, src in enumerate(("synthetic:1", str(clips), "synthetic:2")):
        got = [r for r in rows if r["stream"] == i]
        want = lines(src, frames=24)
        assert len(got) == len(want) == (20 if i == 1 else 24)  # the folder ends after its 20 frames
        assert [(r["top"], r["fresh"]) for r in got] == [(r["top"], r["fresh"]) for r in want]
        assert np.allclose([r["score"] or 0 for r in got], [r["score"] or 0 for r in want], atol=2e-5)
    folder = [r for r in rows if r["stream"] == 1]
    assert [r["fresh"] for r in folder].count(True) == 2 and folder[17]["fresh"]  # clip b restarted its stream
    assert [r["top"] is None for r in folder] == [j % 10 < 7 for j in range(20)]
