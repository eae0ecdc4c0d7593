"""Precision profiles, FP16 / INT8 / int8-lowmem builds, stream calibration, accumulators.

The models are tiny (width 0.125 d-resnet18 and a conv + GRU + RunningMean net at 32×32) and
are exported once per test process (see ``precision_helpers.built_artifact``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, numpy_helper

pytest.importorskip("torch")

from edge3d.exporters.calibration import RolloutReader  # noqa: E402
from edge3d.exporters.onnx import export_artifact, file_sha256, weight_bytes  # noqa: E402
from edge3d.exporters.precision import add_precisions, resolve_profiles  # noqa: E402
from edge3d.profiles import FOLDER, builtin_names, load_profile  # noqa: E402
from edge3d.runtime import ArtifactError, Session  # noqa: E402
from edge3d.runtime.manifest import METADATA_KEY, load_manifest  # noqa: E402
from precision_helpers import (  # noqa: E402
    CALIB_FRAMES,
    pattern_stream,
    running_mean_net,
    two_means_net,
    write_video,
)


def _write(tmp_path: Path, text: str, name: str = "p.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# --------------------------------------------------------------------------- profiles
def test_builtin_profiles_declare_every_field() -> None:
    assert {"fp32", "fp16", "int8", "int8-lowmem", "int8-cpu"} <= set(builtin_names())
    for name in builtin_names():
        p = load_profile(name)
        assert p.name == name
        assert p.accumulator_dtype == "float32", "running sums and counters stay float32 in every built-in"
        assert p.backends
    fp16, int8, low = load_profile("fp16"), load_profile("int8"), load_profile("int8-lowmem")
    assert (fp16.weight_dtype, fp16.activation_dtype, fp16.state_dtype, fp16.io_dtype) == \
        ("float16", "float16", "float16", "float32")
    assert (int8.weight_dtype, int8.activation_dtype, int8.state_dtype) == ("int8", "int8", "float32")
    assert int8.per_channel and int8.calibration.method in ("minmax", "entropy", "percentile")
    assert int8.calibration.frames > 0
    assert low.state_dtype == "int8" and "tensorrt" in low.backends
    assert load_profile("int8-cpu").activation_dtype == "uint8"


def test_user_profile_by_path(tmp_path: Path) -> None:
    path = _write(tmp_path, 'name = "mine"\nweight_dtype = "int8"\nkeep_op_types = ["Gemm"]\n'
                            '[calibration]\nmethod = "percentile"\nframes = 32\npercentile = 99.9\n')
    p = load_profile(str(path))
    assert (p.name, p.kind, p.keep_op_types, p.calibration.method, p.calibration.frames) == \
        ("mine", "int8", ("Gemm",), "percentile", 32)
    assert [q.name for q in resolve_profiles(["fp16", str(path)])] == ["fp16", "mine"]
    # a string is the command line's comma-separated list, not a sequence of one-letter names
    assert [q.name for q in resolve_profiles(f"fp16, {path}")] == ["fp16", "mine"]


@pytest.mark.parametrize("text, words", [
    ('name = "x"\nweight_dtype = "int8"\n[calibration\n', "not valid TOML"),
    ('name = "x"\nweight_dtype = "int4"\n', "weight_dtype"),
    ('name = "x"\nweight_dtype = "int8"\n[calibration]\nmethod = "magic"\n', "method"),
    ('name = "x"\nweight_dtype = "int8"\naccumulator_dtype = "float16"\n', "accumulator_dtype"),
    ('name = "x"\nweight_dtype = "int8"\nactivation_dtype = "uint8"\nstate_dtype = "int8"\n', "symmetric"),
    ('name = "Bad Name"\n', "name"),
    ('name = "x"\nweigth_dtype = "float16"\n', "unknown key 'weigth_dtype' (did you mean 'weight_dtype'?)"),
    ('name = "x"\nweight_dtype = "int8"\n[calibration]\nframs = 32\n',
     "unknown calibration key 'frams' (did you mean 'frames'?)"),
    ('name = "x"\nspeed = "fast"\n', "unknown key 'speed'; the keys are"),  # nothing close: no guess
    ('weight_dtype = "float16"\n', "has no name; add a line such as name = "),
    ('name = "x"\nweight_dtype = "int8"\nwarmup = 0\n[calibration]\nframes = 32\n',
     "'warmup' belongs in the [calibration] table"),  # written above its table, it is a top-level key
])
def test_bad_profile_is_one_sentence(tmp_path: Path, text: str, words: str) -> None:
    with pytest.raises(ValueError) as e:
        load_profile(str(_write(tmp_path, text)))
    msg = str(e.value)
    assert words in msg and "\n" not in msg and msg.endswith(".")


def test_a_user_profile_named_fp32_is_refused(tmp_path: Path) -> None:
    """model.fp32.onnx is the export itself, so a profile file of that name used to be skipped without a word."""
    path = _write(tmp_path, 'name = "fp32"\nweight_dtype = "float16"\n')
    with pytest.raises(ValueError, match=r"named 'fp32', the reference precision .*; give it another name\."):
        resolve_profiles(["fp16", str(path)])
    assert [q.name for q in resolve_profiles(["fp32", "fp16"])] == ["fp32", "fp16"]  # the built-in one is fine


def test_a_user_profile_may_not_take_a_builtin_name_for_something_else(tmp_path: Path) -> None:
    """A float16 graph written as model.int8.onnx would be reported as INT8 by compare, run and inspect."""
    path = _write(tmp_path, 'name = "int8"\nweight_dtype = "float16"\n')
    with pytest.raises(ValueError, match=r"named 'int8', the name of a built-in profile, but builds something "
                                         r"else; give it a name of its own \(such as 'int8-mine'\)"):
        resolve_profiles([str(path)])
    tuned = _write(tmp_path, (FOLDER / "int8.toml").read_text().replace("frames = 256", "frames = 64"), "t.toml")
    with pytest.raises(ValueError, match="named 'int8'"):  # a tuned copy is something else too
        resolve_profiles(["fp16", str(tuned)])
    copy = _write(tmp_path, (FOLDER / "int8.toml").read_text(), "copy.toml")  # the built-in file's own text
    assert [q.name for q in resolve_profiles([str(copy), "fp16"])] == ["int8", "fp16"]


def test_unknown_profile_name_lists_the_choices() -> None:
    with pytest.raises(ValueError, match=r"unknown precision profile 'fp8'; choose one of .*fp16.*int8"):
        resolve_profiles(["fp8"])
    with pytest.raises(ValueError, match=r"unknown precision profile 'INT8'; did you mean 'int8'\? choose one of "):
        resolve_profiles(["INT8"])
    with pytest.raises(ValueError, match="does not exist"):
        load_profile("/nonexistent/profile.toml")


def test_cli_rejects_bad_profiles_before_exporting(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from edge3d.cli import app

    runner = CliRunner()
    bad = _write(tmp_path, "name = [\n", "bad.toml")
    for spec, words in (("fp8", "unknown precision profile"), (str(bad), "not valid TOML")):
        r = runner.invoke(app, ["export", "d-resnet18", "--width", "0.125", "--size", "32", "-o", str(tmp_path),
                                "--profile", f"fp32,{spec}"])
        assert r.exit_code == 2, r.output
        assert words in r.output
        assert "Traceback" not in r.output
    assert not list(tmp_path.glob("*.edge3d"))


@pytest.mark.parametrize("frames", [0, 2.5, True, "8"])
def test_calibration_frames_must_be_a_positive_integer(dresnet: Path, frames: object) -> None:
    before = sorted(p.name for p in dresnet.iterdir())
    with pytest.raises(ValueError, match="--calib-frames must be an integer of at least 1"):
        add_precisions(dresnet, "int8", calib_frames=frames)
    assert sorted(p.name for p in dresnet.iterdir()) == before


def test_calibration_source_without_frames(tmp_path: Path, dresnet: Path) -> None:
    from typer.testing import CliRunner

    from edge3d.cli import app

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="holds no video files"):
        add_precisions(dresnet, ["int8"], calib_source=str(empty))
    short = write_video(tmp_path / "short.mp4", [f for f, _ in pattern_stream(5, seed=3)])
    # the fix names the option as the CLI user and the Python caller each spell it
    with pytest.raises(ValueError, match=r"gave no frames after the 16 warm-up frames of each stream; pass a "
                                         r"longer video, .* as --calib-source \(calib_source= in Python\)\.$"):
        add_precisions(dresnet, ["int8"], calib_source=str(short))
    with pytest.raises(ValueError, match=r"gave no frames.* as --calib-source \(calib_source= in Python\)\.$"):
        add_precisions(dresnet, ["int8"], calib_source=[])
    r = CliRunner().invoke(app, ["export", "d-resnet18", "--width", "0.125", "--size", "32", "-o", str(tmp_path),
                                 "--profile", "int8", "--calib-source", str(empty)])
    assert r.exit_code == 2 and "holds no video files" in r.output, r.output
    assert load_manifest(dresnet)["precisions"]["int8"]["file"] == "model.int8.onnx"  # untouched


def test_a_calibration_source_that_runs_out_is_recorded_and_warned_about(tmp_path: Path, dresnet: Path) -> None:
    """20 frames for 64 asked: the INT8 graph calibrated on 4 of them, and only the count said so."""
    import io
    import shutil

    from rich.console import Console

    art = tmp_path / dresnet.name
    shutil.copytree(dresnet, art)
    clip = write_video(tmp_path / "clip.mp4", [f for f, _ in pattern_stream(20, seed=3)])
    said = io.StringIO()
    add_precisions(art, ["int8"], calib_source=str(clip), calib_frames=64, console=Console(file=said, width=300))
    cal = load_manifest(art)["precisions"]["int8"]["calibration"]
    assert (cal["frames"], cal["frames_requested"], cal["warmup"]) == (4, 64, 16)
    text = " ".join(said.getvalue().split())  # rich wraps at 300 columns, and pytest's tmp path can be long
    assert f"warning: {clip} ran out after 4 of the 64 calibration frames asked for" in text
    assert "pass a longer --calib-source (calib_source= in Python), or several clips" in text
    said = io.StringIO()
    add_precisions(art, ["int8"], calib_frames=24, console=Console(file=said, width=300))  # synthetic: no end
    assert load_manifest(art)["precisions"]["int8"]["calibration"]["frames"] == 24
    assert "warning" not in said.getvalue()


# --------------------------------------------------------------------------- FP16
def _io_types(model: onnx.ModelProto) -> dict[str, int]:
    return {v.name: v.type.tensor_type.elem_type for v in list(model.graph.input) + list(model.graph.output)}


def test_fp16_graph_keeps_io_and_accumulators_float32(stateful: Path) -> None:
    man = load_manifest(stateful)
    model = onnx.load(str(stateful / "model.fp16.onnx"))
    io = _io_types(model)
    assert io["frame"] == io["output"] == TensorProto.FLOAT
    acc = [s for s in man["states"] if s["kind"] == "accumulator"]
    assert {s["name"].rsplit(".", 1)[1] for s in acc} == {"sum", "sum_carry", "count", "count_carry"}
    for s in man["states"]:
        want = TensorProto.FLOAT if s["kind"] == "accumulator" else TensorProto.FLOAT16
        assert io[s["input"]] == io[s["output"]] == want, s["name"]
    assert man["precisions"]["fp16"]["state_dtypes"]["mean.sum"] == "float32"
    # the ops that compute the accumulators run in float32: every float input of their producers
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in
             list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)}
    types.update({t.name: t.data_type for t in inferred.graph.initializer})
    producers = {o: n for n in inferred.graph.node for o in n.output}
    for s in acc:
        node = producers[s["output"]]
        assert node.op_type in ("Add", "Sub")  # a sum, or the carry of a compensated sum
        assert all(types[i] == TensorProto.FLOAT for i in node.input), node
    convs = [n for n in inferred.graph.node if n.op_type == "Conv"]
    assert convs and all(types[n.input[1]] == TensorProto.FLOAT16 for n in convs)


def test_fp16_keep_layers_and_unknown_layer(tmp_path: Path, dresnet: Path) -> None:
    keep = _write(tmp_path, 'name = "fp16-fc32"\nweight_dtype = "float16"\nkeep_layers = ["head.fc"]\n')
    entries = add_precisions(dresnet, [str(keep)])
    model = onnx.load(str(dresnet / entries["fp16-fc32"]["file"]))
    inits = {t.name: t.data_type for t in model.graph.initializer}
    gemm = next(n for n in model.graph.node if n.op_type == "Gemm")
    assert inits[gemm.input[1]] == TensorProto.FLOAT
    assert any(inits.get(n.input[1]) == TensorProto.FLOAT16 for n in model.graph.node if n.op_type == "Conv")
    typo = _write(tmp_path, 'name = "fp16-typo"\nweight_dtype = "float16"\nkeep_layers = ["head.fcc"]\n', "t.toml")
    with pytest.raises(ValueError, match="'head.fcc' matches no layer"):
        add_precisions(dresnet, [str(typo)])


# --------------------------------------------------------------------------- INT8
def _check_qdq(model: onnx.ModelProto) -> int:
    inits = {t.name: t for t in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    checked = 0
    for n in model.graph.node:
        if n.op_type not in ("Conv", "Gemm", "MatMul"):
            continue
        data, weight = producers.get(n.input[0]), producers.get(n.input[1])
        assert weight is not None and weight.op_type == "DequantizeLinear", f"{n.name}: weight not dequantised"
        w = inits[weight.input[0]]
        assert w.data_type == TensorProto.INT8, f"{n.name}: weight is not int8"
        if n.op_type == "Conv":  # per-channel: one scale per output channel
            assert numpy_helper.to_array(inits[weight.input[1]]).shape == (w.dims[0],)
        assert data is not None and data.op_type == "DequantizeLinear", f"{n.name}: activation not dequantised"
        q = producers.get(data.input[0])
        assert (q is not None and q.op_type == "QuantizeLinear") or data.input[0] in inits or \
            data.input[0] in {i.name for i in model.graph.input}, f"{n.name}: no QuantizeLinear before it"
        checked += 1
    return checked


def test_int8_has_qdq_around_every_conv_and_gemm(dresnet: Path, stateful: Path) -> None:
    for art, at_least in ((dresnet, 18), (stateful, 3)):
        for profile in ("int8", "int8-lowmem"):
            n = _check_qdq(onnx.load(str(art / f"model.{profile}.onnx")))
            assert n >= at_least, (art, profile, n)
    fp32 = onnx.load(str(dresnet / "model.fp32.onnx"))
    with pytest.raises(AssertionError):
        _check_qdq(fp32)  # the walk does fail on an unquantised graph


def test_int8_keeps_accumulators_out_of_quantisation(stateful: Path) -> None:
    man = load_manifest(stateful)
    for profile in ("int8", "int8-lowmem"):
        model = onnx.load(str(stateful / f"model.{profile}.onnx"))
        io = _io_types(model)
        consumers: dict[str, list] = {}
        for n in model.graph.node:
            for i in n.input:
                consumers.setdefault(i, []).append(n)
        for s in man["states"]:
            if s["kind"] != "accumulator":
                continue
            assert io[s["input"]] == io[s["output"]] == TensorProto.FLOAT
            assert all(c.op_type not in ("QuantizeLinear",) for c in consumers[s["input"]])
            assert man["precisions"][profile]["state_dtypes"][s["name"]] == "float32"


def test_calibration_reader_yields_real_nonzero_states(stateful: Path) -> None:
    frames = [f for f, _ in pattern_stream(40, seed=11)]
    reader = RolloutReader(stateful, frames, frames=10, warmup=5)
    feeds = list(reader)
    reader.close()
    assert len(feeds) == 10 and reader.frames_read == 15
    man = load_manifest(stateful)
    for feed in feeds:
        assert feed["frame"].shape == (1, 3, 32, 32)
        for s in man["states"]:
            if s["name"].endswith("count_carry"):  # the count is exact in float32 up to 2**24
                assert not np.any(feed[s["input"]])
                continue
            assert np.any(feed[s["input"]] != 0), f"state {s['name']} is all zero after warm-up"
    counts = [float(f["state_in.mean.count"].ravel()[0]) for f in feeds]
    assert counts == [float(i) for i in range(5, 15)], "states must be the ones *before* each step"
    # the recorded states are exactly what the FP32 session carries: replay frame 7 from them
    with Session(stateful) as s:
        for f in frames[:7]:
            s.step(f)
        ref = s.get_state()
    for s_ in man["states"]:
        np.testing.assert_array_equal(feeds[2][s_["input"]], ref[s_["name"]])


@pytest.mark.parametrize("lengths, shares", [((20, 20, 20, 20), [2, 2, 2, 2]), ((3, 20, 20, 20), [1, 3, 2, 2])])
def test_calibration_takes_an_equal_share_of_every_clip(stateful: Path, tmp_path: Path, lengths: tuple,
                                                        shares: list) -> None:
    """A folder sorted by class was calibrated on its first clips alone (256 frames from the first
    class of a dataset); each clip now gives an equal share, a short one's shortfall going to the rest."""
    cv2 = pytest.importorskip("cv2")
    root = tmp_path / "clips"
    for k, n in enumerate(lengths):  # clip k is all grey level 40 * (k + 1): its frames say which clip they are
        clip = root / f"clip{k}"
        clip.mkdir(parents=True)
        for t in range(n):
            cv2.imwrite(str(clip / f"{t}.png"), np.full((32, 32, 3), 40 * (k + 1), np.uint8))
    reader = RolloutReader(stateful, str(root), frames=8, warmup=2)
    feeds = list(reader)
    reader.close()
    man = load_manifest(stateful)
    mean, std = man["frame"]["mean"][0], man["frame"]["std"][0]
    grey = [round((float(f["frame"][0, 0, 0, 0]) * std + mean) * 255) for f in feeds]
    assert grey == [40 * (k + 1) for k, share in enumerate(shares) for _ in range(share)]
    assert reader.info()["streams"] == len(lengths) and reader.info()["frames"] == 8


