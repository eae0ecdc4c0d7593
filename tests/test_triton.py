"""Triton model repository: every generated config.pbtxt must parse as a ModelConfig and agree
with the manifest and with the model file it serves (names, dims, dtypes of inputs, outputs and
implicit states). Triton itself cannot run here; the example client's request building is
checked without a server."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from edge3d.exporters.triton import write_repository
from edge3d.runtime.manifest import ArtifactError
from google.protobuf import text_format
from onnx import TensorProto, helper
from tritonclient.grpc import model_config_pb2 as mc

ROOT = Path(__file__).resolve().parent.parent
NP_TO_TRITON = {np.dtype(np.float32): mc.TYPE_FP32, np.dtype(np.float16): mc.TYPE_FP16,
                np.dtype(np.int8): mc.TYPE_INT8, np.dtype(np.int64): mc.TYPE_INT64}


def parse_config(model_dir: Path) -> mc.ModelConfig:
    cfg = mc.ModelConfig()
    text_format.Parse((model_dir / "config.pbtxt").read_text(), cfg)
    return cfg


def onnx_io(path: Path) -> tuple[dict, dict]:
    m = onnx.load(str(path))

    def table(vs):
        return {v.name: (NP_TO_TRITON[np.dtype(helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type))],
                         [d.dim_value if d.HasField("dim_value") else -1 for d in v.type.tensor_type.shape.dim])
                for v in vs}

    return table(m.graph.input), table(m.graph.output)


def check_model_dir(model_dir: Path, manifest: dict, graph: Path, state_dtypes: dict[str, int]) -> mc.ModelConfig:
    """Config vs manifest vs graph (``graph``: the ONNX the model file is, or was built from)."""
    cfg = parse_config(model_dir)
    assert cfg.name == model_dir.name
    sb = cfg.sequence_batching
    assert sb.WhichOneof("strategy_choice") == "oldest"
    assert sb.max_sequence_idle_microseconds > 0
    assert sb.oldest.max_candidate_sequences >= 1
    by_in = {s.input_name: s for s in sb.state}
    assert len(by_in) == len(sb.state) == len(manifest["states"])
    for s in manifest["states"]:
        st = by_in[f"state_in.{s['name']}"]
        assert st.output_name == f"state_out.{s['name']}"
        assert list(st.dims) == [int(d) for d in s["shape"][1:]]
        assert st.data_type == state_dtypes[s["name"]]
        assert len(st.initial_state) == 1
        init = st.initial_state[0]
        assert init.name and list(init.dims) == list(st.dims) and init.data_type == st.data_type
        if float(s.get("init", 0.0)) == 0.0:
            assert init.zero_data and not init.data_file
        else:
            data = np.fromfile(model_dir / "initial_state" / init.data_file,
                               helper.tensor_dtype_to_np_dtype(
                                   {mc.TYPE_FP32: TensorProto.FLOAT, mc.TYPE_FP16: TensorProto.FLOAT16,
                                    mc.TYPE_INT8: TensorProto.INT8}[st.data_type]))
            assert data.size == int(np.prod(st.dims)) and np.all(data == float(s["init"]))
    inputs, outputs = onnx_io(graph)
    controls = {c.name for c in sb.control_input}
    # every graph input is a config input, a state input or a control, and nothing else
    assert set(inputs) == {i.name for i in cfg.input} | set(by_in) | controls
    assert set(outputs) == {o.name for o in cfg.output} | {s.output_name for s in sb.state}
    for t in list(cfg.input) + list(cfg.output):
        dtype, dims = (inputs | outputs)[t.name]
        assert t.data_type == dtype and list(t.dims) == dims[1:] and dims[0] == -1
    for st in sb.state:
        for name in (st.input_name, st.output_name):
            dtype, dims = (inputs | outputs)[name]
            assert st.data_type == dtype and list(st.dims) == dims[1:] and dims[0] == -1
    return cfg


# --------------------------------------------------------------------------- the real exported model
def test_repository_for_exported_model(stream_artifact: Path, tmp_path: Path) -> None:
    repo = write_repository(stream_artifact, tmp_path / "repo", max_batch=4, instances=2)
    manifest = json.loads((stream_artifact / "manifest.json").read_text())
    model_dir = repo / "tiny"
    assert sorted(p.name for p in repo.iterdir()) == ["tiny"]  # no temporary folders left
    cfg = check_model_dir(model_dir, manifest, model_dir / "1" / "model.onnx",
                          {s["name"]: mc.TYPE_FP32 for s in manifest["states"]})
    assert cfg.platform == "onnxruntime_onnx" and cfg.backend == "onnxruntime"
    assert cfg.max_batch_size == 4 and cfg.default_model_filename == "model.onnx"
    assert [(g.count, g.kind) for g in cfg.instance_group] == [(2, mc.ModelInstanceGroup.KIND_AUTO)]
    assert not cfg.sequence_batching.control_input  # implicit state only: our graphs need no controls
    assert cfg.sequence_batching.oldest.max_candidate_sequences == 4
    assert [i.name for i in cfg.input] == ["frame"] and [o.name for o in cfg.output] == ["output"]
    assert (model_dir / "1" / "model.onnx").read_bytes() == (stream_artifact / "model.fp32.onnx").read_bytes()
    assert json.loads((model_dir / "edge3d_manifest.json").read_text())["states"] == manifest["states"]
    assert "oldest" in (model_dir / "config.pbtxt").read_text().split("name:")[0]  # the why, as a comment
    assert not cfg.output[0].label_filename and not (model_dir / "labels.txt").exists()  # no names to give


def test_named_classes_reach_tritons_classification_extension(stream_artifact: Path, tmp_path: Path) -> None:
    """A client asking Triton for the output's top classes ("classification": 5) got bare indices: the
    repository now carries the artifact's class names as the output's label file, one per line, so a
    name with a line break in it is joined into one line rather than shifting every name after it."""
    import shutil

    from edge3d.exporters.onnx import set_class_names

    art = tmp_path / "tiny.edge3d"
    shutil.copytree(stream_artifact, art)
    names = ["wave", "swipe\nleft", "none", "clap", "point"]
    set_class_names(art, names)
    model_dir = write_repository(art, tmp_path / "repo", max_batch=2) / "tiny"
    manifest = json.loads((art / "manifest.json").read_text())
    cfg = check_model_dir(model_dir, manifest, model_dir / "1" / "model.onnx",
                          {x["name"]: mc.TYPE_FP32 for x in manifest["states"]})
    assert [(o.name, o.label_filename) for o in cfg.output] == [("output", "labels.txt")]
    assert (model_dir / "labels.txt").read_text().splitlines() == ["wave", "swipe left", "none", "clap", "point"]
    write_repository(art, tmp_path / "repo", max_batch=2)  # rewriting its own labels file is not refused


def test_model_folder_takes_the_umask_so_a_server_running_as_another_user_can_read_it(stream_artifact: Path,
                                                                                      tmp_path: Path) -> None:
    """The model folder was a tempfile.mkdtemp folder (0700) renamed into place: a Triton container
    running as another user could not read it."""
    import os
    import stat

    old = os.umask(0o022)
    try:
        repo = write_repository(stream_artifact, tmp_path / "repo", max_batch=2)
    finally:
        os.umask(old)
    assert stat.S_IMODE((repo / "tiny").stat().st_mode) == 0o755
    assert stat.S_IMODE((repo / "tiny" / "config.pbtxt").stat().st_mode) == 0o644


def test_rewrite_replaces_only_our_model(stream_artifact: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    (repo / "someone_else" / "1").mkdir(parents=True)
    write_repository(stream_artifact, repo, max_batch=2)
    write_repository(stream_artifact, repo, max_batch=np.int64(8), max_sequences=np.int64(32))  # NumPy ints too
    assert sorted(p.name for p in repo.iterdir()) == ["someone_else", "tiny"]
    cfg = parse_config(repo / "tiny")
    assert cfg.max_batch_size == 8 and cfg.sequence_batching.oldest.max_candidate_sequences == 32


def test_rewrite_refuses_a_model_folder_holding_what_edge3d_did_not_write(stream_artifact: Path,
                                                                         tmp_path: Path) -> None:
    """A model folder is swapped whole, so a version or file a user keeps in it was deleted without a word."""
    repo = tmp_path / "repo"
    write_repository(stream_artifact, repo, max_batch=2)
    (repo / "tiny" / "2").mkdir()
    (repo / "tiny" / "2" / "model.onnx").write_bytes(b"a version of the user's own")
    (repo / "tiny" / "notes.txt").write_text("why version 2")
    before = {q: q.read_bytes() for q in (repo / "tiny").rglob("*") if q.is_file()}
    with pytest.raises(ValueError, match=r"tiny holds 2/, notes.txt beside what edge3d wrote.*pass --name"):
        write_repository(stream_artifact, repo, max_batch=8)
    assert {q: q.read_bytes() for q in (repo / "tiny").rglob("*") if q.is_file()} == before  # nothing touched
    (repo / "theirs" / "1").mkdir(parents=True)  # a same-named model from elsewhere
    with pytest.raises(ValueError, match=r"theirs is a model folder edge3d did not write \(it has no "
                                         r"edge3d_manifest.json\)"):
        write_repository(stream_artifact, repo, max_batch=8, model_name="theirs")
    assert sorted(q.name for q in (repo / "theirs").iterdir()) == ["1"]
    assert write_repository(stream_artifact, repo, max_batch=8, model_name="tiny2") == repo  # --name: a new model


# --------------------------------------------------------------------------- a hand-made artifact
def _value(name: str, elem: int, shape: list) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, ["N", *shape])


def make_artifact(folder: Path, states: list[tuple[str, list[int], int, float]], *,
                  controls: tuple[str, ...] = (), extra_input: str | None = None,
                  file: str = "model.fp32.onnx", frame_elem: int = TensorProto.FLOAT) -> None:
    """A graph that copies each state through (Identity): enough for config generation."""
    inputs = [_value("frame", frame_elem, [3, 8, 8])]
    outputs = [_value("output", TensorProto.FLOAT, [192])]
    nodes = [helper.make_node("Flatten", ["frame"], ["flat"]),
             helper.make_node("Cast", ["flat"], ["output"], to=TensorProto.FLOAT)]
    for name, shape, elem, _ in states:
        inputs.append(_value(f"state_in.{name}", elem, shape))
        outputs.append(_value(f"state_out.{name}", elem, shape))
        nodes.append(helper.make_node("Identity", [f"state_in.{name}"], [f"state_out.{name}"]))
    for c in controls:
        inputs.append(_value(c, TensorProto.FLOAT, [1]))
    if extra_input:
        inputs.append(_value(extra_input, TensorProto.FLOAT, [1]))
    model = helper.make_model(helper.make_graph(nodes, "g", inputs, outputs),
                              opset_imports=[helper.make_opsetid("", 18)])
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(folder / file))


def make_manifest(folder: Path, states: list[tuple[str, list[int], int, float]], **extra) -> dict:
    np_name = {TensorProto.FLOAT: "float32", TensorProto.FLOAT16: "float16", TensorProto.INT8: "int8"}
    m = {
        "format_version": 1, "name": "handmade",
        "frame": {"name": "frame", "channels": 3, "height": 8, "width": 8, "mean": [0.5] * 3, "std": [0.25] * 3},
        "output": {"name": "output", "shape": ["N", 192], "dtype": "float32", "classes": None},
        "states": [{"name": n, "shape": ["N", *s], "dtype": "float32", "init": init, "kind": "ring",
                    "bytes": int(np.prod(s)) * 4} for n, s, _, init in states],
        "precisions": {"fp32": {"file": "model.fp32.onnx", "profile": "fp32",
                                "state_dtypes": {n: np_name[e] for n, _, e, _ in states}}},
        "engines": {},
        **extra,
    }
    (folder / "manifest.json").write_text(json.dumps(m))
    return m


STATES = [("a", [2, 3], TensorProto.FLOAT, 0.0), ("b.count", [4], TensorProto.FLOAT16, 1.5),
          ("c", [5, 1, 1], TensorProto.INT8, 0.0)]
TYPES = {"a": mc.TYPE_FP32, "b.count": mc.TYPE_FP16, "c": mc.TYPE_INT8}


def test_mixed_state_types_and_nonzero_initial_state(tmp_path: Path) -> None:
    art = tmp_path / "handmade.edge3d"
    make_artifact(art, STATES)
    manifest = make_manifest(art, STATES)
    repo = write_repository(art, tmp_path / "repo", max_batch=3, model_name="cams", kind="cpu")
    cfg = check_model_dir(repo / "cams", manifest, repo / "cams" / "1" / "model.onnx", TYPES)
    assert cfg.instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU
    b = next(s for s in cfg.sequence_batching.state if s.input_name == "state_in.b.count")
    assert b.initial_state[0].data_file and not b.initial_state[0].zero_data


def test_tensorrt_engine_becomes_second_model(tmp_path: Path) -> None:
    art = tmp_path / "handmade.edge3d"
    make_artifact(art, STATES)
    fp16 = [(n, s, TensorProto.FLOAT16 if e == TensorProto.FLOAT else e, i) for n, s, e, i in STATES]
    make_artifact(art, fp16, file="model.fp16.onnx", frame_elem=TensorProto.FLOAT16)
    (art / "model.fp16.engine").write_bytes(b"plan bytes")
    manifest = make_manifest(art, STATES, engines={"fp16": {"file": "model.fp16.engine", "max_batch": 2}})
    manifest["precisions"]["fp16"] = {"file": "model.fp16.onnx", "profile": "fp16",
                                      "state_dtypes": {"a": "float16", "b.count": "float16", "c": "int8"}}
    (art / "manifest.json").write_text(json.dumps(manifest))
    repo = write_repository(art, tmp_path / "repo", max_batch=4, instances=2)
    assert sorted(p.name for p in repo.iterdir()) == ["handmade", "handmade_trt_fp16"]
    trt_dir = repo / "handmade_trt_fp16"
    cfg = check_model_dir(trt_dir, manifest, art / "model.fp16.onnx",
                          {"a": mc.TYPE_FP16, "b.count": mc.TYPE_FP16, "c": mc.TYPE_INT8})
    assert cfg.platform == "tensorrt_plan" and cfg.default_model_filename == "model.plan"
    assert (trt_dir / "1" / "model.plan").read_bytes() == b"plan bytes"
    assert cfg.max_batch_size == 2  # the engine's optimisation profile stops at 2 streams
    assert cfg.input[0].data_type == mc.TYPE_FP16
    assert [(g.count, g.kind) for g in cfg.instance_group] == [(2, mc.ModelInstanceGroup.KIND_GPU)]
    onnx_cfg = check_model_dir(repo / "handmade", manifest, repo / "handmade" / "1" / "model.onnx", TYPES)
    assert onnx_cfg.max_batch_size == 4


def test_control_inputs_only_where_the_graph_has_them(tmp_path: Path) -> None:
    art = tmp_path / "handmade.edge3d"
    make_artifact(art, STATES, controls=("sequence_start", "sequence_ready"))
    manifest = make_manifest(art, STATES)
    repo = write_repository(art, tmp_path / "repo", max_batch=2)
    cfg = check_model_dir(repo / "handmade", manifest, repo / "handmade" / "1" / "model.onnx", TYPES)
    kinds = {c.name: (c.control[0].kind, list(c.control[0].fp32_false_true)) for c in cfg.sequence_batching.control_input}
    assert kinds == {"sequence_start": (mc.ModelSequenceBatching.Control.CONTROL_SEQUENCE_START, [0.0, 1.0]),
                     "sequence_ready": (mc.ModelSequenceBatching.Control.CONTROL_SEQUENCE_READY, [0.0, 1.0])}


@pytest.mark.parametrize("case", ["missing_engine", "unknown_input", "state_dtype", "state_shape", "name",
                                  "max_batch", "fixed_batch"])
def test_bad_input_fails_with_a_sentence_and_writes_nothing(tmp_path: Path, case: str) -> None:
    art = tmp_path / "handmade.edge3d"
    make_artifact(art, STATES, extra_input="mystery" if case == "unknown_input" else None)
    manifest = make_manifest(art, STATES)
    kwargs: dict = {"max_batch": 2}
    if case == "missing_engine":
        manifest["engines"] = {"fp16": {"file": "model.fp16.engine"}}
    elif case == "state_dtype":
        manifest["precisions"]["fp32"]["state_dtypes"]["a"] = "float16"
    elif case == "state_shape":
        manifest["states"][0]["shape"] = ["N", 3, 2]
    elif case == "name":
        kwargs["model_name"] = "../escape"
    elif case == "max_batch":
        kwargs["max_batch"] = 0
    elif case == "fixed_batch":
        m = onnx.load(str(art / "model.fp32.onnx"))
        m.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
        onnx.save(m, str(art / "model.fp32.onnx"))
    (art / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises((ArtifactError, ValueError)) as info:
        write_repository(art, tmp_path / "repo", **kwargs)
    assert str(info.value).endswith(".") and len(str(info.value).splitlines()) == 1
    assert not any((tmp_path / "repo").glob("*/config.pbtxt"))  # all checked before anything is written


def test_cli_triton(stream_artifact: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from edge3d.cli import app

    runner = CliRunner()
    repo = tmp_path / "my repo"  # the printed command must survive a paste into a shell
    ok = runner.invoke(app, ["triton", str(stream_artifact), "-o", str(repo), "--max-batch", "6",
                             "--instances", "3", "--name", "cams"], terminal_width=400)
    assert ok.exit_code == 0, ok.output
    line = next(x for x in ok.output.splitlines() if "tritonserver" in x)
    import shlex

    assert shlex.split(line) == ["tritonserver", f"--model-repository={repo.resolve()}"]
    assert "left by an export that was killed" not in ok.output
    # a write killed outright (SIGKILL) left its staging folder: the next write names it and leaves it
    dead = repo / ".cams.999999999-abcdef12"
    (dead / "1").mkdir(parents=True)
    again = runner.invoke(app, ["triton", str(stream_artifact), "-o", str(repo), "--max-batch", "6", "--instances", "3",
                                "--name", "cams"], terminal_width=400)
    assert again.exit_code == 0 and f"rm -r {shlex.quote(str(dead))}" in again.output and dead.is_dir(), again.output
    cfg = parse_config(repo / "cams")
    assert cfg.max_batch_size == 6 and cfg.instance_group[0].count == 3
    for flags, says in ((["--instances", "0"], "--instances (instances in Python) must be a positive integer, got 0."),
                        (["--max-batch", "0"], "--max-batch (max_batch in Python) must be a positive integer, got 0."),
                        (["--max-sequences", "-2"], "--max-sequences (max_sequences in Python) must be a positive"),
                        (["--idle-seconds", "0"], "--idle-seconds (idle_seconds in Python) must be positive, got 0.0."),
                        (["--kind", "tpu"], "--kind 'tpu' is not one of")):
        bad = runner.invoke(app, ["triton", str(stream_artifact), "-o", str(tmp_path / "r2"), *flags])
        assert bad.exit_code == 2 and says in " ".join(bad.output.split()), bad.output
    assert not (tmp_path / "r2").exists()


# --------------------------------------------------------------------------- the example client
def _client_module():
    spec = importlib.util.spec_from_file_location("triton_client", ROOT / "examples" / "triton_client.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the class is made
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("random_frames", [False, True])
def test_client_builds_requests_without_a_server(stream_artifact: Path, tmp_path: Path, random_frames: bool) -> None:
    client = _client_module()
    repo = write_repository(stream_artifact, tmp_path / "repo", max_batch=4)
    cfg = parse_config(repo / "tiny")
    manifest = client.load_manifest_for(repo / "tiny")
    cams = client.make_cameras(3, frames=5, manifest=manifest, random_frames=random_frames, seed=7)
    assert all(len(c.frames) == 5 and c.frames[0].dtype == np.uint8 for c in cams)
    assert all(lab is not None for c in cams for lab in c.labels) != random_frames  # synthetic frames are labelled
    plan = list(client.plan_requests(cams, frames=5, model_name="tiny", manifest=manifest, sequence_base=100))
    assert len(plan) == 15
    assert [r.sequence_id for r in plan[:3]] == [100, 101, 102]
    starts = [r for r in plan if r.sequence_start]
    ends = [r for r in plan if r.sequence_end]
    assert sorted(r.sequence_id for r in starts) == sorted(r.sequence_id for r in ends) == [100, 101, 102]
    assert all(r.sequence_start == (r.t == 0) and r.sequence_end == (r.t == 4) for r in plan)
    for r in plan:
        assert [i.name() for i in r.inputs] == [i.name for i in cfg.input]
        assert r.inputs[0].shape() == [1, *cfg.input[0].dims]
        assert r.inputs[0].datatype() == "FP32"
        assert [o.name() for o in r.outputs] == [o.name for o in cfg.output]
        # states never travel: Triton keeps them
        assert not any(i.name().startswith("state_") for i in r.inputs)
    # the frame sent is the runtime's preprocessing of the camera frame
    from edge3d.runtime.preprocess import FramePreprocessor

    raw = cams[1].frames[0]  # synthetic frames are 112x112 and get resized, random ones are 32x32
    want = np.empty((3, 32, 32), np.float32)
    FramePreprocessor(manifest["frame"])(raw, want)
    np.testing.assert_array_equal(plan[1].frame, want[None])


def test_client_summarises_a_class_vector_and_a_map(stream_artifact: Path) -> None:
    """What the client prints per camera from the server's outputs; a map output has no top class."""
    client = _client_module()
    manifest = json.loads((stream_artifact / "manifest.json").read_text())
    classes = manifest["output"]["shape"][1]
    outputs = [np.eye(classes, dtype=np.float32)[i % classes] * 4 for i in range(6)]
    line = client.camera_line(2, 102, outputs, [0, 1, 0, 3, None, 0], manifest)
    # frame i's top class is i % classes (5): frames 0, 1, 3 and 5 match their labels, frame 2 does not,
    # frame 4 has none
    assert classes == 5
    p = np.exp(4) / (np.exp(4) + classes - 1)
    assert line == f"camera 2 (sequence 102): top class 0 ({p:.2f}), per-frame accuracy 80.0%"
    manifest["output"]["shape"] = ["N", 3, 4, 4]
    maps = [np.full((3, 4, 4), v, np.float32) for v in (0.5, 1.25)]
    assert client.camera_line(0, 7, maps, [1, 2], manifest) == "camera 0 (sequence 7): a 3×4×4 map, max 1.25"


def _run_client(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, str(ROOT / "examples" / "triton_client.py"), *args],
                          capture_output=True, text=True, timeout=120, env=env)


def test_client_help_runs_without_a_server() -> None:
    proc = _run_client("--help")
    assert proc.returncode == 0, proc.stderr
    assert "--cameras" in proc.stdout and "--url" in proc.stdout


def test_client_without_server_fails_with_a_sentence(stream_artifact: Path, tmp_path: Path) -> None:
    repo = write_repository(stream_artifact, tmp_path / "repo", max_batch=4)
    proc = _run_client("--url", "localhost:1", "--model-dir", str(repo / "tiny"), "--random-frames", "--frames", "2")
    assert proc.returncode == 2
    assert "Triton" in proc.stderr and "Traceback" not in proc.stderr
