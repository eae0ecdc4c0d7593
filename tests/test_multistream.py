"""Many streams in one Session: batched calls must equal separate sessions, bit for bit, and a
rejected call must leave every stream's state untouched."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from edge3d.runtime import Session

STREAMS = 4
FRAMES = 36


def _frames(seed: int, t: int, n: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((t, n, 3, 32, 32)).astype(np.float32)


def _states_equal(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("max_batch", [None, 3, 1])
def test_batched_equals_separate_sessions_with_subsets_and_reset(stream_artifact: Path, max_batch) -> None:
    """Full calls, shuffled subsets and a mid-stream reset of one stream, against one Session per stream;
    also when calls run in chunks of ``max_batch`` rows (3 of 4 streams: a full chunk and a partial one)."""
    rng = np.random.default_rng(1)
    frames = _frames(0, FRAMES, STREAMS)
    batched = Session(stream_artifact, streams=STREAMS, max_batch=max_batch)
    single = [Session(stream_artifact) for _ in range(STREAMS)]
    stepped = np.zeros(STREAMS, int)
    worst = 0.0
    for t in range(FRAMES):
        if t % 3 == 0:
            ids = np.arange(STREAMS)  # everyone, in order: the ping-pong path
        else:
            k = int(rng.integers(1, STREAMS + 1))
            ids = rng.permutation(STREAMS)[:k]  # a shuffled subset (k == STREAMS: a permutation)
        if t == FRAMES // 2:
            batched.reset(2)
            single[2].reset()
        got = batched.step_batch(frames[t, ids], ids.tolist())
        want = np.stack([single[i].step(frames[t, i]) for i in ids])
        assert got.shape == want.shape
        worst = max(worst, float(np.abs(got - want).max()))
        stepped[ids] += 1
    assert (stepped >= FRAMES // 3).all()
    assert worst <= 1e-5, f"batched outputs differ from separate sessions by {worst}"
    # and the states themselves, row by row
    state = batched.get_state()
    for i, s in enumerate(single):
        for name, rows in state.items():
            np.testing.assert_allclose(rows[i], s.get_state()[name][0], atol=1e-5)


@pytest.mark.parametrize("max_batch", [None, 2])
def test_a_thread_per_stream_on_one_session_equals_separate_sessions(stream_artifact: Path, max_batch) -> None:
    """A thread per camera, each stepping its own stream id of one shared session (while another
    thread snapshots the state and reads the latency), must give each stream exactly what a session
    of its own gives. Unserialised, the threads swapped the shared ping-pong parity and staging
    buffer under each other: the outputs here were off by 39.6, and with max_batch the process
    crashed."""
    import threading

    frames = _frames(3, FRAMES * 2, STREAMS)
    shared = Session(stream_artifact, streams=STREAMS, max_batch=max_batch)
    got: dict[int, list[np.ndarray]] = {i: [] for i in range(STREAMS)}
    failures: list[BaseException] = []
    start = threading.Barrier(STREAMS + 1)

    def camera(i: int) -> None:
        try:
            start.wait()
            for t in range(len(frames)):
                got[i].append(shared.step(frames[t, i], stream=i))
        except BaseException as e:  # reported below, not lost in the thread
            failures.append(e)

    def watcher() -> None:
        try:
            start.wait()
            for _ in range(50):
                if any(a.shape[0] != STREAMS for a in shared.get_state().values()):
                    failures.append(AssertionError("a snapshot lost its stream rows"))
                for _ in range(20):  # a monitoring thread reads the latency while the cameras step
                    shared.stats.summary()
        except BaseException as e:
            failures.append(e)

    threads = [threading.Thread(target=camera, args=(i,)) for i in range(STREAMS)]
    threads.append(threading.Thread(target=watcher))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures
    for i in range(STREAMS):
        with Session(stream_artifact) as own:
            want = np.stack([own.step(frames[t, i]) for t in range(len(frames))])
        worst = float(np.abs(np.stack(got[i]) - want).max())
        assert worst <= 1e-5, f"stream {i} differs from its own session by {worst}"
    assert shared.stats.summary()["frames"] == STREAMS * len(frames)


def test_reset_changes_only_that_stream(stream_artifact: Path) -> None:
    frames = _frames(2, 4, STREAMS)
    s = Session(stream_artifact, streams=STREAMS)
    for t in range(4):
        s.step_batch(frames[t])
    before = s.get_state()
    s.reset(1)
    after = s.get_state()
    fresh = Session(stream_artifact, streams=STREAMS).get_state()
    for name in before:
        assert not np.array_equal(before[name][1], fresh[name][1]) or not before[name][1].any()
        np.testing.assert_array_equal(after[name][1], fresh[name][1])
        for i in (0, 2, 3):
            np.testing.assert_array_equal(after[name][i], before[name][i])


def test_one_stream_snapshot_moves_a_camera_between_sessions(stream_artifact: Path) -> None:
    """get_state(stream=k) from one session, set_state(..., stream=j) into another: stream j then
    continues exactly as k would have, over many frames, and the other streams are not touched."""
    frames = _frames(3, 24, STREAMS)
    a = Session(stream_artifact, streams=STREAMS)
    b = Session(stream_artifact, streams=3)
    for t in range(10):
        a.step_batch(frames[t])
        b.step_batch(frames[t, 1:])
    moved = a.get_state(stream=2)
    assert all(v.shape[0] == 1 for v in moved.values())
    before = b.get_state()
    b.set_state(moved, stream=0)
    after = b.get_state()
    for name in before:
        assert np.array_equal(after[name][0], moved[name][0])
        assert np.array_equal(after[name][1:], before[name][1:])  # the other cameras are left as they were
    for t in range(10, 24):  # as the batched-vs-separate test: another batch size may round differently
        np.testing.assert_allclose(b.step(frames[t, 2], stream=0), a.step_batch(frames[t])[2], atol=1e-5)
    one = Session(stream_artifact)
    one.set_state(a.get_state(stream=1))  # a 1-stream session takes a one-stream snapshot as its whole state
    for t in range(6):
        np.testing.assert_allclose(one.step(frames[t, 0]), a.step_batch(frames[t, :1], [1])[0], atol=1e-5)


def test_bad_one_stream_snapshot_is_refused_and_leaves_every_state(stream_artifact: Path) -> None:
    s = Session(stream_artifact, streams=STREAMS)
    s.step_batch(_frames(4, 1, STREAMS)[0])
    before = s.get_state()
    with pytest.raises(ValueError, match=r"expected float32\[1, .*pass a one-stream snapshot, get_state\(stream=k\)"):
        s.set_state(before, stream=1)  # every stream's rows into one stream
    with pytest.raises(ValueError, match="stream id 4 is out of range"):
        s.set_state(s.get_state(stream=0), stream=4)
    with pytest.raises(ValueError, match="stream id 7 is out of range"):
        s.get_state(stream=7)
    assert _states_equal(s.get_state(), before)


@pytest.mark.parametrize("max_batch", [None, 2])
@pytest.mark.parametrize("case", ["nan", "inf", "wrong_shape", "wrong_dtype", "unknown_id", "negative_id",
                                  "duplicate_id", "bool_id", "float_id", "too_few_frames", "generator"])
def test_rejected_batch_leaves_every_state_unchanged(stream_artifact: Path, case: str, max_batch) -> None:
    frames = _frames(3, 3, STREAMS)
    s = Session(stream_artifact, streams=STREAMS, max_batch=max_batch)
    s.step_batch(frames[0])
    s.step_batch(frames[1, :2], [3, 0])  # staging buffers exist, states differ per stream
    before = s.get_state()
    good = [frames[2, i] for i in range(3)]
    bad_frame = frames[2, 0].copy()
    ids: list = [2, 0, 1]
    batch = list(good)
    if case == "nan":
        bad_frame[1, 5, 5] = np.nan
        batch[2] = bad_frame  # the last frame is bad: the first two were already preprocessed
    elif case == "inf":
        bad_frame[0, 0, 0] = np.inf
        batch[1] = bad_frame
    elif case == "wrong_shape":
        batch[2] = bad_frame[:, :16]
    elif case == "wrong_dtype":
        batch[2] = bad_frame.astype(np.int32)
    elif case == "unknown_id":
        ids = [2, 0, STREAMS]
    elif case == "negative_id":
        ids = [2, -1, 1]
    elif case == "duplicate_id":
        ids = [2, 0, 2]
    elif case == "bool_id":
        ids = [True, False, True]
    elif case == "float_id":
        ids = [2.0, 0.0, 1.0]
    elif case == "too_few_frames":
        batch = batch[:2]
    elif case == "generator":
        batch = (f for f in good)
    says = {"generator": "frames is a generator; pass a list or an array", "too_few_frames": "got 2 frames for 3"}
    with pytest.raises(ValueError, match=says.get(case)):
        s.step_batch(batch, ids)
    assert _states_equal(before, s.get_state()), f"a rejected batch ({case}) changed a stream's state"
    # the session still works, and gives what a session that never saw the bad call gives
    twin = Session(stream_artifact, streams=STREAMS)
    twin.set_state(before)
    np.testing.assert_array_equal(s.step_batch(good, [2, 0, 1]), twin.step_batch(good, [2, 0, 1]))


def test_rejected_single_step_leaves_state_unchanged(stream_artifact: Path) -> None:
    s = Session(stream_artifact, streams=2)
    s.step_batch(_frames(4, 1, 2)[0])
    before = s.get_state()
    for bad_stream in (2, -1, True, 1.0):
        with pytest.raises(ValueError):
            s.step(_frames(5, 1, 1)[0, 0], bad_stream)
    assert _states_equal(before, s.get_state())


def test_max_batch_keeps_one_state_set_and_bounded_staging(stream_artifact: Path) -> None:
    """Chunked sessions hold each stream's state once; staging stays max_batch rows however many streams."""
    plain = Session(stream_artifact, streams=8)
    chunked = Session(stream_artifact, streams=8, max_batch=2)
    frames = _frames(7, 3, 8)
    for t in range(3):
        np.testing.assert_array_equal(chunked.step_batch(frames[t]), plain.step_batch(frames[t]))
    assert len(plain._backend._full.states) == 2 and len(chunked._backend._full.states) == 1
    staging = chunked._backend._staging
    assert staging is not None and {a.shape[0] for half in staging for a in half.values()} == {2}
    # max_batch >= streams changes nothing: one ping-pong call, as without it
    assert Session(stream_artifact, streams=2, max_batch=4)._backend.max_batch is None


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_bad_max_batch_is_rejected(stream_artifact: Path, bad) -> None:
    with pytest.raises(ValueError, match=r"--max-batch \(max_batch in Python\) must be a positive integer"):
        Session(stream_artifact, streams=4, max_batch=bad)