def test_manifest_entries_and_embedded_metadata(dresnet: Path) -> None:
    man = load_manifest(dresnet)
    for profile in ("fp16", "int8", "int8-lowmem", "int8-cpu"):
        e = man["precisions"][profile]
        path = dresnet / e["file"]
        assert e["file"] == f"model.{profile}.onnx" and e["profile"] == profile
        assert e["sha256"] == file_sha256(path)
        assert e["weight_bytes"] == weight_bytes(path)
        assert set(e["state_dtypes"]) == {s["name"] for s in man["states"]}
        meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
        inner = json.loads(meta[METADATA_KEY])
        assert inner["precision"]["profile"] == profile
        assert inner["model"]["source_hash"] == man["model"]["source_hash"]
        if profile.startswith("int8"):
            cal = e["calibration"]
            assert cal["method"] == "minmax" and cal["frames"] == CALIB_FRAMES and cal["source"].endswith("calib.avi")
            assert cal["nonzero_state_feeds"] == CALIB_FRAMES
    fp32w = man["precisions"]["fp32"]["weight_bytes"]
    assert man["precisions"]["fp16"]["weight_bytes"] < 0.55 * fp32w
    assert man["precisions"]["int8"]["weight_bytes"] < 0.35 * fp32w
    assert set(man["precisions"]["int8-lowmem"]["state_dtypes"].values()) == {"int8"}
    assert set(man["precisions"]["int8-lowmem"]["state_quant"]) == {s["name"] for s in man["states"]}


