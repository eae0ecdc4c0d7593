"""MODEL as ``package.module:factory``: a user's own causal model through `edge3d export`, and the
mistakes a user makes with a factory, each one sentence."""

from __future__ import annotations

import json
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import randomize
from edge3d.runtime import Session
from typer.testing import CliRunner

from edge3d.cli import app

USER_MODELS = '''
import torch
from torch import nn
from edge3d.nn import CausalConv3d


class Tiny(nn.Module):
    def __init__(self, num_classes=4, width=1.0):
        super().__init__()
        c = max(1, int(8 * width))
        self.conv = CausalConv3d(3, c, 3, padding=1)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x):
        y = torch.relu(self.conv(x)).mean(dim=(3, 4))
        return self.fc(y.transpose(1, 2)).transpose(1, 2)


def build(num_classes=4, width=1.0):
    return Tiny(num_classes, width)


def boom():
    raise RuntimeError("kaboom")


def needs(depth):
    return Tiny()


def not_module():
    return 3


def flat(num_classes=4):
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(num_classes))


not_callable = 5


class PerFrame(nn.Module):
    """A per-frame 2-D baseline: no temporal layer, so no state at all."""

    def __init__(self, num_classes=4):
        super().__init__()
        self.conv = nn.Conv3d(3, 6, (1, 3, 3), padding=(0, 1, 1))
        self.fc = nn.Conv3d(6, num_classes, 1)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x))).mean(dim=(3, 4))


def per_frame(num_classes=4):
    return PerFrame(num_classes)


class MeanOverTime(Tiny):
    def forward(self, x):
        y = torch.relu(self.conv(x)).mean(dim=(3, 4))
        y = y - y.mean(dim=2, keepdim=True)  # every frame of the clip: not causal
        return self.fc(y.transpose(1, 2)).transpose(1, 2)


class CumSum(Tiny):
    def forward(self, x):
        y = torch.relu(self.conv(x)).mean(dim=(3, 4)).cumsum(dim=2)  # causal, but its state is hidden
        return self.fc(y.transpose(1, 2)).transpose(1, 2)


class Segmenter(nn.Module):
    """A class per pixel and frame: output (N, classes, T, H, W), its channels named."""

    def __init__(self, num_classes=3):
        super().__init__()
        self.conv = CausalConv3d(3, 6, 3, padding=1)
        self.head = CausalConv3d(6, num_classes, (2, 1, 1))
        self.class_names = [f"region {i}" for i in range(num_classes)]

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)))


def segmenter(num_classes=3):
    return Segmenter(num_classes)


class FrameTokens(nn.Module):
    """Attention over each frame's pixels, with the batch folded into the token batch."""

    def __init__(self, num_classes=2):
        super().__init__()
        self.conv = CausalConv3d(3, 8, 3, padding=1)
        self.norm = nn.LayerNorm(8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        h = self.conv(x)
        n, c, t, hh, ww = h.shape
        s = self.norm(h.permute(0, 2, 3, 4, 1).reshape(n * t, hh * ww, c))
        s = self.attn(s, s, s)[0].mean(1).reshape(n, t, c)
        return self.fc(s).transpose(1, 2)


def frame_tokens(num_classes=2):
    return FrameTokens(num_classes)


class IntBatch(Tiny):
    def forward(self, x):
        y = torch.relu(self.conv(x)).mean(dim=(3, 4))
        n = int(y.shape[0])  # a Python int: the trace fixes the batch size
        return self.fc(y.transpose(1, 2).reshape(n, -1, y.shape[1])).transpose(1, 2)


def int_batch():
    return IntBatch()


class ClipNorm(nn.Module):
    """A GroupNorm on the clip: its statistics span every frame."""

    def __init__(self, per_frame=False):
        super().__init__()
        self.per_frame = per_frame
        self.conv = CausalConv3d(3, 8, 3, padding=1)
        self.norm = nn.GroupNorm(2, 8)
        self.fc = nn.Conv3d(8, 2, 1)

    def forward(self, x):
        h = self.conv(x)
        if self.per_frame:  # the fix the error names: (N·T, C, H, W)
            n, c, t, hh, ww = h.shape
            h = self.norm(h.transpose(1, 2).reshape(n * t, c, hh, ww)).reshape(n, t, c, hh, ww).transpose(1, 2)
        else:
            h = self.norm(h)
        return self.fc(torch.relu(h)).mean(dim=(3, 4))


def clip_norm():
    return ClipNorm()


def frame_norm():
    return ClipNorm(per_frame=True)


class TwoClipNorms(ClipNorm):
    def __init__(self):
        super().__init__()
        self.norm2 = nn.InstanceNorm3d(8)

    def forward(self, x):
        return self.fc(torch.relu(self.norm2(self.norm(self.conv(x))))).mean(dim=(3, 4))


def two_norms():
    return TwoClipNorms()


class TwoHeads(Tiny):
    def forward(self, x):
        y = torch.relu(self.conv(x)).mean(dim=(3, 4))
        return self.fc(y.transpose(1, 2)).transpose(1, 2), y  # logits and features


def two_heads():
    return TwoHeads()


class FirstOf(nn.Module):
    """The wrapper the refusal of two outputs suggests."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x)[0]


def first_head():
    return FirstOf(TwoHeads())


class Grey(nn.Module):
    """A one-channel (grey, thermal, depth) camera model."""

    def __init__(self, num_classes=3):
        super().__init__()
        self.conv = CausalConv3d(1, 6, 3, padding=1)
        self.fc = nn.Conv3d(6, num_classes, 1)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x))).mean(dim=(3, 4))


def grey(num_classes=3):
    return Grey(num_classes)


class BatchAsTime(Tiny):
    def forward(self, x):
        n, t = x.shape[0], x.shape[2]
        y = torch.relu(self.conv(x)).mean(dim=(3, 4)).permute(0, 2, 1).reshape(n * t, -1)  # rows n-major
        return self.fc(y).reshape(t, n, -1).permute(1, 2, 0)  # read back t-major: right only if n or t is 1
'''


