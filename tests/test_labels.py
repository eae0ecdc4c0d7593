"""`edge3d export --labels`: class names from the label files datasets ship, in output order."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY, randomize, unwrapped
from edge3d.exporters.onnx import export_artifact
from typer.testing import CliRunner

from edge3d import zoo
from edge3d.cli import app
from edge3d.labels import read_labels

TINY_FLAGS = ["--width", "0.125", "--size", "32"]
UCF = ["ApplyEyeMakeup", "ApplyLipstick", "Archery"]


@pytest.mark.parametrize("name, text, want", [
    ("plain.txt", "wave\n\nswipe left\n  none  \n", ["wave", "swipe left", "none"]),  # blank lines skipped
    ("classInd.txt", "1 ApplyEyeMakeup\n2 ApplyLipstick\n3 Archery\n", UCF),  # UCF101: numbered from 1
    ("shuffled.txt", "2 b\n0 c\n1 a\n", ["c", "a", "b"]),  # by index, not by line
    ("bom.txt", "\ufeffwave\nswipe\n", ["wave", "swipe"]),  # a Windows editor's byte-order mark
    ("k.csv", "id,name\n0,abseiling\n1,air drumming\n2,answering questions\n",
     ["abseiling", "air drumming", "answering questions"]),  # Kinetics' label CSV, with its header
    ("one.csv", "wave\nswipe\n", ["wave", "swipe"]),
    ("list.json", '["wave", "swipe"]', ["wave", "swipe"]),
    ("to_index.json", '{"wave": 1, "swipe": 0, "none": 2}', ["swipe", "wave", "none"]),  # name -> index
    ("from_index.json", '{"1": "wave", "0": "swipe"}', ["swipe", "wave"]),  # index -> name
    ("digits.txt", "3d printing\n10 pin bowling\n", ["3d printing", "10 pin bowling"]),  # not all numbered
    ("quoted.json", '{"\\"air drumming\\"": 1, "\\"abseiling\\"": 0}', ["abseiling", "air drumming"]),  # quotes inside
])
def test_each_label_layout_reads_in_output_order(tmp_path: Path, name: str, text: str, want: list[str]) -> None:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    assert read_labels(path) == want


@pytest.mark.parametrize("name, content, says", [
    ("gap.txt", "1 a\n3 b\n", "the indices run from 1 to 3 without 2; they must count up from 0 (or from 1)"),
    ("twice.txt", "0 a\n1 b\n1 c\n", "index 1 is on line 2 and line 3; give each class one index"),
    ("twice.csv", "id,name\n0,a\n\n1,b\n1,c\n", "index 1 is on line 4 and line 5"),  # the file's lines
    ("late.json", '{"a": 5, "b": 6}', "the indices run from 5 to 6 without 0"),
    ("empty.txt", "\n\n", "holds no class names; put one name per line"),
    ("bad.json", '{"a": "b"', "is not valid JSON"),
    ("mixed.json", '["a", 3]', "must hold only non-empty strings"),
    ("nested.json", '{"a": [1]}', "JSON must be a list of names, or an object mapping each name to its index"),
    ("latin1.txt", b"caf\xe9\n", "is not UTF-8 text"),
])
def test_a_label_file_that_cannot_be_read_in_order_is_one_sentence(tmp_path: Path, name: str, content: str | bytes,
                                                                   says: str) -> None:
    """A wrong order labels every prediction wrongly without a sign, so anything ambiguous is refused."""
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ValueError, match="labels file .*" + says.replace("(", r"\(").replace(")", r"\)")) as e:
        read_labels(path)
    assert "\n" not in str(e.value) and str(e.value).endswith(".")
    with pytest.raises(ValueError, match="does not exist"):
        read_labels(tmp_path / "absent.txt")


def test_export_labels_names_the_classes_sets_their_count_and_run_scores_class_folders(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A checkpoint holds no class names: an artifact exported from one printed indices, and `run` could not
    score a dataset laid out as one folder per class, which it matches against the artifact's classes.
    UCF101's classInd.txt names them and, without --classes, sets the count too."""
    import cv2

    monkeypatch.chdir(tmp_path)
    Path("classInd.txt").write_text("".join(f"{i + 1} {n}\n" for i, n in enumerate(UCF)))
    res = CliRunner().invoke(app, ["export", "d-resnet18", *TINY_FLAGS, "--labels", "classInd.txt", "-o", "out"])
    assert res.exit_code == 0, res.output
    manifest = json.loads(Path("out/d-resnet18.edge3d/manifest.json").read_text())
    assert manifest["output"]["classes"] == UCF and manifest["output"]["shape"] == ["N", 3]
    said = unwrapped(CliRunner().invoke(app, ["inspect", "out/d-resnet18.edge3d"]).output)
    assert "3 classes, named ApplyEyeMakeup, ApplyLipstick, Archery" in said, said  # inspect shows they are named
    rng = np.random.default_rng(0)
    for cls in UCF[:2]:
        clip = Path("ucf", cls, f"v_{cls}_g01_c01")
        clip.mkdir(parents=True)
        for i in range(4):
            assert cv2.imwrite(str(clip / f"{i:05d}.jpg"), rng.integers(0, 256, (40, 40, 3), dtype=np.uint8))
    res = CliRunner().invoke(app, ["run", "out/d-resnet18.edge3d", "--source", "ucf", "--output", "p.jsonl"],
                             terminal_width=200)
    assert res.exit_code == 0, res.output
    lines = [json.loads(x) for x in Path("p.jsonl").read_text().splitlines()]
    assert len(lines) == 8 and {x["class"] for x in lines} <= set(UCF)
    assert "per-frame accuracy" in res.output and "per-clip accuracy" in res.output  # the folders were scored
    # where the accuracy goes: each class's share of right frames, the lowest first
    tally = {cls: [sum(x["top"] == x["label"] for x in lines if x["label"] == i),
                   sum(x["label"] == i for x in lines)] for i, cls in enumerate(UCF[:2])}
    weakest = sorted(((c, rn) for c, rn in tally.items() if rn[0] < rn[1]),
                     key=lambda kv: (kv[1][0] / kv[1][1], -kv[1][1]))
    row = "weakest classes, per frame │ " + ", ".join(f"{c} {100 * r / n:.0f}% of {n}" for c, (r, n) in weakest)
    assert (row in unwrapped(res.output)) == any(r < n for r, n in tally.values()), res.output