def test_every_graph_is_written_with_the_oldest_ir_version_its_opset_allows(dresnet: Path) -> None:
    """onnx stamps its newest IR version (10 with onnx 1.23), which onnxruntime 1.17 refuses
    ("max supported IR version: 9"); opset 18 needs only IR 8."""
    man = load_manifest(dresnet)
    for profile, e in man["precisions"].items():
        m = onnx.load(str(dresnet / e["file"]), load_external_data=False)
        assert [(o.domain, o.version) for o in m.opset_import if o.domain in ("", "ai.onnx")] == [("", 18)], profile
        assert m.ir_version == 8, profile


def test_sessions_run_every_profile_with_smaller_caches(dresnet: Path, stateful: Path) -> None:
    frames = [f for f, _ in pattern_stream(20, seed=4)]
    for art in (dresnet, stateful):
        man = load_manifest(art)
        acc = sum(s["bytes"] for s in man["states"] if s["kind"] == "accumulator")
        other = sum(s["bytes"] for s in man["states"] if s["kind"] != "accumulator")
        cache = {}
        for profile in ("fp32", "fp16", "int8", "int8-lowmem"):
            with Session(art, profile=profile) as s:
                ys = [s.step(f) for f in frames]
                assert all(np.isfinite(y).all() and y.dtype == np.float32 for y in ys)
                cache[profile] = s.cache_bytes
                if profile == "int8-lowmem":
                    s.reset()
                    assert all(not v.any() for v in s.get_state().values())
        assert cache["fp32"] == cache["int8"] == acc + other
        assert cache["fp16"] == acc + other // 2
        assert cache["int8-lowmem"] == acc + other // 4


