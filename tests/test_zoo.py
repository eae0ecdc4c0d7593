"""Zoo models: streaming equals offline at every frame, causality, and the papers' figures."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY, assert_causal, assert_close_every_frame, randomize, stream, tiny_zoo_cases
from edge3d.exporters.onnx import export_artifact
from typer.testing import CliRunner

import edge3d
from edge3d import zoo
from edge3d.cli import app


@pytest.mark.parametrize("name, opts", tiny_zoo_cases())
def test_zoo_streaming_equals_clip(name: str, opts: dict) -> None:
    model = randomize(zoo.build(name, **TINY, **opts), seed=len(name))
    clip = torch.randn(2, 3, 24, 40, 40)
    with torch.no_grad():
        ref = model(clip)
    assert ref.shape == (2, 5, 24)
    assert_close_every_frame(stream(edge3d.to_step(model, (3, 40, 40)), clip), ref)


@pytest.mark.parametrize("name", ["d-resnet18", "rcn-resnet18", "tsm-resnet18", "tam-resnet18"])
def test_zoo_causality(name: str) -> None:
    model = randomize(zoo.build(name, **TINY), seed=1)
    assert_causal(model, torch.randn(1, 3, 20, 32, 32), 12, 1e-4)


# Table 4 of the Dissected 3D-CNN paper (Kinetics-600, 112×112, FP32, MB = 1e6 bytes).
D3D = {
    "d-resnet18": (20.66e6, 31.05e6, 0.97e6, 0.94e6, 747e6),
    "d-resnet50": (40.81e6, 51.20e6, 1.95e6, 1.92e6, 1654e6),
    "d-resnet101": (69.83e6, 80.22e6, 2.81e6, 2.78e6, 3077e6),
}


@pytest.mark.parametrize("name", list(D3D))
def test_d3d_table4(name: str) -> None:
    p_fc, p_lstm, cache_fc, cache_backbone, macs = D3D[name]
    report = edge3d.inspect(zoo.build(name, num_classes=600), 112)
    assert abs(report["params"] - p_fc) <= 0.005 * p_fc
    lstm_params = sum(p.numel() for p in zoo.build(name, num_classes=600, head="lstm").parameters())
    assert abs(lstm_params - p_lstm) <= 0.005 * p_lstm
    # The paper rounds to two decimals of MB.
    assert round(report["state_bytes"] / 1e6, 2) == pytest.approx(cache_fc / 1e6)
    backbone = sum(s["bytes"] for s in report["states"] if not s["input_history"] and not s["layer"].startswith("head"))
    assert round(backbone / 1e6, 2) == pytest.approx(cache_backbone / 1e6)
    assert report["input_history_bytes"] == 2 * 3 * 112 * 112 * 4  # conv1's two previous frames
    assert abs(report["macs_per_frame"] - macs) <= 0.02 * macs


def test_rcn_resnet18_params_table2() -> None:
    n = sum(p.numel() for p in zoo.build("rcn-resnet18", num_classes=400).parameters())
    assert abs(n - 12.8e6) <= 0.02 * 12.8e6


def test_import_edge3d_does_not_import_torch() -> None:
    code = "import sys, edge3d, edge3d.runtime; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_cli_zoo_and_inspect_json() -> None:
    runner = CliRunner()
    res = runner.invoke(app, ["zoo"], terminal_width=80)
    assert res.exit_code == 0
    # at 80 columns nothing is cut short: every name and every default is printed whole, as its flag
    assert "…" not in res.output and "depth=" not in res.output  # a factory argument, not an option
    rows = {line.split("│")[1].strip(): line for line in res.output.splitlines() if line.count("│") == 6}
    assert set(zoo.names()) <= set(rows)
    shown = {name: rows[name].split("│")[5].strip() for name in zoo.names()}
    # D3D's Kinetics-600 (its Table 4), Kinetics-400 elsewhere; the gesture models' classes are fixed
    assert (shown["d-resnet18"], shown["rcn-resnet18"], shown["vov3d-l"], shown["gestures"]) == \
        ("600", "400", "400", "trained")
    # each paper is cited by authors and title, which wrap at spaces: the keys, one unbroken word each,
    # were cut mid-word ("deep-analysis-2" / "d-3d-temporal-m" / "odules")
    words = set(re.split(r"[\s│]+", res.output))
    for name in zoo.names():
        cited = zoo.PAPERS[zoo.ZOO[name].paper]
        assert set(cited.split()) <= words, (name, cited)
    res = runner.invoke(app, ["inspect", "d-resnet18", "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.output)
    assert {"params", "macs_per_frame", "state_bytes", "input_history_bytes", "states"} <= set(report)
    assert report["params"] == 20655896
    assert all({"name", "shape", "dtype", "kind", "bytes"} <= set(s) for s in report["states"])


def test_cli_bad_model_and_head() -> None:
    runner = CliRunner()
    res = runner.invoke(app, ["inspect", "no-such-model"])
    assert res.exit_code == 2 and "unknown model 'no-such-model'" in res.output and "did you mean" not in res.output
    res = runner.invoke(app, ["inspect", "d-resnet-18"])
    assert res.exit_code == 2 and "unknown model 'd-resnet-18'; did you mean 'd-resnet18'?" in res.output
    # a family's short name, or the name in capitals: the full names it starts, or the name meant
    for typed, meant in (("tsm", "'tsm-resnet18'"), ("vov3d", "'vov3d-m' or 'vov3d-l'"), ("D-RESNET50", "'d-resnet50'")):
        res = runner.invoke(app, ["inspect", typed], terminal_width=400)
        assert res.exit_code == 2 and f"unknown model {typed!r}; did you mean {meant}? choose one of" in res.output
    res = runner.invoke(app, ["inspect", "tsm-resnet18", "--head", "transformer"])
    assert res.exit_code == 2 and "has no head 'transformer'" in res.output and "did you mean" not in res.output
    res = runner.invoke(app, ["inspect", "d-resnet18", "--head", "GRU"])
    assert res.exit_code == 2 and "has no head 'GRU'; did you mean 'gru'? choose one of fc, lstm, gru." in \
        " ".join(res.output.split())


def test_build_rejects_bad_options_by_name() -> None:
    for bad, says in (({"num_classes": 0}, r"num_classes \(--classes\) must be positive, got 0"),
                      ({"width": -1.0}, r"width \(--width\) must be positive"),
                      ({"frame_size": float("inf")}, r"frame_size \(--size\) must be positive"),
                      ({"dropout": 0.5}, "d-resnet18 takes no option 'dropout'; it takes .*num_classes")):
        with pytest.raises(ValueError, match=says):
            zoo.build("d-resnet18", **bad)
    def params(**options: object) -> int:
        model = zoo.build("d-resnet18", **{"width": 0.125, "num_classes": 5, **options})
        return sum(p.numel() for p in model.parameters())

    assert params() - params(history=4) == (16 - 4) * 64 * 5  # an option the factory does take still passes
    assert params(num_classes=np.int64(5)) == params()  # a count read from an array is a count


def test_build_refuses_a_width_whose_weights_cannot_fit_in_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    # --width 100 (a percentage, to its user) is 10,000 times the paper's weights: counted on the
    # meta device and refused at once, where building it filled memory for minutes
    with pytest.raises(ValueError, match=r"d-resnet18 with --width 100 would hold [\d,.]+ GB of float32 weights, "
                                         r"more than the [\d.]+ GB of memory free here; --width multiplies"):
        zoo.build("d-resnet18", width=100.0)
    weights = 4 * sum(p.numel() for p in zoo.build("d-resnet18", **TINY).parameters())
    monkeypatch.setattr(zoo, "memory_available", lambda: weights - 1)
    with pytest.raises(ValueError, match=r"with --width 0.125 --classes 5 would hold .*--width multiplies"):
        zoo.build("d-resnet18", **TINY)
    with pytest.raises(ValueError, match="--classes is the number of classes"):
        zoo.build("d-resnet18", num_classes=5, frame_size=32)
    monkeypatch.setattr(zoo, "memory_available", lambda: weights)
    assert sum(p.numel() for p in zoo.build("d-resnet18", **TINY).parameters()) * 4 == weights
    monkeypatch.setattr(zoo, "memory_available", lambda: 1)  # the defaults are the paper's model: never refused
    assert zoo.build("d-resnet18", frame_size=32) is not None


@pytest.mark.parametrize("name", ["d-resnet18", "tsm-resnet18", "rcn-resnet18", "r3d18-causal", "sgs-resnet18",
                                  "vov3d-m"])
def test_to_step_names_a_frame_shape_the_model_cannot_take(name: str) -> None:
    model = zoo.build(name, **TINY)
    with pytest.raises(ValueError, match=r"cannot run on frames of shape \(1, 32, 32\).*input channels"):
        edge3d.to_step(model, (1, 32, 32))
    for shape in ((3, 32), (3, 0, 32), (3, 32.0, 32)):
        with pytest.raises(ValueError, match="frame_shape must be \\(C, H, W\\) with positive sizes"):
            edge3d.to_step(model, shape)


def test_a_frame_size_no_memory_can_hold_is_one_sentence() -> None:
    """--size 1000000: torch's allocator failed on the first frame (3 × 10¹² float32 = 11175.9 GiB) with a traceback."""
    overcommit = Path("/proc/sys/vm/overcommit_memory")
    if overcommit.is_file() and overcommit.read_text().strip() == "1":
        pytest.skip("this kernel grants any allocation (vm.overcommit_memory = 1), so none fails at once")
    for verb in ("inspect", "export"):
        res = CliRunner().invoke(app, [verb, "d-resnet18", "--width", "0.125", "--classes", "5", "--size", "1000000"])
        said = " ".join(res.output.split())
        assert res.exit_code == 2 and f"{verb} ran out of memory (one allocation of 11175.9 GiB failed); use a " \
            "smaller --size or --width: the frames and activations grow with the square of --size" in said, said
        assert "Traceback" not in said


