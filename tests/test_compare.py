"""``edge3d compare``: teacher-forced vs free-running error, report files, Polygraphy inputs, CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from edge3d.exporters.precision import add_precisions  # noqa: E402
from edge3d.runtime import Session  # noqa: E402
from edge3d.runtime.manifest import load_manifest  # noqa: E402
from precision_helpers import pattern_stream, write_video  # noqa: E402

from edge3d.compare import cast_states, compare, drift_trend, reference_state_growth, table_rows  # noqa: E402


@pytest.fixture(scope="module")
def video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_video(tmp_path_factory.mktemp("video") / "test.mp4", [f for f, _ in pattern_stream(90, seed=21)])


def test_drift_trend_detects_growth() -> None:
    flat = 1e-3 * (1 + 0.1 * np.sin(np.arange(2000)))
    growing = 1e-3 * (1 + np.arange(2000) / 200)
    assert 0.9 < drift_trend(flat)["growth"] < 1.1 and abs(drift_trend(flat)["slope_per_1k"]) < 0.1
    assert drift_trend(growing)["growth"] > 1.2 and drift_trend(growing)["slope_per_1k"] > 0.5
    # content-driven error (the per-step error moves the same way) is not growth
    assert drift_trend(growing, per_step=growing / 3)["growth_vs_step"] == pytest.approx(1.0)
    assert drift_trend(growing, per_step=np.full(2000, 1e-4))["growth_vs_step"] > 1.2


def test_reference_state_growth_takes_the_longest_stream() -> None:
    flat, doubling = [1.0] * 40, [2.0 ** t for t in range(12)]
    assert reference_state_growth(flat, [0])["ratio"] == pytest.approx(1.0)
    # quarters of 3 frames: frames 3-5 against 9-11 grow 2^6
    grown = reference_state_growth(flat[:5] + doubling, [0, 5])
    assert grown["ratio"] == pytest.approx(64.0) and grown["max_abs"] == 2048.0
    assert reference_state_growth(doubling[:7], [0]) is None  # too short to have quarters
    assert reference_state_growth([0.0] * 20, [0]) is None  # stateless: nothing to compare


def test_cast_states_matches_the_graph_state_dtypes(stateful: Path) -> None:
    """Teacher forcing feeds FP32 states to every profile: rounded to float16, or quantised with
    the int8 state scales the graph dequantises with."""
    man = load_manifest(stateful)
    with Session(stateful) as s:
        for f, _ in pattern_stream(10, seed=2):
            s.step(f)
        states = s.get_state()
    for profile in ("fp16", "int8-lowmem"):
        with Session(stateful, profile=profile) as s:
            cast = cast_states(states, s.precision, s._backend.state_dtypes())
            s.set_state(cast)  # dtypes and shapes are what the graph wants
            quant = s.precision.get("state_quant", {})
        for st in man["states"]:
            a, b, q = states[st["name"]], cast[st["name"]].astype(np.float32), quant.get(st["name"])
            if q:
                limit = 127 * q["scale"]
                np.testing.assert_allclose(b * q["scale"], np.clip(a, -limit, limit), rtol=0,
                                           atol=q["scale"] / 2 + 1e-6)
            else:
                np.testing.assert_allclose(b, a, rtol=1e-3, atol=1e-6)


def test_teacher_forced_error_is_zero_for_an_identical_graph(tmp_path: Path, stateful: Path) -> None:
    """A profile that is the FP32 graph under another name must show exactly zero error in both
    modes: the harness itself adds nothing (states are fed back bit for bit)."""
    same = tmp_path / "same.toml"
    same.write_text('name = "fp32-copy"\nweight_dtype = "float32"\n')
    add_precisions(stateful, [str(same)])
    data = pattern_stream(60, seed=8)
    report = compare(stateful, ["fp32", "fp32-copy", "int8"], data, 60, threads=1)
    row = report["profiles"]["fp32-copy"]
    assert row["teacher_forced"]["max_abs_err"] == 0.0 and row["free_running"]["worst_abs_err"] == 0.0
    assert row["top1_agreement"] == 1.0
    int8 = report["profiles"]["int8"]
    assert 0 < int8["teacher_forced"]["mean_abs_err"] and 0 < int8["free_running"]["mean_abs_err"]
    assert report["labelled"] and 0.0 <= int8["accuracy"] <= 1.0


def test_compare_scores_synthetic_labels_only_for_a_gesture_model(stateful: Path) -> None:
    """The synthetic source labels frames with gesture classes; this artifact has other classes."""
    report = compare(stateful, ["fp32", "int8"], "synthetic:2", 12, plots=False)
    assert report["frames"] == 12 and not report["labelled"]
    assert all("accuracy" not in row for row in report["profiles"].values())
    # nor does the table give accuracy rows of dashes
    assert [r[0] for r in table_rows(report) if "accuracy" in r[0]] == []
    report["profiles"]["int8"]["accuracy"] = 0.5  # a labelled source: that row, and the clip row stays out
    assert [r for r in table_rows(report) if "accuracy" in r[0]] == [["accuracy", "-", "50.0%"]]
    # one unit along a row: fp16's half-size cache read as kB beside the fp32 cache in MB
    report["profiles"]["fp32"]["cache_bytes"], report["profiles"]["int8"]["cache_bytes"] = 102_400, 51_200
    assert next(r for r in table_rows(report) if r[0] == "cache / stream")[1:] == ["0.102 MB", "0.051 MB"]


def test_a_run_too_short_for_a_drift_trend_shows_none_for_every_profile(stateful: Path) -> None:
    """Under 8 frames there are no quarters to compare: the table said "nan (nan)" for the profiles
    and "1.00 (1.00)" for the reference."""
    report = compare(stateful, ["fp32", "int8"], "synthetic:2", 5, plots=False)
    assert all(np.isnan(r["free_running"]["growth"]) for r in report["profiles"].values())
    growth_row = next(r for r in table_rows(report) if r[0].startswith("drift growth"))
    assert growth_row[1:] == ["-", "-"]
    longer = compare(stateful, ["fp32", "int8"], "synthetic:2", 12, plots=False)
    assert longer["profiles"]["fp32"]["free_running"]["growth"] == 1.0
    assert np.isfinite(longer["profiles"]["int8"]["free_running"]["growth"])


@pytest.mark.parametrize("frames", [2.5, True, "10"])
def test_compare_frames_must_be_an_integer(stateful: Path, frames: object) -> None:
    with pytest.raises(ValueError, match="--frames must be an integer of at least 1"):
        compare(stateful, ["fp32", "int8"], "synthetic", frames)


def test_compare_writes_report_plots_and_polygraphy_inputs(tmp_path: Path, stateful: Path, video: Path) -> None:
    out = tmp_path / "cmp"
    report = compare(stateful, ["fp32", "fp16", "int8", "int8-lowmem"], str(video), 80, out_dir=out, threads=1,
                     save_polygraphy_inputs=True, polygraphy_frames=3)
    assert report["frames"] == 80 and not report["labelled"]
    for name in ("report.json", "report.md", "drift.png", "latency.png", "series.npz"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    saved = json.loads((out / "report.json").read_text())
    row = saved["profiles"]["int8-lowmem"]
    for key in ("ms_p50", "ms_p95", "cache_bytes", "weight_bytes", "teacher_forced", "free_running",
                "top1_agreement"):
        assert key in row
    for key in ("end_abs_err", "end_cosine", "worst_abs_err", "worst_frame", "growth"):
        assert key in row["free_running"]
    assert saved["profiles"]["int8-lowmem"]["cache_bytes"] < saved["profiles"]["fp16"]["cache_bytes"] \
        < saved["profiles"]["fp32"]["cache_bytes"]
    assert "| int8-lowmem |" in (out / "report.md").read_text()
    assert saved["frame_fit"] is None  # square frames for a square model: nothing to say
    # each precision's ms/frame belongs to the CPU it ran on (INT8 on VNNI or AMX): the host is named, as by bench
    import onnxruntime

    assert saved["host"]["onnxruntime"] == onnxruntime.__version__ and saved["host"]["logical_cpus"] == os.cpu_count()
    assert f"Host: {saved['host']['cpu']}" in (out / "report.md").read_text()
    # a bounded reference (the GRU's state; the running mean's sum is left out) raises no growth note
    assert 0.5 < saved["reference_state_growth"]["ratio"] < 2
    assert "grows without bound" not in (out / "report.md").read_text()
    assert (out / "drift.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    from polygraphy.json import load_json

    man = load_manifest(stateful)
    for profile in ("fp32", "fp16", "int8-lowmem"):
        feeds = load_json(str(out / f"polygraphy_inputs.{profile}.json"))
        assert isinstance(feeds, list) and len(feeds) == 3
        with Session(stateful, profile=profile) as s:
            dtypes = s._backend.state_dtypes()
        for feed in feeds:
            assert feed["frame"].shape == (1, 3, 32, 32) and feed["frame"].dtype == np.float32
            for st in man["states"]:
                assert feed[st["input"]].dtype == dtypes[st["name"]]
    # the recorded states are the FP32 run's: the 3rd feed (frame 79) has seen 79 frames
    assert load_json(str(out / "polygraphy_inputs.fp32.json"))[2]["state_in.mean.count"].item() == 79.0


def test_compare_says_when_its_accuracies_are_of_squeezed_frames(stateful: Path) -> None:
    """A precision's accuracy on 16:9 clips squeezed into a model trained on centre crops says little
    about the precision; the report says how the frames were fitted, with the fix."""
    from edge3d.compare import report_notes

    wide = [np.random.default_rng(i).integers(0, 256, (36, 64, 3), dtype=np.uint8) for i in range(6)]
    report = compare(stateful, ["fp32", "fp16"], wide, 6, threads=1)
    assert report["frame_fit"].startswith("64×36 (width×height) images resized whole to the model's 32×32, "
                                          "squeezed 1.78× across; if the model was trained on centre crops")
    assert report_notes(report)[0] == f"frames: {report['frame_fit']}."



def test_compare_takes_a_faster_videos_frames_at_the_models_rate(stateful: Path, video: Path, tmp_path: Path) -> None:
    """A precision's drift and agreement are measured on the frames the deployed model gets: for a 15 fps
    model, every 2nd frame of the 30 fps video, as `edge3d run` feeds it; the report says so."""
    from edge3d.exporters.onnx import set_frame

    from edge3d.compare import report_notes

    art = tmp_path / stateful.name
    shutil.copytree(stateful, art)
    with pytest.warns(UserWarning, match="calibrated on frames prepared the old way"):  # its INT8 precision
        set_frame(art, fps=15)
    report = compare(art, ["fp32", "fp16"], str(video), 500, threads=1)
    assert report["frames"] == 45
    assert report["frame_rate"] == "the model takes 15 fps; every 2nd frame of 30 fps (45 of 90 frames stepped)"
    assert f"frame rate: {report['frame_rate']}." in report_notes(report)

def test_polygraphy_replays_the_saved_inputs(tmp_path: Path, stateful: Path, video: Path) -> None:
    if shutil.which("polygraphy") is None:
        pytest.skip("the polygraphy command is not on PATH")
    out = tmp_path / "cmp"
    compare(stateful, ["fp32", "fp16"], str(video), 20, out_dir=out, save_polygraphy_inputs=True, threads=1,
            polygraphy_frames=2, plots=False)
    for profile in ("fp32", "fp16"):
        r = subprocess.run(["polygraphy", "run", str(stateful / f"model.{profile}.onnx"), "--onnxrt",
                            "--load-inputs", str(out / f"polygraphy_inputs.{profile}.json")],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]


def test_cli_compare(tmp_path: Path, stateful: Path, video: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from edge3d import cli
    from edge3d.cli import app

    runner = CliRunner()
    out = tmp_path / "report"
    monkeypatch.setattr(cli.console, "width", 70)  # four profiles, a narrow terminal: metric names wrap
    r = runner.invoke(app, ["compare", str(stateful), "--profiles", "fp32,fp16,int8,int8-lowmem", "--source",
                            str(video), "--frames", "40", "--out", str(out), "--save-polygraphy-inputs"])
    assert r.exit_code == 0, r.output
    assert "edge3d compare" in r.output and "int8-lowmem" in r.output and "fp16" in r.output
    assert "…" not in r.output  # no profile name or number cut short
    assert "polygraphy run" in r.output and "[I]" not in r.output
    saved = json.loads((out / "report.json").read_text())
    assert saved["frames"] == 40 and f"host: {saved['host']['cpu']}" in r.output
    # compare's ms/frame are one ORT thread's, bench's both cores': the line says which
    said_flat = " ".join(r.output.split())
    assert "ms/frame with 1 ONNX Runtime thread per session (--threads; `edge3d bench` times one session " \
        "alone)" in said_flat, said_flat
    assert "ms/frame with 1 ONNX Runtime thread per session" in (out / "report.md").read_text()
    said = "".join(r.output.split())
    unnamed = [f.name for f in out.iterdir() if f.name not in said]
    assert not unnamed, f"compare wrote {unnamed} without saying so"
    empty = tmp_path / "empty"
    empty.mkdir()
    for args, words in (
        (["--profiles", "fp32,int4", "--source", str(video)], "has no 'int4' precision"),
        (["--profiles", "fp32,int8", "--source", str(empty)], "holds no video files"),
        (["--profiles", "fp32,int8", "--source", str(video), "--frames", "0"], "--frames must be an integer of at least 1"),
        (["--source", str(video), "--source", str(empty)], "--source was given 2 times, and compare reads one source"),
    ):
        r = runner.invoke(app, ["compare", str(stateful), *args, "--out", str(tmp_path / "x")], terminal_width=250)
        assert r.exit_code == 2, r.output
        assert words in r.output and "Traceback" not in r.output


def test_a_list_of_paths_as_the_source_is_named_as_such(stateful: Path, video: Path, tmp_path: Path) -> None:
    """A list is a source of frames from Python, so two video paths were read as two frames and refused
    as "frame dtype <U…" instead of as the paths they are."""
    said = "the source is a list of 2 paths, and one source is read; put the videos"
    with pytest.raises(ValueError, match=said):
        compare(stateful, ["fp32", "fp16"], [str(video), video], 10)
    copy = shutil.copytree(stateful, tmp_path / "copy")
    before = sorted(p.name for p in copy.iterdir())
    with pytest.raises(ValueError, match=said):
        add_precisions(copy, ["int8"], calib_source=[str(video), str(video)])
    assert sorted(p.name for p in copy.iterdir()) == before


def test_compare_needs_no_torch(stateful: Path, video: Path, tmp_path: Path) -> None:
    """The comparison is numpy + the runtime: it must run where torch is not installed."""
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from edge3d.compare import compare\n"
        f"r = compare({str(stateful)!r}, 'fp32, int8', {str(video)!r}, 10, out_dir={str(tmp_path)!r})\n"
        "print(r['frames'], *r['profiles'])\n"
    )
    env_path = str(Path(__file__).resolve().parents[1])
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={"PYTHONPATH": env_path, "PATH": "/usr/bin:/bin"})
    # the profiles given as one string are its comma-separated names, not its letters
    assert r.returncode == 0 and r.stdout.strip() == "10 fp32 int8", r.stderr[-2000:]


class _Doubling(torch.nn.Module):
    """A recurrence that doubles its state every frame: FP32 holds it for hundreds of frames, float16
    overflows (> 65504) within about twenty."""

    def __init__(self) -> None:
        super().__init__()
        from edge3d.nn import RecurrentConv

        self.rc = RecurrentConv(3, 4, 1)
        with torch.no_grad():
            self.rc.hh.weight.copy_(2 * torch.eye(4).view(4, 4, 1, 1))
            self.rc.xh.weight.fill_(1.0)
        self.fc = torch.nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.rc(x).mean(dim=(3, 4))
        return self.fc(y.transpose(1, 2)).transpose(1, 2)


def test_compare_and_run_say_where_float16_overflows(tmp_path: Path) -> None:
    from edge3d.exporters.onnx import export_artifact
    from typer.testing import CliRunner

    from edge3d.cli import app

    torch.manual_seed(0)
    art = export_artifact(_Doubling().eval(), tmp_path, "doubling", frame_size=8)
    add_precisions(art, "fp16")
    frames = [np.full((8, 8, 3), 200, np.uint8)] * 30
    report = compare(art, "fp32,fp16", frames, 30, out_dir=tmp_path / "c", plots=False)
    nf = report["profiles"]["fp16"]["free_running"]["first_nonfinite"]
    # The state is c·(2^(t+1) − 1) with c the per-frame input term: float16 holds it up to 65504.
    with Session(art) as s:
        states = [float(np.abs(s.get_state()["rc.hidden"]).max()) for _ in frames if s.step(frames[0]) is not None]
    expected = next(t for t, v in enumerate(states) if v > 65504)
    assert nf["frame"] == expected and nf["state"] == "rc.hidden", nf
    assert nf["reference_max_abs_state"] == pytest.approx(states[expected], rel=1e-6)
    assert report["profiles"]["fp32"]["free_running"]["first_nonfinite"] is None
    text = (tmp_path / "c" / "report.md").read_text()
    assert f"fp16: the output is not finite from frame {expected}, where state rc.hidden overflowed" in text
    assert "beyond float16's largest value (65504)" in text
    # the FP32 reference's own state doubles every frame: the report says its figures are the model's.
    # compare samples the state going into each frame, states[t - 1]; quarters of 7 frames.
    growth = report["reference_state_growth"]
    assert growth["ratio"] == pytest.approx(np.mean(states[20:29]) / np.mean(states[6:13]), rel=1e-5)
    assert growth["max_abs"] == pytest.approx(states[28], rel=1e-6)
    assert f"the reference's own state grows without bound (its largest value rose {growth['ratio']:.3g}x" in text
    # report.json is strict JSON: NaN/inf became null
    strict = json.loads((tmp_path / "c" / "report.json").read_text(),
                        parse_constant=lambda c: pytest.fail(f"report.json holds {c}"))
    assert strict["profiles"]["fp16"]["free_running"]["end_abs_err"] is None
    # `edge3d run` on the fp16 profile says so in its summary, and its JSONL stays strict JSON
    video = write_video(tmp_path / "flat.mp4", frames)
    res = CliRunner().invoke(app, ["run", str(art), "--profile", "fp16", "--source", str(video),
                                   "--output", str(tmp_path / "p.jsonl")], terminal_width=200)
    assert res.exit_code == 0, res.output
    assert f"{30 - expected} frames, from frame {expected}" in res.output
    lines = [json.loads(x, parse_constant=lambda c: pytest.fail(f"JSONL holds {c}"))
             for x in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert all(x["score"] is not None for x in lines[:expected])
    assert any(x["score"] is None for x in lines[expected:])  # NaN scores are null, not a bare NaN


def test_compare_blames_the_model_not_a_profile_when_fp32_itself_overflows(tmp_path: Path) -> None:
    """The doubling state leaves float32's range after about 125 frames: the reference's output goes
    inf first, and a profile that follows it must not read as that precision's fault."""
    from edge3d.exporters.onnx import export_artifact

    from edge3d.compare import report_notes

    art = export_artifact(_Doubling().eval(), tmp_path, "doubling", frame_size=8)
    copy = tmp_path / "copy.toml"
    copy.write_text('name = "fp32-copy"\nweight_dtype = "float32"\n')
    add_precisions(art, [str(copy)])
    frames = [np.full((8, 8, 3), 200, np.uint8)] * 140
    with Session(art) as s, np.errstate(all="ignore"):
        expected = next(t for t, f in enumerate(frames) if not np.isfinite(s.step(f)).all())
    assert 100 < expected < 140
    report = compare(art, "fp32,fp32-copy", frames, 140, out_dir=tmp_path / "c", plots=False)
    assert report["reference_first_nonfinite"]["frame"] == expected
    assert report["profiles"]["fp32"]["free_running"]["first_nonfinite"]["frame"] == expected
    text = "\n".join(report_notes(report))
    assert f"fp32: the reference's own output is not finite from frame {expected}" in text
    assert f"fp32-copy: the output is not finite from frame {expected}, after the FP32 reference's " \
           f"(frame {expected}): the model overflows, not this precision." in text
    assert "its largest value overflowed float32" in text  # growth past float32: no ratio to print
    saved = json.loads((tmp_path / "c" / "report.json").read_text())
    assert saved["reference_state_growth"]["ratio"] is None  # infinity, written as null
    # the Python API may leave FP32 out of the profiles: the reference's overflow is still reported
    report = compare(art, "fp32-copy", frames, 140, plots=False)
    assert "fp32" not in report["profiles"] and report["reference_first_nonfinite"]["frame"] == expected
    assert "after the FP32 reference's" in "\n".join(report_notes(report))