def test_int8_lowmem_streams_the_int8_outputs_bit_for_bit(dresnet: Path, stateful: Path) -> None:
    """docs/precision.md: a stored state is already on an activation scale's grid, so storing it as
    int8 loses nothing. Holds over 300 frames, for the caches and for a GRU state read inside the graph."""
    frames = [f for f, _ in pattern_stream(300, seed=3)]
    for art in (dresnet, stateful):
        with Session(art, profile="int8", threads=1) as a, Session(art, profile="int8-lowmem", threads=1) as b:
            for f in frames:
                np.testing.assert_array_equal(a.step(f), b.step(f))


def test_int8_lowmem_states_are_quantised_in_a_form_every_onnxruntime_loads(stateful: Path) -> None:
    """A state also read inside the graph (the GRU's h) is written by a QuantizeLinear on the float value,
    not by one after a DequantizeLinear: ONNX Runtime 1.30's optimiser refuses that DQ -> Q with a second
    reader. A state not read inside (a ring cache) keeps DQ -> Q, which ONNX Runtime 1.17/1.18 need."""
    man = load_manifest(stateful)
    g = onnx.load(str(stateful / man["precisions"]["int8-lowmem"]["file"])).graph
    producer = {o: n for n in g.node for o in n.output}
    read_inside = 0
    for s_ in man["states"]:
        if s_["kind"] == "accumulator":
            continue
        q = producer[s_["output"]]
        assert q.op_type == "QuantizeLinear"
        before = producer.get(q.input[0])
        if any(s_["output"] in n.input for n in g.node):
            read_inside += 1
            assert before is not None and before.op_type != "DequantizeLinear", s_["name"]
        else:
            assert before is not None and before.op_type == "DequantizeLinear", s_["name"]
    assert read_inside == 1  # the GRU state