def test_inspect_takes_a_size_or_an_h_w_pair_and_names_anything_else() -> None:
    model = zoo.build("d-resnet18", **TINY)
    square, wide = edge3d.inspect(model, 32), edge3d.inspect(model, (32, 48))
    assert square["frame_shape"] == [3, 32, 32] and wide["frame_shape"] == [3, 32, 48]
    assert wide["state_bytes"] > square["state_bytes"]  # the caches hold 1.5 times the pixels
    for bad in ("32", 32.0, (3, 32, 32), None):  # each was a TypeError or a shape of characters
        with pytest.raises(ValueError, match=r"frame_size must be an integer or an \(H, W\) pair, got "):
            edge3d.inspect(model, bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["d-resnet18", "r3d18-causal", "sgs-resnet18"])
def test_to_step_names_weights_that_are_not_float32_on_the_cpu(name: str, tmp_path: Path) -> None:
    """A model left in float64 or float16 after training failed in its first conv, blaming the frame shape."""
    for convert, words in ((torch.nn.Module.double, r"conv1\.weight is float64; .*call model\.float\(\) first\."),
                           (torch.nn.Module.half, r"is float16; edge3d streams and exports float32 models"),
                           (lambda m: m.to("meta"), r"is on the meta device, which holds no values")):
        model = convert(zoo.build(name, **TINY))
        with pytest.raises(ValueError, match=words):
            edge3d.to_step(model, (3, 32, 32))
    model = zoo.build(name, **TINY).double()
    with pytest.raises(ValueError, match="is float64"):
        export_artifact(model, tmp_path, "m", frame_size=32)
    assert not list(tmp_path.iterdir())
    step = edge3d.to_step(model.float(), (3, 32, 32))  # the fix the sentence names
    assert step is not None