def test_streams_whose_buffers_cannot_fit_are_refused_before_allocating(stream_artifact: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import edge3d.runtime.session as session_module

    # a million streams asked numpy for gigabytes of frame buffer and died in a traceback
    with pytest.raises(ValueError, match=r"streams=100000000 needs [\d,.]+ GB of buffers \([\d.]+ [kM]B per stream\), "
                                         r"more than the [\d.]+ GB of memory free here; use fewer streams"):
        Session(stream_artifact, streams=10**8)
    m = json.loads((stream_artifact / "manifest.json").read_text())
    per_stream = 2 * sum(s["bytes"] for s in m["states"]) + 4 * 3 * 32 * 32 + 4 * int(np.prod(m["output"]["shape"][1:]))
    monkeypatch.setattr(session_module, "memory_available", lambda: 4 * per_stream)
    assert Session(stream_artifact, streams=4).streams == 4
    with pytest.raises(ValueError, match="streams=5 needs"):
        Session(stream_artifact, streams=5)


def test_many_subset_sizes_share_one_staging_buffer(stream_artifact: Path) -> None:
    """Staging rows follow the largest subset so far, not the sum over the subset sizes used."""
    s = Session(stream_artifact, streams=6)
    twin = [Session(stream_artifact) for _ in range(6)]
    frames = _frames(6, 1, 6)[0]
    largest = 0
    for k in (2, 1, 4, 3, 2, 5):
        ids = list(range(k))[::-1]
        got = s.step_batch(frames[ids], ids)
        np.testing.assert_allclose(got, np.stack([twin[i].step(frames[i]) for i in ids]), atol=1e-5)
        largest = max(largest, k)
        staging = s._backend._staging
        assert staging is not None
        assert {a.shape[0] for half in staging for a in half.values()} == {largest}


def test_measure_streams_report(stream_artifact: Path) -> None:
    """The benchmark runs end to end and its figures hang together (not their values: timing here is noisy)."""
    from edge3d.bench_streams import measure_streams

    r = measure_streams(stream_artifact, [1, 3], frames=3, threads=1, rss_repeats=1)
    assert [row["streams"] for row in r["rows"]] == [1, 3]
    s = Session(stream_artifact)
    assert r["state_bytes_per_stream"] == s.cache_bytes == sum(st["bytes"] for st in s.manifest["states"])
    for row in r["rows"]:
        n = row["streams"]
        assert row["batched_fps"] == pytest.approx(1e3 * n / row["batched_ms_per_call"])
        assert row["separate_fps"] == pytest.approx(1e3 * n / row["separate_ms_per_round"])
        assert 0 < row["gather_scatter_ms"] and 0 < row["gather_scatter_share"] < 1
        assert row["rss_batched_bytes"] > 10e6 and row["rss_separate_bytes"] > 10e6
    three = r["rows"][1]
    # a separate session carries its own weights and ONNX Runtime session; a batched stream does not
    assert three["rss_per_extra_session"] > three["rss_per_extra_batched_stream"]
    assert "rss_per_extra_batched_stream" not in r["rows"][0]
    # with N = 1 and 3 measured, the slope from the next smaller N is the average over the extra streams
    assert three["rss_per_extra_batched_stream_marginal"] == pytest.approx(three["rss_per_extra_batched_stream"])


def test_settle_waits_until_the_process_is_idle() -> None:
    """A fixed 10 ms pause before each timed call was shorter than ONNX Runtime's threads spin after a
    run on some hosts (25 ms for one session, 70 ms for four), so the call shared the cores with them."""
    import threading
    import time

    from edge3d.bench_streams import settle

    def spin(seconds: float) -> None:  # a pool thread spinning after a run
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            pass

    t = threading.Thread(target=spin, args=(0.2,))
    t0 = time.perf_counter()
    t.start()
    settle(0.01)
    waited = time.perf_counter() - t0
    t.join()
    assert waited >= 0.19, waited  # not before the spinning stopped
    t0 = time.perf_counter()
    settle(0.01)
    assert time.perf_counter() - t0 < 0.9  # an idle process goes on before the 1 s cap


def test_sessions_can_let_onnx_runtimes_threads_sleep_between_runs(stream_artifact: Path) -> None:
    """N one-stream sessions stepped in turn spin against each other (host C: 67 frames/s for four
    full-size d-resnet18 sessions, 118 with spin=False); the option must reach ONNX Runtime, and
    change nothing else."""
    key = "session.intra_op.allow_spinning"
    still = Session(stream_artifact, spin=False)
    assert still._backend.sess.get_session_options().get_session_config_entry(key) == "0"
    default = Session(stream_artifact)
    with pytest.raises(RuntimeError):  # ONNX Runtime's default, which spins
        default._backend.sess.get_session_options().get_session_config_entry(key)
    frames = np.random.default_rng(3).standard_normal((6, 3, 32, 32)).astype(np.float32)
    for f in frames:
        assert np.array_equal(still.step(f), default.step(f))
    with pytest.raises(ValueError, match="spin must be True or False, got 'no'"):
        Session(stream_artifact, spin="no")


def test_cli_bench_streams_json(stream_artifact: Path) -> None:
    import json

    from typer.testing import CliRunner

    from edge3d.cli import app

    res = CliRunner().invoke(app, ["bench-streams", str(stream_artifact), "--streams", "2", "--frames", "2",
                                   "--no-rss", "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.output)
    assert report["rows"][0]["streams"] == 2 and "rss_batched_bytes" not in report["rows"][0]
    assert report["host"]["logical_cpus"] == os.cpu_count() and report["host"]["onnxruntime"]
    assert "cpu_count" not in report  # once, under host
    assert report["spin"] is True
    res = CliRunner().invoke(app, ["bench-streams", str(stream_artifact), "--streams", "2", "--frames", "2",
                                   "--no-rss", "--json", "--no-spin"])
    assert res.exit_code == 0 and json.loads(res.output)["spin"] is False, res.output
    res = CliRunner().invoke(app, ["bench-streams", str(stream_artifact), "--streams", "3", "--frames", "2",
                                   "--no-rss", "--json", "--max-batch", "2"])
    assert res.exit_code == 0, res.output
    chunked = json.loads(res.output)
    state = chunked["state_bytes_per_stream"]
    assert chunked["max_batch"] == 2 and report["max_batch"] is None
    # one state set per stream instead of the ping-pong pair
    assert report["runtime_buffer_bytes_per_stream"] - chunked["runtime_buffer_bytes_per_stream"] == state
    bad = CliRunner().invoke(app, ["bench-streams", str(stream_artifact), "--streams", "0"])
    assert bad.exit_code == 2
    res = CliRunner().invoke(app, ["bench-streams", str(stream_artifact), "--streams", "2,1,2", "--frames", "2",
                                   "--no-rss", "--json"])
    assert res.exit_code == 0 and [r["streams"] for r in json.loads(res.output)["rows"]] == [2, 1]  # measured once
    bad = CliRunner().invoke(app, ["bench-streams", str(stream_artifact), "--streams", "2", "--max-batch", "0"])
    assert bad.exit_code == 2 and "--max-batch (max_batch in Python) must be a positive integer, got 0; leave it " \
        "out to run all streams in one call." in " ".join(bad.output.split()), bad.output


def test_cli_bench_streams_tables_fit_80_columns_without_cutting_a_number(
        stream_artifact: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from edge3d import cli
    from edge3d.bench_streams import MEMORY_HEADERS, THROUGHPUT_HEADERS, format_rows

    monkeypatch.setattr(cli.console, "width", 80)  # a log or an 80-column terminal
    res = CliRunner().invoke(cli.app, ["bench-streams", str(stream_artifact), "--streams", "1,2", "--frames", "2",
                                       "--no-rss"])
    assert res.exit_code == 0, res.output
    assert "…" not in res.output and all(h in res.output for h in THROUGHPUT_HEADERS)
    assert "resident memory" not in res.output  # --no-rss: no table of dashes
    assert max(len(line) for line in res.output.splitlines()) <= 80
    # the memory table's cells, from a report with known numbers
    report = {"state_bytes_per_stream": 100_000, "rows": [
        {"streams": 1, "batched_fps": 1000.0, "separate_fps": 990.0, "batched_over_separate": 1.01,
         "batched_over_separate_cpu": 1.0, "batched_ms_per_call": 1.0, "gather_scatter_share": 0.05},
        {"streams": 4, "batched_fps": 2000.0, "separate_fps": 1000.0, "batched_over_separate": 2.0,
         "batched_over_separate_cpu": 2.5, "batched_ms_per_call": 2.0, "gather_scatter_share": 0.04,
         "rss_per_extra_batched_stream": 230_000, "rss_per_extra_batched_stream_marginal": 250_000,
         "rss_per_extra_batched_stream_before_steps": 200_000, "rss_per_extra_session": 5_040_000}]}
    speed, memory = format_rows(report)
    assert len(speed[1]) == len(THROUGHPUT_HEADERS) and len(memory[1]) == len(MEMORY_HEADERS)
    # a noisy run on a busy machine: gains of two and three digits (seen: 10.40x and 24.35x) cut a header short
    from edge3d import bench_streams

    wide = {**report, "model": "tiny", "frame": [3, 32, 32], "rows": [*report["rows"], {
        **report["rows"][1], "streams": 16, "batched_fps": 143590.0, "separate_fps": 41900.1,
        "batched_over_separate": 110.4, "batched_over_separate_cpu": 240.35, "batched_ms_per_call": 10.5}]}
    monkeypatch.setattr(bench_streams, "measure_streams", lambda *a, **k: wide)
    res = CliRunner().invoke(cli.app, ["bench-streams", str(stream_artifact), "--streams", "1,4,16"])
    assert res.exit_code == 0, res.output
    assert "…" not in res.output and max(len(line) for line in res.output.splitlines()) <= 80, res.output
    assert all(v in res.output for v in ("143590.0", "110.40x", "240.35x", "5.04"))
    assert speed[1] == ["4", "2000.0", "1000.0", "2.00x", "2.50x", "2.0", "4.0%"]
    assert memory == [["1", "-", "-", "-", "-", "-"], ["4", "0.23", "2.30x", "0.25", "0.20", "5.04"]]


def test_top_reads_one_stream_and_refuses_a_batch(stream_artifact: Path) -> None:
    with Session(stream_artifact, streams=2) as s:
        logits = np.array([0.0, 2.0, 1.0, -1.0, 0.5])
        idx, name, score = s.top(logits)
        p = np.exp(logits) / np.exp(logits).sum()
        assert idx == 1 and score == pytest.approx(p[1]) and name == (s.classes[1] if s.classes else "1")
        assert s.top(logits[None])[0] == 1  # a (1, classes) row is one stream
        outs = s.step_batch(_frames(5, 1, 2)[0])
        assert [s.top(row)[0] for row in outs] == [int(np.argmax(row)) for row in outs]
        for rank in (s.top, lambda y: s.top_k(y, 3)):
            with pytest.raises(ValueError, match=r"top\(\) and top_k\(\) take one stream's output, got shape \(2, 5\)"):
                rank(outs)
            with pytest.raises(ValueError, match=r"top\(\) and top_k\(\) got 9 values, but this artifact's output "
                                                 r"has 5"):
                rank(np.zeros(9))  # another model's output, which this one's class names would misname


def test_frame_rounds_stop_each_stream_at_its_end_or_limit() -> None:
    from edge3d.sources import frame_rounds

    read: list[str] = []

    def stream(name: str, n: int):
        for k in range(n):
            read.append(f"{name}{k}")
            yield f"{name}{k}"

    rounds = list(frame_rounds([stream("a", 2), stream("b", 5), stream("c", 9)], [None, 3, None]))
    assert rounds == [[(0, "a0"), (1, "b0"), (2, "c0")], [(0, "a1"), (1, "b1"), (2, "c1")],
                      [(1, "b2"), (2, "c2")], *[[(2, f"c{k}")] for k in range(3, 9)]]
    assert "b3" not in read  # a stream at its limit is not read again