def _contents(folder: Path) -> dict[str, bytes]:
    """Every file of an artifact folder, to show a refused build left it byte for byte as it was."""
    return {f.name: f.read_bytes() for f in folder.iterdir()}


def test_a_built_graph_this_onnxruntime_cannot_load_fails_the_export_and_changes_nothing(
        stateful: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The checker passes graphs an onnxruntime's optimiser refuses (1.30 and an earlier int8-lowmem form):
    export loads each new graph first, so the artifact keeps its files and the error says what happened."""
    import shutil

    from edge3d.runtime.backend import onnxrt
    from typer.testing import CliRunner

    from edge3d.cli import app

    art = Path(shutil.copytree(stateful, tmp_path / "copy.edge3d"))
    before = _contents(art)
    real = onnxrt._load_session

    def refuse_new_graphs(path: Path, threads, spin=True):
        if path.parent != art:  # the graph being built, still in the export's temporary folder
            raise ArtifactError("ONNX Runtime cannot load it") from RuntimeError(
                "[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : Invalid model. Node input 'x' is not a graph input")
        return real(path, threads, spin)

    monkeypatch.setattr(onnxrt, "_load_session", refuse_new_graphs)
    with pytest.raises(ValueError, match=r"cannot load the fp16 graph edge3d just built \(.*Node input 'x' is not a "
                                         r"graph input\); the artifact is unchanged"):
        add_precisions(art, "fp16")
    assert _contents(art) == before
    r = CliRunner().invoke(app, ["export", str(art), "--profile", "fp16"])
    assert r.exit_code != 0 and "the artifact is unchanged" in r.output and "Traceback" not in r.output
    assert _contents(art) == before


def test_int8_on_an_onnxruntime_whose_quantiser_fails_is_refused_before_any_work(
        stateful: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """onnxruntime 1.17 and 1.18 load artifacts, but their quantiser fails inside with current onnx
    (measured: AttributeError on onnx.mapping); INT8 is refused up front, other precisions still build."""
    import shutil

    import onnxruntime as ort
    from edge3d.exporters.precision import check_quantiser
    from typer.testing import CliRunner

    from edge3d.cli import app

    art = Path(shutil.copytree(stateful, tmp_path / "copy.edge3d"))
    before = _contents(art)
    for version, refused in (("1.18.1", True), ("1.19.0", False), ("1.32.0", False), ("2.0.0", False)):
        monkeypatch.setattr(ort, "__version__", version)
        if refused:
            with pytest.raises(ValueError, match=r"needs onnxruntime 1.19 or newer \(this is 1.18.1\)"):
                check_quantiser()
        else:
            check_quantiser()
    monkeypatch.setattr(ort, "__version__", "1.18.1")
    with pytest.raises(ValueError, match="needs onnxruntime 1.19 or newer"):
        add_precisions(art, "fp16,int8-lowmem")
    assert _contents(art) == before
    r = CliRunner().invoke(app, ["export", "d-resnet18", "--width", "0.125", "--size", "32", "--profile", "int8",
                                 "-o", str(tmp_path / "new")])
    assert r.exit_code != 0 and "needs onnxruntime 1.19 or newer" in r.output and not (tmp_path / "new").exists()
    assert set(add_precisions(art, "fp16")) == {"fp16"}  # no INT8 asked: the version does not matter


def test_runtime_rejects_state_dtype_mismatch(tmp_path: Path, dresnet: Path) -> None:
    import shutil

    art = Path(shutil.copytree(dresnet, tmp_path / "copy.edge3d"))
    man = json.loads((art / "manifest.json").read_text())
    man["precisions"]["int8-lowmem"]["file"] = "model.int8.onnx"  # float32 states, manifest says int8
    (art / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(ArtifactError, match="in the graph but int8 in manifest.json"):
        Session(art, profile="int8-lowmem")


# --------------------------------------------------------------------------- agreement and drift
def _agreement(art: Path, frames: int) -> dict:
    from edge3d.compare import compare

    data = pattern_stream(frames, seed=5)
    return compare(art, ["fp32", "fp16", "int8", "int8-lowmem"], data, frames, threads=1)


def _check_agreement(report: dict, slope: bool = False) -> None:
    """Agreement thresholds, and no growth of the free-running error over the last half.

    The growth checked is last-quarter over third-quarter mean error with the teacher-forced
    (one-step) growth divided out, because the raw error moves with what is on screen (a
    quarter of 500 frames is two scenes). Over 2,000 frames a linear fit of the raw error over
    the second half must also be flat: less than +50 % per 1,000 frames.
    """
    rows = report["profiles"]
    assert rows["fp16"]["top1_agreement"] >= 0.995, rows["fp16"]
    for p in ("int8", "int8-lowmem"):
        assert rows[p]["top1_agreement"] >= 0.97, (p, rows[p])
    for p in ("fp16", "int8", "int8-lowmem"):
        fr = rows[p]["free_running"]
        assert fr["growth_vs_step"] <= 1.5, (p, fr)
        if slope:
            assert fr["slope_per_1k"] <= 0.5, (p, fr)
        assert rows[p]["teacher_forced"]["mean_abs_err"] < 0.05 * report["output_scale"], (p, rows[p])
    assert rows["fp16"]["free_running"]["mean_abs_err"] < 2e-3 * report["output_scale"]


@pytest.mark.parametrize("kind", ["dresnet", "stateful"])
def test_agreement_and_bounded_drift_500_frames(kind: str, dresnet: Path, stateful: Path) -> None:
    """FP16 >= 99.5 % and INT8 >= 97 % top-1 agreement with FP32, drift not growing.

    Both models have random (seeded) weights except their output layer, a nearest-class-mean
    head on FP32 features (see ``precision_helpers.prototype_head``): with random output weights
    the logits are nearly tied and agreement would measure ties, not precision.
    """
    _check_agreement(_agreement(dresnet if kind == "dresnet" else stateful, 500))


@pytest.mark.parametrize("kind", ["dresnet", "stateful"])
def test_agreement_and_bounded_drift_2000_frames(kind: str, dresnet: Path, stateful: Path) -> None:
    """The same over 2,000 frames, as the issue asks (about 20 s for both models)."""
    _check_agreement(_agreement(dresnet if kind == "dresnet" else stateful, 2000), slope=True)


def _lowered_convs(art: Path, profile: str) -> tuple[int, int]:
    """(convs whose weights are float16 or int8 Q/DQ in ``profile``, all convs)."""
    m = onnx.load(str(art / load_manifest(art)["precisions"][profile]["file"]))
    inits = {t.name: t.data_type for t in m.graph.initializer}
    made_by = {o: n.op_type for n in m.graph.node for o in n.output}
    convs = [n for n in m.graph.node if n.op_type == "Conv"]
    if profile == "fp16":
        return sum(inits.get(n.input[1]) == TensorProto.FLOAT16 for n in convs), len(convs)
    return sum(made_by.get(n.input[1]) == "DequantizeLinear" for n in convs), len(convs)


def _convert_all(model, root: Path, size: int) -> Path:
    art = export_artifact(model, root, "m", frame_size=size)
    add_precisions(art, ["fp16", "int8"], calib_source=[f for f, _ in pattern_stream(24, size, seed=3)],
                   calib_frames=16)
    return art


def test_only_the_accumulation_stays_float32_when_means_are_chained(tmp_path: Path) -> None:
    """A conv between two running means (VoV3D has one in every block) is converted like any other.

    All accumulators used to be traced at once, so the path from the first mean through conv2 into
    the second mean's sum counted as "computing an accumulator": conv2 stayed float32 in FP16 and
    INT8, and for VoV3D-M 185 of 197 convs did (see the slow test below).
    """
    art = _convert_all(two_means_net(), tmp_path, 32)
    man = load_manifest(art)
    for profile in ("fp16", "int8"):
        assert _lowered_convs(art, profile) == (2, 2), profile
        io = _io_types(onnx.load(str(art / man["precisions"][profile]["file"])))
        acc = [s for s in man["states"] if s["kind"] == "accumulator"]
        assert len(acc) == 8 and all(io[s["output"]] == TensorProto.FLOAT for s in acc)
    frames = [f for f, _ in pattern_stream(40, seed=9)]
    outs = {}
    for profile in ("fp32", "fp16", "int8"):
        with Session(art, profile=profile) as sess:
            outs[profile] = np.stack([sess.step(f) for f in frames])
    scale = np.abs(outs["fp32"]).max()
    assert np.abs(outs["fp16"] - outs["fp32"]).max() < 1e-2 * scale
    assert np.abs(outs["int8"] - outs["fp32"]).max() < 0.1 * scale


@pytest.mark.slow
def test_vov3d_converts_every_conv(tmp_path: Path) -> None:
    """The zoo model the fix was for (about 40 s, most of it the export)."""
    from conftest import randomize

    from edge3d import zoo

    art = _convert_all(randomize(zoo.build("vov3d-m", width=0.25, num_classes=4)), tmp_path, 32)
    for profile in ("fp16", "int8"):
        lowered, convs = _lowered_convs(art, profile)
        assert convs > 150 and lowered == convs, (profile, lowered, convs)
    man = load_manifest(art)
    fp32w = man["precisions"]["fp32"]["weight_bytes"]
    assert man["precisions"]["fp16"]["weight_bytes"] < 0.55 * fp32w
    assert man["precisions"]["int8"]["weight_bytes"] < 0.40 * fp32w


# --------------------------------------------------------------------------- accumulators over long streams
def _stream_mean(art: Path, profile: str, steps: int, streams: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Stream ``steps`` frames into each of ``streams`` streams (one batched call per step)."""
    rng = np.random.default_rng(0)
    level = np.linspace(0.8, 1.6, streams, dtype=np.float32)[:, None, None, None]
    total = np.zeros((streams, 3), np.float64)
    with Session(art, profile=profile, streams=streams) as s:
        for _ in range(steps):
            frames = (level + rng.uniform(-0.5, 0.5, (streams, 3, 8, 8))).astype(np.float32)
            total += frames.mean(axis=(2, 3), dtype=np.float64)
            y = s.step_batch(list(frames))
    return y, total / steps


@pytest.fixture(scope="module")
def mean_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("mean")
    art = export_artifact(running_mean_net(), root, "mean", frame_size=8)
    naive = root / "fp16-acc16.toml"
    naive.write_text('name = "fp16-acc16"\nweight_dtype = "float16"\naccumulator_dtype = "float16"\n')
    add_precisions(art, ["fp16", str(naive)])
    return art


# A static scene: one constant per stream and channel, none of them a binary fraction, so every
# addition to a plain float32 sum rounds, and always the same way.
STATIC_LEVELS = np.array([[0.1, 0.3, 0.7], [1.3, 0.2, 0.45]], np.float32)


def test_running_mean_of_a_static_scene_stays_exact_over_50000_frames(mean_artifact: Path) -> None:
    """The exported FP32 graph, run by ONNX Runtime: the mean of a constant is that constant.

    Negative control in the test: the plain float32 running sum the layer used to keep is
    2.5e-4 to 5e-4 off after these 50,000 frames (9.7e-3 after 10**6, 9 % after 10**7).
    """
    frames = [np.broadcast_to(lv[:, None, None], (3, 8, 8)).copy() for lv in STATIC_LEVELS]
    steps = 50_000
    with Session(mean_artifact, streams=2) as s:
        for _ in range(steps):
            y = s.step_batch(frames)
    np.testing.assert_allclose(y, STATIC_LEVELS, rtol=1e-6, atol=0)
    naive = np.stack([np.cumsum(np.full(steps, v, np.float32), dtype=np.float32)[-1] / np.float32(steps)
                      for v in STATIC_LEVELS.ravel()]).reshape(STATIC_LEVELS.shape)
    assert np.abs(naive / STATIC_LEVELS - 1).min() > 1e-4, "the control must show the old error"


def test_running_mean_counts_past_2_24_frames(mean_artifact: Path) -> None:
    """A float32 count stops at 2**24 frames (6.5 days at 30 fps); the carried count does not.

    The stream resumes from a snapshot 8 frames short of 2**24 (the state a camera reaches after
    6.5 days), so the test takes 1,000 steps instead of 16.8 million.
    """
    frames = [np.broadcast_to(lv[:, None, None], (3, 8, 8)).copy() for lv in STATIC_LEVELS]
    start = 2**24 - 8
    with Session(mean_artifact, streams=2) as s:
        snap = s.get_state()
        snap["mean.sum"][:] = (STATIC_LEVELS.astype(np.float64) * start).astype(np.float32)
        snap["mean.count"][:] = start
        s.set_state(snap)
        for _ in range(1000):
            y = s.step_batch(frames)
        state = s.get_state()
    count = state["mean.count"].astype(np.float64) - state["mean.count_carry"]
    assert np.all(count == start + 1000)
    np.testing.assert_allclose(y, STATIC_LEVELS, rtol=1e-6, atol=0)


def test_fp16_running_mean_70000_frames_no_overflow(mean_artifact: Path) -> None:
    """70,000 frames per stream: the float32 sum passes 65,504 (float16's max) and the count
    passes 2,048 (where float16 stops counting), yet the mean stays exact."""
    man = load_manifest(mean_artifact)
    assert set(man["precisions"]["fp16"]["state_dtypes"].values()) == {"float32"}
    y, true = _stream_mean(mean_artifact, "fp16", 70_000)
    assert np.isfinite(y).all()
    np.testing.assert_allclose(y, true, rtol=2e-3, atol=0)


def test_float16_accumulators_would_fail(mean_artifact: Path) -> None:
    """Negative control: the same graph with float16 accumulators is wrong after 3,000 frames."""
    man = load_manifest(mean_artifact)
    assert set(man["precisions"]["fp16-acc16"]["state_dtypes"].values()) == {"float16"}
    y, true = _stream_mean(mean_artifact, "fp16-acc16", 3000)
    assert not np.allclose(y, true, rtol=2e-3)


def test_drift_check_catches_float16_accumulators(mean_artifact: Path) -> None:
    """The bounded-drift check of the agreement tests does fail on a state that goes wrong:
    float16 accumulators stop counting at 2,048 frames, which the free-running error shows and
    the teacher-forced error (float32 states fed in each step) does not."""
    from edge3d.compare import compare

    rng = np.random.default_rng(1)
    frames = (1.0 + rng.uniform(-0.5, 0.5, (3000, 3, 8, 8))).astype(np.float32)
    report = compare(mean_artifact, ["fp32", "fp16", "fp16-acc16"], iter(frames), 3000, threads=1)
    good, bad = report["profiles"]["fp16"], report["profiles"]["fp16-acc16"]
    assert good["free_running"]["growth_vs_step"] <= 1.5
    assert bad["free_running"]["growth_vs_step"] > 1.5 and bad["free_running"]["growth"] > 1.5
    assert bad["free_running"]["end_abs_err"] > 10 * bad["teacher_forced"]["max_abs_err"]


def test_int8_of_a_recurrent_conv_prints_nothing_of_the_quantisers_own(tmp_path: Path) -> None:
    """RCN keeps a BatchNorm node (it reads the recurrent state); ORT's quantiser logged
    "WARNING:root:Axis 1 is out-of-range for weight 'model.bn1.weight'" for it, three times.
    In a process of its own: pytest's log capture would hide what a user's terminal shows."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "edge3d.cli", "export", "rcn-resnet18", "--width", "0.125",
                           "--classes", "5", "--size", "32", "-o", str(tmp_path), "--no-verify", "--profile", "int8",
                           "--calib-frames", "8"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    said = done.stdout + done.stderr
    assert "WARNING" not in said and "out-of-range" not in said, said
    assert "int8" in load_manifest(tmp_path / "rcn-resnet18.edge3d")["precisions"]