def test_step_rejects_a_frame_of_another_shape_and_an_empty_batch() -> None:
    model = zoo.build("d-resnet18", width=0.125, num_classes=5)
    with pytest.raises(ValueError, match="needs a torch.nn.Module, got str"):
        edge3d.to_step("d-resnet18", (3, 32, 32))  # type: ignore[arg-type]
    step = edge3d.to_step(model, (3, 32, 32))
    states = step.initial_states(2)
    for frame in (torch.zeros(2, 3, 16, 16), torch.zeros(2, 3, 1, 32, 32), torch.zeros(2, 1, 32, 32)):
        with pytest.raises(ValueError, match=r"this step takes \(N, 3, 32, 32\)"):
            step(frame, *states)
    for batch in (0, True, 2.0):
        with pytest.raises(ValueError, match=f"batch must be a positive number of streams, got {batch!r}"):
            step.initial_states(batch)
    out, *_ = step(torch.zeros(2, 3, 32, 32), *states)
    assert out.shape == (2, 5)


def test_to_step_names_a_frame_too_small_for_an_unpadded_conv() -> None:
    from edge3d.nn import CausalConv3d

    model = torch.nn.Sequential(CausalConv3d(3, 4, (2, 5, 5)))
    with pytest.raises(ValueError, match=r"cannot run on frames of shape \(3, 3, 3\) \(Calculated padded"):
        edge3d.to_step(model, (3, 3, 3))
    step = edge3d.to_step(model, (3, 5, 5))  # the smallest frame the 5×5 kernel fits
    assert step(torch.zeros(1, 3, 5, 5), *step.initial_states(1))[0].shape == (1, 4, 1, 1)