def test_ctrl_c_reports_the_frames_every_profile_finished(stateful: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A long comparison stopped with Ctrl-C still writes its report, over the frames done, and the
    CLI exits 130 as `run` does; stopped before any frame, it is simply interrupted."""
    from typer.testing import CliRunner

    from edge3d import compare as compare_module
    from edge3d.cli import app

    frames = [f for f, _ in pattern_stream(60, seed=5)]

    def stop_at(n: int):
        def progress(_: int) -> None:
            progress.calls += 1
            if progress.calls == n:
                raise KeyboardInterrupt
        progress.calls = 0
        return progress

    out = tmp_path / "py"
    report = compare(stateful, ["fp32", "fp16", "int8"], frames, 60, out_dir=out, threads=1, progress=stop_at(25))
    assert report["interrupted"] and report["frames"] == 25
    series = np.load(out / "series.npz")
    assert all(len(series[k]) == 25 for k in series.files) and len(series.files) == 6
    assert json.loads((out / "report.json").read_text())["interrupted"] is True
    assert report["interrupted_by"] == "SIGINT"
    assert "25 frames in 1 stream(s) (interrupted" in (out / "report.md").read_text()
    full = compare(stateful, ["fp32", "fp16", "int8"], frames[:25], 25, threads=1, plots=False)
    assert not full["interrupted"]
    for p in ("fp16", "int8"):  # the same numbers as a run of just those frames
        assert report["profiles"][p]["teacher_forced"] == full["profiles"][p]["teacher_forced"]

    def no_frames():
        raise KeyboardInterrupt
        yield

    with pytest.raises(KeyboardInterrupt):
        compare(stateful, ["fp32", "fp16"], no_frames(), 10, threads=1, plots=False)

    # Ctrl-C in the middle of frame 20 (two profiles besides fp32, one cosine each per frame)
    calls = {"n": 0}
    cosine = compare_module._cosine

    def interrupting_cosine(a: np.ndarray, b: np.ndarray) -> float:
        calls["n"] += 1
        if calls["n"] == 2 * 20 + 2:
            raise KeyboardInterrupt
        return cosine(a, b)

    monkeypatch.setattr(compare_module, "_cosine", interrupting_cosine)
    video = tmp_path / "clip.mp4"
    write_video(video, frames)
    res = CliRunner().invoke(app, ["compare", str(stateful), "--profiles", "fp32,fp16,int8", "--source", str(video),
                                   "--frames", "60", "--out", str(tmp_path / "cli")])
    assert res.exit_code == 130, res.output
    said = " ".join(res.output.split())  # the table's title wraps with its width
    assert "20 frames, interrupted" in said and "interrupted after 20 frames; the report covers those" in said
    assert json.loads((tmp_path / "cli" / "report.json").read_text())["frames"] == 20

    # SIGTERM (`timeout`, `docker stop`) killed it outright, with no report; now it ends the same way, exit 143.
    # The signal is sent for real; the test's own handler stands for the default, which would kill pytest.
    import os
    import signal

    def not_taken(signum: int, frame: object) -> None:
        raise RuntimeError("SIGTERM reached the test's own handler: compare did not take it")

    def terminating_cosine(a: np.ndarray, b: np.ndarray) -> float:
        calls["n"] += 1
        if calls["n"] == 2 * 20 + 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return cosine(a, b)

    calls["n"] = 0
    monkeypatch.setattr(compare_module, "_cosine", terminating_cosine)
    previous = signal.signal(signal.SIGTERM, not_taken)
    try:
        res = CliRunner().invoke(app, ["compare", str(stateful), "--profiles", "fp32,fp16,int8", "--source",
                                       str(video), "--frames", "60", "--out", str(tmp_path / "term")])
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert res.exit_code == 143, res.output
    assert "terminated after 20 frames; the report covers those" in " ".join(res.output.split())
    saved = json.loads((tmp_path / "term" / "report.json").read_text())
    assert saved["frames"] == 20 and saved["interrupted_by"] == "SIGTERM"


def test_compare_tables_split_by_profiles_to_fit_the_terminal_and_keep_the_metric_names() -> None:
    """Five profiles whose drift cells read like "0.00198 @ 679" did not fit 80 columns in one table, and
    rich squeezed the metric column to nothing: rows of numbers with no names."""
    import io

    from rich.console import Console

    from edge3d.cli import compare_tables
    from edge3d.compare import METRICS

    profiles = ["fp32", "fp16", "int8", "int8-cpu", "int8-lowmem"]
    rows = [[m, *[f"0.00{i}98 @ 67{i}" for i in range(len(profiles))]] for m in METRICS]
    for width, groups in ((80, [4, 1]), (200, [5]), (40, [1] * 5)):
        tables = compare_tables("edge3d compare: m on s", rows, profiles, width)
        assert [len(t.columns) - 1 for t in tables] == groups, width
        out = io.StringIO()
        console = Console(file=out, width=width)
        for t in tables:
            console.print(t)
        text = out.getvalue()
        assert max(len(line) for line in text.splitlines()) <= width and "…" not in text
        assert all(p in text for p in profiles) and text.count("0.00498 @ 674") == len(METRICS)  # once per row
        lines = text.splitlines()
        for m in METRICS:  # each metric's first word starts a row of every table
            first = m.split()[0]
            assert sum(line.startswith(f"│ {first}") for line in lines) >= len(tables), (width, m, text)