@pytest.fixture(scope="module")
def user_module(tmp_path_factory) -> str:
    """A module of factories importable by name, as a user's package would be."""
    folder = tmp_path_factory.mktemp("user")
    name = f"user_models_{uuid.uuid4().hex[:8]}"
    (folder / f"{name}.py").write_text(USER_MODELS)
    (folder / f"{name}_typo.py").write_text("def build(:\n    pass\n")
    (folder / f"{name}_raises.py").write_text("raise RuntimeError('no GPU found')\n")
    sys.path.insert(0, str(folder))
    yield name
    sys.path.remove(str(folder))
    for suffix in ("", "_typo", "_raises"):
        sys.modules.pop(name + suffix, None)


def test_a_factory_is_found_beside_the_user_and_by_its_file_path(tmp_path: Path) -> None:
    """The `edge3d` command's sys.path starts at its bin folder: `edge3d inspect mynet:build` typed beside
    mynet.py said "No module named 'mynet'", and `./mynet.py:build` failed on a relative import."""
    import os
    import subprocess

    exe = Path(sys.executable).parent / "edge3d"
    if not exe.exists():
        pytest.skip("no edge3d console script beside this Python (install the package with pip)")
    name = f"mynet_{uuid.uuid4().hex[:8]}"
    project = tmp_path / "project"
    project.mkdir()
    (project / f"{name}_layers.py").write_text(  # a neighbour the factory's file imports
        "import torch\nfrom torch import nn\nfrom edge3d.nn import CausalConv3d\n\n\nclass Net(nn.Module):\n"
        "    def __init__(self):\n        super().__init__()\n"
        "        self.stem = CausalConv3d(3, 4, (3, 3, 3), padding=(0, 1, 1))\n"
        "        self.fc = nn.Linear(4, 2)\n\n"
        "    def forward(self, x):\n        return self.fc(self.stem(x).mean((3, 4)).transpose(1, 2)).transpose(1, 2)\n")
    (project / f"{name}.py").write_text(f"from {name}_layers import Net\n\n\ndef build():\n    return Net()\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"COLUMNS": "200"}

    def inspect(spec: str, cwd: Path) -> subprocess.CompletedProcess:
        return subprocess.run([str(exe), "inspect", spec, "--size", "16"], cwd=cwd, capture_output=True, text=True,
                              env=env, timeout=300)

    for spec, cwd in ((f"{name}:build", project), (f"./{name}.py:build", project),
                      (f"{project / name}.py:build", tmp_path)):
        done = inspect(spec, cwd)
        assert done.returncode == 0, (spec, done.stderr)
        assert "stem.cache" in done.stdout  # the causal conv's two past frames
    done = inspect(f"{name}:build", tmp_path)  # not beside it: both ways are named
    assert done.returncode == 2 and "edge3d looks on PYTHONPATH and in the current folder, or give the file: " \
        f"path/to/{name}.py:build." in done.stderr, done.stderr
    (project / "needs.py").write_text("import no_such_package_here\n")  # a package the user's module lacks
    done = inspect("needs:build", project)
    assert done.returncode == 2 and "importing needs raised ModuleNotFoundError (No module named " \
        "'no_such_package_here'); install that package where edge3d runs." in done.stderr, done.stderr
    done = inspect("missing.py:build", tmp_path)
    assert done.returncode == 2 and "cannot import 'missing.py:build' (missing.py is not a file); give the path " \
        "of the .py file that holds the factory" in done.stderr, done.stderr


def test_a_user_factory_exports_with_its_checkpoint_and_matches_pytorch(user_module: str, tmp_path: Path) -> None:
    module = __import__(user_module)
    model = randomize(module.build(num_classes=3, width=0.5), seed=4).eval()
    torch.save(model.state_dict(), tmp_path / "ck.pt")
    res = CliRunner().invoke(app, ["export", f"{user_module}:build", "--classes", "3", "--width", "0.5",
                                   "--size", "24", "--checkpoint", str(tmp_path / "ck.pt"), "-o", str(tmp_path)])
    assert res.exit_code == 0, res.output
    session = Session(tmp_path / "build.edge3d")
    clip = torch.randn(1, 3, 40, 24, 24, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(clip)[0].numpy()
    out = np.stack([session.step(clip[0, :, t].numpy()) for t in range(40)], axis=1)
    assert out.shape == ref.shape == (3, 40)
    assert np.abs(out - ref).max() <= 1e-4 * max(1.0, float(np.abs(ref).max()))


def test_a_model_without_temporal_layers_exports_and_streams_with_no_state(user_module: str, tmp_path: Path) -> None:
    """A per-frame baseline has no state: its export failed in torch.export (an entry for the
    empty *states), chunked batching in StopIteration, bench-streams in a division by zero."""
    module = __import__(user_module)
    model = randomize(module.per_frame(num_classes=3), seed=5).eval()
    torch.save(model.state_dict(), tmp_path / "ck.pt")
    runner = CliRunner()
    res = runner.invoke(app, ["export", f"{user_module}:per_frame", "--classes", "3", "--size", "20",
                              "--checkpoint", str(tmp_path / "ck.pt"), "-o", str(tmp_path)])
    assert res.exit_code == 0, res.output
    art = tmp_path / "per_frame.edge3d"
    clip = torch.randn(4, 3, 12, 20, 20, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model(clip).numpy()  # (streams, classes, T)
    for max_batch in (None, 3):
        with Session(art, streams=4, max_batch=max_batch) as s:
            assert s.cache_bytes == 0 and s.get_state() == {}
            out = np.stack([s.step_batch(np.ascontiguousarray(clip[:, :, t].numpy())) for t in range(12)], axis=2)
            part = s.step_batch(np.ascontiguousarray(clip[2:3, :, 0].numpy()), [2])
        assert np.abs(out - ref).max() <= 1e-4 * max(1.0, float(np.abs(ref).max()))
        assert np.abs(part[0] - ref[2, :, 0]).max() <= 1e-4 * max(1.0, float(np.abs(ref).max()))
    res = runner.invoke(app, ["inspect", str(art)], terminal_width=200)
    assert res.exit_code == 0 and "states (per stream): none; the model has no temporal layer" in res.output
    res = runner.invoke(app, ["bench-streams", str(art), "--streams", "1,2", "--frames", "2", "--max-batch", "1",
                              "--json"])
    assert res.exit_code == 0, res.output
    assert '"rss_per_extra_batched_stream_over_state": null' in res.output


@pytest.mark.parametrize(("factory", "flags", "message"), [
    ("boom", [], "raised RuntimeError while building the model (kaboom)"),
    ("needs", [], "needs an argument 'depth' that edge3d cannot pass"),
    ("not_callable", [], "is not callable (int)"),
    ("not_module", [], "returned int, not a torch.nn.Module"),
    ("two_heads", [], "forward must return one tensor to be streamed, got tuple; export the one the app needs, "
                      "through a wrapper module whose forward returns it (model(x)[0]"),
    ("", [], "is neither a zoo name nor package.module:factory"),
    ("build", ["--head", "lstm"], "takes no head option, so --head would be ignored"),
    ("flat", [], "edge3d calls the model on (N, C, T, H, W) clips"),
    ("missing", [], "has no attribute 'missing'"),
    ("_typo:build", [], "_typo has a syntax error (invalid syntax, "),  # a traceback before
    ("_raises:build", [], "_raises raised RuntimeError (no GPU found); import it from Python to see the traceback."),
])
def test_factory_mistakes_are_one_sentence(user_module: str, tmp_path: Path, factory: str, flags: list[str],
                                           message: str) -> None:
    spec = f"{user_module}{factory}" if factory.startswith("_") else f"{user_module}:{factory}"
    res = CliRunner().invoke(app, ["export", spec, "--size", "24", *flags, "-o", str(tmp_path / "out")])
    assert res.exit_code == 2 and message in res.output, res.output
    assert "Traceback" not in res.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("factory", "frame"), [("MeanOverTime", 0), ("CumSum", 1), ("BatchAsTime", 0)])
def test_forward_code_that_mixes_frames_is_refused_before_anything_is_written(
        user_module: str, tmp_path: Path, factory: str, frame: int) -> None:
    res = CliRunner().invoke(app, ["export", f"{user_module}:{factory}", "--size", "16", "-o", str(tmp_path / "out")])
    assert res.exit_code == 2, res.output
    assert f"{factory}'s step differs from its clip forward at frame {frame} of a random 10-frame clip" in res.output
    assert "--no-verify" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "out" / f"{factory}.edge3d").exists()


def test_no_verify_exports_what_the_check_refuses_and_says_so(user_module: str, tmp_path: Path) -> None:
    import json

    res = CliRunner().invoke(app, ["export", f"{user_module}:CumSum", "--size", "16", "-o", str(tmp_path),
                                   "--no-verify"])
    assert res.exit_code == 0, res.output
    assert "not verified against the clip forward or in ONNX Runtime (--no-verify)" in res.output
    assert json.loads((tmp_path / "CumSum.edge3d" / "manifest.json").read_text())["model"]["step_check"] is None
    res = CliRunner().invoke(app, ["export", f"{user_module}:build", "--size", "16", "-o", str(tmp_path)])
    assert res.exit_code == 0 and "verified on 10 random frames: step = clip ±" in res.output
    assert ", ONNX = step ±" in res.output
    check = json.loads((tmp_path / "build.edge3d" / "manifest.json").read_text())["model"]["step_check"]
    assert check["frames"] == check["outputs"] == 10 and 0 <= check["max_error"] <= 1e-3 * check["scale"]
    assert 0 <= check["onnx_max_error_relative"] <= 1e-4
    shown = CliRunner().invoke(app, ["inspect", str(tmp_path / "build.edge3d")], terminal_width=200).output
    assert "step check, 10 random frames" in shown and "step = clip ±" in shown and ", ONNX = step ±" in shown
    shown = CliRunner().invoke(app, ["inspect", str(tmp_path / "CumSum.edge3d")], terminal_width=200).output
    assert "not checked (--no-verify)" in shown


def test_bench_refuses_what_export_refuses_and_times_it_with_no_verify(user_module: str) -> None:
    import json

    args = ["bench", f"{user_module}:CumSum", "--size", "16", "--frames", "3", "--rounds", "1", "--window", "2"]
    res = CliRunner().invoke(app, args)
    said = " ".join(res.output.split())
    assert res.exit_code == 2 and "CumSum's step differs from its clip forward" in said
    assert "skip this check with --no-verify" in said and "edge3d export" not in said  # a flag bench has
    res = CliRunner().invoke(app, [*args, "--no-verify", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["results"]["step_ms"] > 0


def test_bench_times_a_model_whose_window_torch_onnx_cannot_export(tmp_path: Path) -> None:
    """AdaptiveAvgPool3d((None, 1, 1)) streams (edge3d pools each frame), but torch.onnx has no ONNX function
    for the clip forward's aten._adaptive_avg_pool3d: bench died on torch.onnx's page of traceback. It now
    times everything else and says what it left out."""
    import json

    (tmp_path / "pooled.py").write_text(
        "import torch\nfrom torch import nn\nfrom edge3d.nn import CausalConv3d\n\n\nclass Net(nn.Module):\n"
        "    def __init__(self):\n        super().__init__()\n"
        "        self.c = CausalConv3d(3, 4, (3, 3, 3), padding=(0, 1, 1))\n"
        "        self.pool = nn.AdaptiveAvgPool3d((None, 1, 1))\n        self.fc = nn.Conv3d(4, 2, 1)\n\n"
        "    def forward(self, x):\n        return self.fc(self.pool(torch.relu(self.c(x)))).flatten(2)\n\n\n"
        "def build():\n    return Net()\n")
    args = ["bench", f"{tmp_path / 'pooled.py'}:build", "--size", "16", "--frames", "4", "--rounds", "1",
            "--window", "4"]
    res = CliRunner().invoke(app, [*args, "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.output)
    assert "aten._adaptive_avg_pool3d" in report["not_measured"]["window"]
    assert "step_vs_window_speedup" not in report["ratios"] and "window_ms_per_output_frame" not in report["results"]
    assert report["ratios"]["lowered_vs_conv3d_speedup"] > 0 and report["ratios"]["exported_vs_eager_speedup"] > 0
    res = CliRunner().invoke(app, args, terminal_width=300)
    assert res.exit_code == 0 and "not measured: the 4-frame window's clip forward did not export to ONNX (torch.onnx " \
        "has no ONNX function for aten._adaptive_avg_pool3d)" in " ".join(res.output.split()), res.output


def test_the_step_check_reports_a_failing_or_non_finite_clip_forward(user_module: str) -> None:
    import edge3d
    from edge3d.equivalence import StepMismatchError, check_step_matches_clip

    module = __import__(user_module)
    step = edge3d.to_step(module.build(), (3, 16, 16))
    step.model.forward = lambda x: torch.full((x.shape[0], 4, x.shape[2]), float("nan"))
    with pytest.raises(StepMismatchError, match="gives NaN or Inf on a random clip"):
        check_step_matches_clip(step)

    def only_one_frame(x: torch.Tensor) -> torch.Tensor:
        if x.shape[2] != 1:
            raise RuntimeError("expected one frame")
        return torch.zeros(x.shape[0], 4, 1)

    step.model.forward = only_one_frame
    with pytest.raises(StepMismatchError, match=r"failed on a random 10-frame clip \(RuntimeError: expected one"):
        check_step_matches_clip(step)


def test_the_custom_model_example_streams_exports_and_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """examples/custom_model.py does what its docstring says, and its factory exports from the CLI."""
    import json
    import re

    examples = Path(__file__).resolve().parents[1] / "examples"
    monkeypatch.syspath_prepend(str(examples))
    import custom_model

    assert custom_model.main(["--out", str(tmp_path), "--size", "32"]) == 0
    printed = capsys.readouterr().out
    errors = [float(v) for v in re.findall(r"max error ([0-9.e+-]+)", printed)]
    assert len(errors) == 2 and max(errors) <= 1e-4, printed
    res = CliRunner().invoke(app, ["export", "custom_model:build", "--checkpoint", str(tmp_path / "ck.pt"),
                                   "--size", "32", "--classes", "6", "-o", str(tmp_path)])
    assert res.exit_code == 0, res.output
    manifest = json.loads((tmp_path / "build.edge3d" / "manifest.json").read_text())
    assert [s["kind"] for s in manifest["states"]] == ["ring", "ring", "ring", "recurrent"]
    sys.modules.pop("custom_model", None)


def test_an_exported_graph_that_differs_from_the_step_is_refused(user_module: str, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The graph as written is checked against the PyTorch step: a fault anywhere between them
    (here a simplifier that doubles the largest weight, as a folding bug would) stops the export."""
    import onnx
    from edge3d.exporters import onnx as exporter

    simplify = exporter.simplify

    def faulty(src: Path, dst: Path) -> None:
        simplify(src, dst)
        model = onnx.load(str(dst))
        t = max(model.graph.initializer, key=lambda i: len(i.raw_data))
        w = onnx.numpy_helper.to_array(t) * 2
        t.CopyFrom(onnx.numpy_helper.from_array(w, t.name))
        onnx.save(model, str(dst))

    monkeypatch.setattr(exporter, "simplify", faulty)
    module = __import__(user_module)
    with pytest.raises(ValueError, match="the exported ONNX graph differs from the PyTorch step at frame 0 of a "
                                         "random 10-frame clip"):
        exporter.export_artifact(randomize(module.build(), seed=2), tmp_path, "faulty", frame_size=16)
    assert not (tmp_path / "faulty.edge3d").exists() and not list(tmp_path.iterdir())  # no temporary folder left
    path = exporter.export_artifact(randomize(module.build(), seed=2), tmp_path, "unchecked", frame_size=16,
                                    verify=False)
    assert path.is_dir()  # verify=False skips both checks


def test_a_model_with_a_map_per_frame_exports_runs_and_compares_per_position(user_module: str,
                                                                             tmp_path: Path) -> None:
    """A segmentation model's output has a class at every pixel: `run` failed on it with a message
    about step_batch, top() named a flat argmax (a pixel and a class at once), and compare counted
    that argmax's agreement."""
    import json

    import cv2

    module = __import__(user_module)
    model = randomize(module.segmenter(num_classes=3), seed=6).eval()
    torch.save(model.state_dict(), tmp_path / "ck.pt")
    runner = CliRunner()
    res = runner.invoke(app, ["export", f"{user_module}:segmenter", "--classes", "3", "--size", "20", "--checkpoint",
                              str(tmp_path / "ck.pt"), "-o", str(tmp_path), "--profile", "int8",
                              "--calib-frames", "32"])
    assert res.exit_code == 0, res.output
    art = tmp_path / "segmenter.edge3d"
    manifest = json.loads((art / "manifest.json").read_text())
    assert manifest["output"]["shape"] == ["N", 3, 20, 20]
    assert manifest["output"]["classes"] == ["region 0", "region 1", "region 2"]  # one per channel

    clip = torch.randn(1, 3, 64, 20, 20, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        ref = model(clip)[0].numpy()  # (classes, T, H, W)
    with Session(art) as s:
        out = np.stack([s.step(clip[0, :, t].numpy()) for t in range(64)], axis=1)
        with pytest.raises(ValueError, match=r"output is a 3×20×20 map per frame .* output.argmax\(axis=0\)"):
            s.top(out[:, 0])
    assert out.shape == ref.shape
    assert np.abs(out - ref).max() <= 1e-4 * max(1.0, float(np.abs(ref).max()))

    res = runner.invoke(app, ["inspect", str(art)], terminal_width=200)
    assert res.exit_code == 0 and "3×20×20 map (a class per position)" in res.output, res.output

    rng = np.random.default_rng(1)
    images = tmp_path / "frames"
    images.mkdir()
    rgb = [rng.integers(0, 256, (20, 20, 3), dtype=np.uint8) for _ in range(24)]
    for i, f in enumerate(rgb):
        assert cv2.imwrite(str(images / f"f{i}.png"), np.ascontiguousarray(f[..., ::-1]))  # BGR on disk
    res = runner.invoke(app, ["run", str(art), "--source", str(images), "--output", str(tmp_path / "p.jsonl"),
                              "--quiet"], terminal_width=200)
    assert res.exit_code == 0, res.output
    assert "3×20×20 map, no top class" in res.output
    lines = [json.loads(x) for x in (tmp_path / "p.jsonl").read_text().splitlines()]
    with Session(art) as s:
        expected = [s.step(f) for f in rgb]
    assert len(lines) == 24 and all("top" not in x and "class" not in x for x in lines)
    np.testing.assert_allclose([x["max"] for x in lines], [e.max() for e in expected], rtol=1e-5)
    np.testing.assert_allclose([x["mean"] for x in lines], [e.mean() for e in expected], rtol=1e-4, atol=1e-6)
    res = runner.invoke(app, ["run", str(art), "--source", str(images), "--top-k", "2"], terminal_width=200)
    assert res.exit_code == 2 and "--top-k ranks the classes of a class vector, and this artifact's output is a " \
        "map" in " ".join(res.output.split()), res.output
    with Session(art) as s, pytest.raises(ValueError, match="is a 3×20×20 map per frame"):
        s.top_k(s.step(rgb[0]), 2)

    res = runner.invoke(app, ["compare", str(art), "--profiles", "fp32,int8", "--source", str(images),
                              "-o", str(tmp_path / "cmp")], terminal_width=200)
    assert res.exit_code == 0, res.output
    assert "top-1 agreement (per position)" in res.output
    report = json.loads((tmp_path / "cmp" / "report.json").read_text())
    with Session(art) as a, Session(art, "int8") as b:
        same = [a.step(f).argmax(axis=0) == b.step(f).argmax(axis=0) for f in rgb]
    assert report["agreement_per"] == "position"
    assert report["profiles"]["int8"]["top1_agreement"] == pytest.approx(float(np.mean(same)))
    assert 0.5 < report["profiles"]["int8"]["top1_agreement"] < 1.0  # pixels disagree under INT8, most do not

    import subprocess

    app_py = Path(__file__).resolve().parents[1] / "examples" / "jetson_app.py"
    done = subprocess.run([sys.executable, str(app_py), str(art), "--source", str(images), "--headless",
                           "--log-every", "8"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    logged = [line.split(" fps; ")[1] for line in done.stdout.splitlines() if line.startswith("frame ")]
    assert logged == [f"map max {expected[i].max():.2f}" for i in (7, 15, 23)], done.stdout


def test_forward_code_that_folds_the_batch_exports_for_any_number_of_streams(user_module: str,
                                                                             tmp_path: Path) -> None:
    """Traced with one example stream, torch.export specialised the batch of a model that folds it
    into attention's token batch, and the export died in onnxruntime with a traceback; a forward that
    truly fixes the batch size is refused in one sentence, with nothing written."""
    module = __import__(user_module)
    model = randomize(module.frame_tokens(), seed=7).eval()
    torch.save(model.state_dict(), tmp_path / "ck.pt")
    runner = CliRunner()
    res = runner.invoke(app, ["export", f"{user_module}:frame_tokens", "--size", "16", "--checkpoint",
                              str(tmp_path / "ck.pt"), "-o", str(tmp_path)])
    assert res.exit_code == 0, res.output
    clip = torch.randn(3, 3, 64, 16, 16, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        ref = model(clip).numpy()  # (streams, classes, T)
    tol = 1e-4 * max(1.0, float(np.abs(ref).max()))
    with Session(tmp_path / "frame_tokens.edge3d") as one, Session(tmp_path / "frame_tokens.edge3d", streams=3) as s:
        single = np.stack([one.step(clip[0, :, t].numpy()) for t in range(64)], axis=1)
        batched = np.stack([s.step_batch(np.ascontiguousarray(clip[:, :, t].numpy())) for t in range(64)], axis=2)
    assert np.abs(single - ref[0]).max() <= tol and np.abs(batched - ref).max() <= tol

    res = runner.invoke(app, ["export", f"{user_module}:int_batch", "--size", "16", "-o", str(tmp_path / "fixed")],
                        terminal_width=400)
    assert res.exit_code == 2
    assert "the exported step graph takes a fixed number of streams (frame" in res.output
    assert "write it for any batch size" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "fixed").exists() or not list((tmp_path / "fixed").iterdir())


def test_a_norm_over_the_clip_is_named_and_its_per_frame_form_exports(user_module: str, tmp_path: Path) -> None:
    """A GroupNorm on the clip is not causal: the step check named only time ops a forward might have,
    and this model has none in sight; the error now names the layer and the fix, and the fix exports."""
    runner = CliRunner()
    res = runner.invoke(app, ["export", f"{user_module}:clip_norm", "--size", "16", "-o", str(tmp_path)],
                        terminal_width=400)
    assert res.exit_code == 2 and not list(tmp_path.iterdir())
    assert "its norm (GroupNorm) takes its statistics over the clip's frames" in res.output
    assert "to x reshaped to (N·T, C, H, W)" in res.output
    res = runner.invoke(app, ["export", f"{user_module}:two_norms", "--size", "16", "-o", str(tmp_path)],
                        terminal_width=400)
    assert res.exit_code == 2 and "its norm (GroupNorm), norm2 (InstanceNorm3d) take their statistics" in res.output
    res = runner.invoke(app, ["export", f"{user_module}:frame_norm", "--size", "16", "-o", str(tmp_path)])
    assert res.exit_code == 0, res.output
    manifest = (tmp_path / "frame_norm.edge3d" / "manifest.json").read_text()
    assert '"step_check": {' in manifest  # checked, step against clip and graph against step


def test_the_wrapper_the_two_outputs_refusal_suggests_exports(user_module: str, tmp_path: Path) -> None:
    res = CliRunner().invoke(app, ["export", f"{user_module}:first_head", "--size", "24", "-o", str(tmp_path)])
    assert res.exit_code == 0, res.output
    with Session(tmp_path / "first_head.edge3d") as s:
        assert s.manifest["output"]["shape"] == ["N", 4]


def test_a_grey_camera_model_at_a_non_square_size_exports_and_streams(user_module: str, tmp_path: Path) -> None:
    """One input channel and a 4:3 frame: the CLI built (3, S, S) frames only, so such a model could not
    be exported, and its refusal named a fix (its channels) no flag could give."""
    module = __import__(user_module)
    model = randomize(module.grey(num_classes=3), seed=11).eval()
    torch.save(model.state_dict(), tmp_path / "ck.pt")
    runner = CliRunner()
    res = runner.invoke(app, ["export", f"{user_module}:grey", "--size", "24x32", "--checkpoint",
                              str(tmp_path / "ck.pt"), "-o", str(tmp_path)])
    assert res.exit_code == 0, res.output  # channels taken from the model's first convolution
    art = tmp_path / "grey.edge3d"
    frame = Session(art).manifest["frame"]
    assert (frame["channels"], frame["height"], frame["width"], frame["color"]) == (1, 24, 32, "gray")
    assert frame["mean"] == [0.45] and frame["std"] == [0.225]

    clip = torch.randn(1, 1, 64, 24, 32, generator=torch.Generator().manual_seed(12))
    with torch.no_grad():
        ref = model(clip)[0].numpy()
    with Session(art) as s:
        out = np.stack([s.step(clip[0, :, t].numpy()) for t in range(64)], axis=1)
    assert np.abs(out - ref).max() <= 1e-4 * max(1.0, float(np.abs(ref).max()))

    # raw frames: grey as H×W (or H×W×1), and an RGB camera's frame converted with BT.601 luma
    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 256, (8, 24, 32, 3), dtype=np.uint8)
    luma = rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    grey_u8 = np.round(luma).astype(np.uint8)
    with Session(art) as a, Session(art) as b, Session(art) as c, Session(art) as d:
        for f, y in zip(rgb, luma, strict=True):
            want = a.step(((y / 255 - 0.45) / 0.225)[None].astype(np.float32))
            np.testing.assert_allclose(b.step(f), want, rtol=1e-4, atol=1e-5)
        for g in grey_u8:
            np.testing.assert_array_equal(c.step(g), d.step(g[..., None]))
        with pytest.raises(ValueError, match=r"expected H×W \(grey\) or H×W×3 \(RGB, converted to grey\)"):
            c.step(np.zeros((24, 32, 4), np.uint8))

    res = runner.invoke(app, ["run", str(art), "--source", "synthetic", "--frames", "12"])  # RGB frames
    assert res.exit_code == 0 and "cache memory per stream" in res.output, res.output
    res = runner.invoke(app, ["inspect", str(art)])
    assert res.exit_code == 0 and "1×24×32 (gray)" in res.output
    res = runner.invoke(app, ["export", f"{user_module}:grey", "--size", "16", "--channels", "3", "-o",
                              str(tmp_path / "rgb")], terminal_width=400)
    assert res.exit_code == 2 and "cannot run on frames of shape (3, 16, 16)" in res.output
    assert "(--channels and --size on the command line)" in res.output
    from edge3d.exporters.onnx import export_artifact

    with pytest.raises(ValueError, match=r"frame mean \(0.4, 0.4, 0.4\) must be one finite number, for its one "):
        export_artifact(model, tmp_path / "rgb-stats", "g", frame_size=16, channels=1, mean=(0.4,) * 3, std=(0.2,))


def test_export_artifact_takes_what_the_model_declares_and_sees_through_wrappers(user_module: str,
                                                                                tmp_path: Path) -> None:
    """From Python, export_artifact ignored the model's frame_mean, frame_std and class_names (the
    artifact then normalised frames with 0.45 / 0.225: a model trained on other statistics was fed
    other inputs, silently) and assumed three channels; the CLI took all four. A torch.compile'd
    model failed in Inductor on the step check's clip, and DataParallel hid the attributes."""
    from edge3d.exporters.onnx import export_artifact

    module = __import__(user_module)

    class ThermalNet(module.Grey):
        frame_mean, frame_std = (0.3,), (0.2,)
        frame_fit = "crop"  # trained on centre crops
        frame_fps = 12  # on every 5th frame of 60 fps video
        class_names = ["person", "vehicle", "animal"]

    model = randomize(ThermalNet(num_classes=3), seed=21).eval()
    art = export_artifact(model, tmp_path, "thermal", frame_size=(12, 16))
    manifest = Session(art).manifest
    frame = manifest["frame"]
    assert (frame["channels"], frame["mean"], frame["std"], frame["fit"]) == (1, [0.3], [0.2], "crop")
    assert (frame["fps"], manifest["format_version"]) == (12, 3)
    assert manifest["output"]["classes"] == ["person", "vehicle", "animal"]
    raw = np.random.default_rng(4).integers(0, 256, (40, 12, 16), dtype=np.uint8)
    clip = torch.from_numpy((raw / 255 - 0.3) / 0.2).float()[None, None]  # (1, 1, T, H, W), its own statistics
    with torch.no_grad():
        ref = model(clip)[0].numpy()
    with Session(art) as s:
        out = np.stack([s.step(f) for f in raw], axis=1)
        assert s.top(out[:, -1])[1] == ThermalNet.class_names[int(ref[:, -1].argmax())]
    assert np.abs(out - ref).max() <= 1e-4 * max(1.0, float(np.abs(ref).max()))
    import edge3d

    assert edge3d.inspect(model, (12, 16))["states"][0]["shape"] == [2, 12, 16]  # two past grey frames, not RGB
    # the caller's own values still win
    with pytest.raises(ValueError, match="frame color 'BGR' applies to a three-channel .* this one takes 1 channel, so "):
        export_artifact(model, tmp_path / "bgr", "thermal", frame_size=(12, 16), color="BGR")
    res = CliRunner().invoke(app, ["export", str(art), "--color", "bgr"], terminal_width=300)  # named as the flag
    assert res.exit_code == 2 and "--color 'bgr' applies to a three-channel (RGB or BGR) model; this one takes 1 " \
        "channel" in res.output, res.output
    given = Session(export_artifact(model, tmp_path / "given", "thermal", frame_size=(12, 16), mean=(0.5,),
                                    std=(0.25,), fit="stretch", fps="source", verify=False)).manifest["frame"]
    assert (given["mean"], given["std"], given["fit"], given["fps"]) == ([0.5], [0.25], "stretch", None)

    import warnings

    with warnings.catch_warnings():  # importing torch's compiler stack warns that TorchScript is deprecated
        warnings.simplefilter("ignore", DeprecationWarning)
        compiled = torch.compile(model)
    # DataParallel moves the model onto the GPU where there is one; .cpu() is the fix edge3d's refusal names
    for wrapped, where in ((compiled, "compiled"), (torch.nn.DataParallel(model).cpu(), "dp")):
        wrapped_art = export_artifact(wrapped, tmp_path / where, "thermal", frame_size=(12, 16))
        got = Session(wrapped_art).manifest
        assert got["model"]["source_hash"] == manifest["model"]["source_hash"]
        assert got["frame"] == frame and got["output"]["classes"] == manifest["output"]["classes"]
        assert got["model"]["step_check"]["frames"] == 10


def test_a_zoo_model_exports_at_a_non_square_size(tmp_path: Path) -> None:
    from edge3d import zoo

    model = randomize(zoo.build("d-resnet18", width=0.125, num_classes=5), seed=13).eval()
    torch.save(model.state_dict(), tmp_path / "ck.pt")
    res = CliRunner().invoke(app, ["export", "d-resnet18", "--width", "0.125", "--classes", "5", "--size", "40x56",
                                   "--checkpoint", str(tmp_path / "ck.pt"), "-o", str(tmp_path)])
    assert res.exit_code == 0, res.output
    clip = torch.randn(1, 3, 64, 40, 56, generator=torch.Generator().manual_seed(13))
    with torch.no_grad():
        ref = model(clip)[0].numpy()
    with Session(tmp_path / "d-resnet18.edge3d") as s:
        assert (s.manifest["frame"]["height"], s.manifest["frame"]["width"]) == (40, 56)
        assert s.manifest["model"]["options"]["frame_size"] == [40, 56]
        out = np.stack([s.step(clip[0, :, t].numpy()) for t in range(64)], axis=1)
        assert s.step(np.zeros((480, 640, 3), np.uint8)).shape == (5,)  # a 4:3 camera frame, resized
    assert np.abs(out - ref).max() <= 1e-4 * max(1.0, float(np.abs(ref).max()))


@pytest.mark.parametrize(("model", "size", "message"), [
    ("d-resnet18", "0", "frame_size (--size) must be positive, got 0"),
    ("d-resnet18", "0x5", "--size must be S for an S×S frame or HxW such as 96x128 (height x width), got '0x5'"),
    ("d-resnet18", "12x", "got '12x'"),
    ("d-resnet18", "big", "got 'big'"),
    ("gestures", "48x64", "gestures was trained with --size 48 (frame_size in Python), so --size 48x64 cannot"),
])
def test_a_bad_size_is_one_sentence(tmp_path: Path, model: str, size: str, message: str) -> None:
    small = ["--width", "0.125"] if model == "d-resnet18" else []
    res = CliRunner().invoke(app, ["export", model, *small, "--size", size, "-o", str(tmp_path / "out")],
                             terminal_width=400)
    assert res.exit_code == 2 and message in res.output and not (tmp_path / "out").exists()


def test_an_export_over_another_models_artifact_of_the_same_name_names_that_model(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two files' factories both called `build` export to one `build.edge3d`: the second replaced the first
    model's artifact saying only that its precisions were "made from the earlier weights". The same file
    typed another way (`./a/net.py`) is the same model, a re-export, and keeps that message."""
    monkeypatch.chdir(tmp_path)
    net = ("import torch\nfrom torch import nn\nfrom edge3d.nn import CausalConv3d\n\n\nclass Net(nn.Module):\n"
           "    def __init__(self):\n        super().__init__()\n"
           "        self.stem = CausalConv3d(3, 4, (2, 3, 3), padding=(0, 1, 1))\n"
           "        self.fc = nn.Linear(4, {classes})\n\n"
           "    def forward(self, x):\n        return self.fc(self.stem(x).mean((3, 4)).transpose(1, 2)).transpose(1, 2)\n"
           "\n\ndef build():\n    return Net()\n")
    for folder, classes in (("a", 2), ("b", 3)):
        Path(folder).mkdir()
        Path(folder, f"net_{folder}_{uuid.uuid4().hex[:8]}.py").write_text(net.format(classes=classes))
    (a,), (b,) = (sorted(str(p) for p in Path(f).glob("*.py")) for f in ("a", "b"))

    def export(spec: str, *flags: str) -> str:
        res = CliRunner().invoke(app, ["export", f"{spec}:build", "--size", "16", "-o", "out", "--no-verify", *flags])
        assert res.exit_code == 0, res.output
        return " ".join(res.output.split())

    export(a, "--profile", "fp32,fp16")
    said = export(f"./{a}")
    assert "without its fp16 (made from the earlier weights)" in said and "an export of" not in said, said
    export(a, "--profile", "fp32,fp16")
    said = export(b)
    assert f"replaced the artifact there, an export of {a}:build, not {b}:build (its fp16 too); to keep two models " \
        "side by side, give each its own --name" in said, said
    manifest = json.loads(Path("out/build.edge3d/manifest.json").read_text())
    assert manifest["model"]["name"] == f"{b}:build" and manifest["output"]["shape"][-1] == 3
    assert "replaced" not in export(b)  # b over b: nothing dropped, the same model