def test_labels_set_the_class_count_of_a_factory_that_takes_num_classes(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A user's factory gets the names' count as num_classes, as a zoo model does, where --classes is left out."""
    import uuid

    monkeypatch.chdir(tmp_path)
    name = f"net_{uuid.uuid4().hex[:8]}"
    Path(f"{name}.py").write_text(
        "import torch\nfrom torch import nn\nfrom edge3d.nn import CausalConv3d\n\n\nclass Net(nn.Module):\n"
        "    def __init__(self, n):\n        super().__init__()\n"
        "        self.stem = CausalConv3d(3, 4, (2, 3, 3), padding=(0, 1, 1))\n        self.fc = nn.Linear(4, n)\n\n"
        "    def forward(self, x):\n        return self.fc(self.stem(x).mean((3, 4)).transpose(1, 2)).transpose(1, 2)\n"
        "\n\ndef build(num_classes=7):\n    return Net(num_classes)\n")
    Path("names.txt").write_text("wave\nswipe\nnone\n")
    res = CliRunner().invoke(app, ["export", f"{name}.py:build", "--size", "16", "--labels", "names.txt", "-o", "out",
                                   "--no-verify"])
    assert res.exit_code == 0, res.output
    manifest = json.loads(Path("out/build.edge3d/manifest.json").read_text())
    assert manifest["output"]["shape"] == ["N", 3] and manifest["output"]["classes"] == ["wave", "swipe", "none"]


def test_labels_that_disagree_with_the_model_are_named_with_both_counts(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    Path("two.txt").write_text("wave\nswipe\n")
    res = CliRunner().invoke(app, ["export", "d-resnet18", *TINY_FLAGS, "--labels", "two.txt", "--classes", "3"])
    said = " ".join(res.output.split())
    assert res.exit_code == 2 and "--labels two.txt names 2 classes and --classes is 3; drop --classes (the labels " \
        "set it) or fix the file." in said, said
    # a trained zoo model's classes are fixed: it is built as it is and the names are counted against it
    res = CliRunner().invoke(app, ["export", "gestures", "--labels", "two.txt", "--no-verify"])
    said = " ".join(res.output.split())
    assert res.exit_code == 2 and "--labels two.txt names 2 classes and gestures has 9; give one name per class, " \
        "in output order" in said, said
    assert not Path("out").exists()  # refused before anything was written
    res = CliRunner().invoke(app, ["export", "d-resnet18", *TINY_FLAGS, "--no-verify"])
    assert res.exit_code == 0
    said = unwrapped(CliRunner().invoke(app, ["inspect", "out/d-resnet18.edge3d"]).output)
    assert "600 classes, unnamed (export --labels FILE names them)" in said, said
    before = {f.name: f.read_bytes() for f in Path("out/d-resnet18.edge3d").iterdir()}
    res = CliRunner().invoke(app, ["export", "out/d-resnet18.edge3d", "--labels", "two.txt", "--profile", "fp16"])
    said = " ".join(res.output.split())
    assert res.exit_code == 2 and "--labels two.txt names 2 classes and out/d-resnet18.edge3d has 600; give one " \
        "name per class, in output order." in said, said
    assert {f.name: f.read_bytes() for f in Path("out/d-resnet18.edge3d").iterdir()} == before  # nothing written


def test_export_artifact_takes_a_label_file_from_python(tmp_path: Path) -> None:
    (tmp_path / "labels.json").write_text(json.dumps({"swipe": 1, "wave": 0, "none": 2}))
    model = randomize(zoo.build("d-resnet18", **{**TINY, "num_classes": 3}), seed=3)
    art = export_artifact(model, tmp_path, "m", frame_size=32, classes=tmp_path / "labels.json", verify=False)
    assert json.loads((art / "manifest.json").read_text())["output"]["classes"] == ["wave", "swipe", "none"]
    with pytest.raises(ValueError, match="labels file .*absent.txt does not exist"):  # a path as a string, too
        export_artifact(model, tmp_path, "m", frame_size=32, classes=str(tmp_path / "absent.txt"), verify=False)
    with pytest.raises(ValueError, match="classes must be a list of class names"):  # not a path: not read as one
        export_artifact(model, tmp_path, "m", frame_size=32, classes="wave", verify=False)


@pytest.mark.parametrize("model, flags", [("d-resnet18", ["--classes", "3", "--profile", "fp32,fp16,int8",
                                                           "--calib-frames", "16"]),
                                          ("r3d18-causal", ["--classes", "3"])])  # one graph per stage
def test_labels_name_an_exported_artifact_in_place(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, model: str,
                                                   flags: list[str]) -> None:
    """An artifact exported before its names were at hand is named without exporting it again: the manifest
    and the manifest inside every graph file of every precision (a bare .onnx prints the same names), each
    file rehashed so the runtime loads it, and the outputs unchanged."""
    import onnx
    from edge3d.runtime import Session

    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(app, ["export", model, *TINY_FLAGS, *flags, "-o", "out", "--no-verify"])
    assert res.exit_code == 0, res.output
    art = Path("out", f"{model}.edge3d")
    frames = np.random.default_rng(4).integers(0, 256, (10, 32, 32, 3), dtype=np.uint8)
    manifest = json.loads((art / "manifest.json").read_text())
    with Session(art) as s:
        before = [s.step(f) for f in frames]
    Path("names.txt").write_text("wave\nswipe\nnone\n")
    res = CliRunner().invoke(app, ["export", str(art), "--labels", "names.txt"])
    assert res.exit_code == 0 and "named the 3 classes of" in res.output, res.output
    manifest = json.loads((art / "manifest.json").read_text())
    assert manifest["output"]["classes"] == ["wave", "swipe", "none"]
    graphs = [f for e in manifest["precisions"].values() for f in (e.get("files") or [e["file"]])]
    assert len(graphs) >= 2
    for name in graphs:
        inner = json.loads(next(p.value for p in onnx.load(str(art / name)).metadata_props
                                if p.key == "edge3d.manifest"))
        assert inner["output"]["classes"] == ["wave", "swipe", "none"], name
    for profile in manifest["precisions"]:
        with Session(art, profile=profile) as s:  # every file's new hash is the one recorded
            after = [s.step(f) for f in frames]
            if profile == "fp32":
                assert all(np.array_equal(a, b) for a, b in zip(after, before, strict=True))
            if s.has_output:
                assert s.top(after[-1])[1] in ("wave", "swipe", "none")
    assert not [f for f in art.iterdir() if f.name.startswith(".")]  # no staging file left behind
    # the frame settings change in place the same way; an INT8 graph calibrated the old way is named
    res = CliRunner().invoke(app, ["export", str(art), "--fit", "crop"])
    said = " ".join(res.output.split())
    assert res.exit_code == 0 and "frame fit crop" in said, res.output
    recalibrate = f"int8 was calibrated on frames prepared the old way; calibrate again with `edge3d export {art} " \
                  "--profile int8`"
    assert (recalibrate in said) == ("int8" in manifest["precisions"]), said
    res = CliRunner().invoke(app, ["export", str(art), "--fit", "crop"])  # no change: nothing to recalibrate
    assert res.exit_code == 0 and "calibrated" not in res.output, res.output
    for name in graphs:
        inner = json.loads(next(p.value for p in onnx.load(str(art / name)).metadata_props
                                if p.key == "edge3d.manifest"))
        assert (inner["frame"]["fit"], inner["format_version"]) == ("crop", 2), name
