"""The ``edge3d`` command line: zoo, inspect, export, run, bench (and compare, build, triton).

Every command turns a ``ValueError`` (bad input: wrong model name, corrupt artifact, bad
frame source...) into one red sentence and exit code 2, never a traceback.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import shlex
import sys
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .profiles import split_names
from .runtime.manifest import MANIFEST, format_bytes, json_safe, output_map


def repeated_options(params: Sequence[Any], args: Sequence[str]) -> list[tuple[str, list[str]]]:
    """Options that take one value yet appear more than once in ``args``, with the values given.

    Click keeps the last value of a repeated option without a word: `--profile fp16 --profile int8`
    built int8 alone, and `--frames 100 ... --frames 10` ran 10 frames.
    """
    single = {}
    for param in params:
        if getattr(param, "param_type_name", "") != "option" or param.multiple or param.is_flag or param.count:
            continue
        for opt in param.opts:
            single[opt] = param
    seen: dict[Any, tuple[str, list[str]]] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            break
        name, eq, value = arg.partition("=")
        param = single.get(name if eq else arg)
        if param is not None:
            if not eq:
                value = args[i + 1] if i + 1 < len(args) else ""
                i += 1
            seen.setdefault(param, (name if eq else arg, []))[1].append(value)  # named as first typed
        i += 1
    return [(name, values) for name, values in seen.values() if len(values) > 1]


def _untyped_flags(params: list[Any]) -> list[Any]:
    """Typer 0.29's help prints ``--quiet <bool>``, which reads as ``--quiet true`` (an error): a flag takes no value."""
    for param in params:
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""
    return params


class OnceCommand(typer.core.TyperCommand):
    """Refuses an option given twice where it takes one value, naming both values."""

    def get_params(self, ctx: Any) -> list[Any]:
        return _untyped_flags(super().get_params(ctx))

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        for name, values in repeated_options(self.params, args):
            param = next(p for p in self.params if name in getattr(p, "opts", ()))
            help_text = (param.help or "").lower()
            listed = ", ".join(values)
            if "comma separated" in help_text or "e.g. 1,2" in help_text:  # the options that take lists
                fix = f"only the last would count; give them as one comma-separated list: {name} {','.join(values)}"
            else:
                fix = "it takes one value, so only the last would count; give it once"
            _error(f"{name} was given {len(values)} times ({listed}), and {fix}.")
            raise typer.Exit(2)
        return super().parse_args(ctx, args)


class _Group(typer.core.TyperGroup):
    def get_params(self, ctx: Any) -> list[Any]:
        return _untyped_flags(super().get_params(ctx))


app = typer.Typer(  # the help text is _main's docstring
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False, cls=_Group,
)
console = Console()
err_console = Console(stderr=True)
# `run` into a log (a service's journal, `docker logs`, a file) has no live line: its text every this many seconds
STATUS_EVERY_S = 10.0
F = TypeVar("F", bound=Callable[..., Any])


def _version(value: bool) -> None:
    """What a bug report needs: this edge3d, the artifact format it reads and writes, its runtime."""
    if not value:
        return
    import onnxruntime

    from . import __version__
    from .runtime.manifest import READS

    console.print(f"edge3d {__version__} (artifact format_version {READS[0]} to {READS[-1]}), onnxruntime "
                  f"{onnxruntime.__version__}, Python {sys.version.split()[0]}", highlight=False)
    raise typer.Exit()


@app.callback()
def _main(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                help="Print the versions and exit.")] = False) -> None:
    """Export causal video networks as per-frame step graphs with explicit state, and stream them."""

Classes = Annotated[int | None, typer.Option("--classes", help="Number of output classes.")]
Size = Annotated[str | None, typer.Option(
    "--size", help="Frame size the model runs at: S for S×S, or HxW such as 96x128 for a 4:3 camera.")]
Channels = Annotated[int | None, typer.Option(
    "--channels", help="Channels per frame (default: the model's first convolution's: 3 for RGB, 1 for a grey, "
                       "thermal or depth camera model, which also takes RGB frames, converted to grey).")]
Width = Annotated[float | None, typer.Option(
    "--width", help="Channel multiplier: 1 is the paper's model, 0.25 a quarter of its channels (not a percentage).")]
Head = Annotated[str | None, typer.Option("--head", help="Temporal head: fc | lstm | gru (where the model has one).")]


def frame_size_option(size: str | None) -> int | tuple[int, int] | None:
    """``--size``: an int for a square frame (what factories take), or (height, width) from HxW."""
    if size is None:
        return None
    text = size.strip()
    try:
        return int(text)  # a non-positive one is refused with the other size options
    except ValueError:
        pass
    parts = text.lower().replace("×", "x").split("x")
    if len(parts) == 2 and all(p.strip().isdigit() and int(p) > 0 for p in parts):
        h, w = (int(p) for p in parts)
        return h if h == w else (h, w)
    raise ValueError(f"--size must be S for an S×S frame or HxW such as 96x128 (height x width), got {size!r}.")


def size_text(frame_size: int | tuple[int, int]) -> str:
    h, w = (frame_size, frame_size) if isinstance(frame_size, int) else frame_size
    return f"{h}×{w}"


# The optional packages a verb may import: the extra that installs each, and what a message calls it.
# A runtime-only install (numpy, onnxruntime, the CLI: what a Jetson gets) has none of them.
_TORCH_ONNX = ("export", "PyTorch and onnx")
EXTRA_OF = {"torch": _TORCH_ONNX, "onnx": _TORCH_ONNX, "onnxscript": _TORCH_ONNX, "safetensors": ("export", "safetensors"),
            "cv2": ("video", "OpenCV"), "matplotlib": ("plots", "matplotlib"), "tritonclient": ("triton", "tritonclient"),
            "polygraphy": ("tensorrt", "polygraphy")}


def _error(text: str) -> None:
    """One error sentence on stderr. Escaped: "pip install 'edge3d[video]'" is text, not rich markup."""
    err_console.print(f"[bold red]error:[/] {escape(text)}", highlight=False, soft_wrap=True)


def friendly(fn: F) -> F:
    """Report bad input as one sentence and a non-zero exit instead of a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from .signals import Terminated, sigterm_as_interrupt

        try:
            # SIGTERM (`timeout`, `docker stop`) unwinds as Ctrl-C does, so an export's staging
            # folder is removed and compare still writes its report; its default killed the process
            with sigterm_as_interrupt():
                return fn(*args, **kwargs)
        except ModuleNotFoundError as e:
            package = (e.name or "").split(".")[0]
            if package not in EXTRA_OF:
                raise
            extra, holds = EXTRA_OF[package]
            first = " (the CPU build of PyTorch first, see the README)" if extra == "export" else ""
            _error(f"{fn.__name__.replace('_', '-')} needs {holds}, which this installation lacks; "
                   f"pip install {f'edge3d[{extra}]'!r}{first}.")
            raise typer.Exit(2) from None
        except ValueError as e:
            _error(str(e))
            raise typer.Exit(2) from None
        except OSError as e:  # a path the command had to read or write; its own checks missed it
            if e.filename:
                _error(_path_error(e))
            else:  # a failed write or flush (a full disk) names no file
                _error(f"writing a file failed ({e.strerror or e}); check the free space and the output paths.")
            raise typer.Exit(2) from None
        except KeyboardInterrupt as e:
            terminated = isinstance(e, Terminated)
            err_console.print("terminated" if terminated else "interrupted")
            raise typer.Exit(143 if terminated else 130) from None
        except MemoryError as e:  # numpy's: a Session or a buffer larger than the memory
            _error(_out_of_memory(fn.__name__, str(e)))
            raise typer.Exit(2) from None
        except RuntimeError as e:  # a camera lost while compare or calibration read it: exit 1, as in run
            from .sources import SourceLost

            if "can't allocate memory" in str(e):  # torch's CPU allocator, e.g. for frames of --size 100000
                _error(_out_of_memory(fn.__name__, str(e)))
                raise typer.Exit(2) from None
            if not isinstance(e, SourceLost):
                raise
            _error(str(e))
            raise typer.Exit(1) from None
        except Exception as e:  # onnxruntime's own exceptions derive from Exception alone
            if "Failed to allocate memory" not in str(e):  # its arena, for a graph's activations
                raise
            _error(_out_of_memory(fn.__name__, str(e)))
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


def _path_error(e: OSError) -> str:
    """One sentence for a path the command could not use. A file it was creating (a hidden staging
    folder beside an artifact, a report) names the folder it could not write in: the user never typed
    the staging name, and the fix is about the folder."""
    import errno

    path = Path(os.fsdecode(e.filename))
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS) and not path.exists() and path.parent.is_dir():
        return (f"cannot write in {path.parent} ({e.strerror}); write somewhere you may, or change the folder's "
                "permissions.")
    return f"cannot use {path} ({e.strerror or e}); check the path and that you may read and write there."


def _out_of_memory(verb: str, detail: str) -> str:
    """One sentence for an allocation that failed, with the size asked for where the message has it."""
    import re

    # torch says "allocate 123 bytes", onnxruntime "buffer of size 123", numpy "Unable to allocate 1.2 GiB for ..."
    asked = re.search(r"allocate (\d+) bytes", detail) or re.search(r"buffer of size (\d+)", detail)
    numpy = re.search(r"allocate ([\d.]+ ?\w+)", detail)
    size = f"{int(asked.group(1)) / 2**30:.1f} GiB" if asked else numpy.group(1) if numpy else ""
    what = f" (one allocation of {size} failed)" if size else ""
    fix = ("use a smaller --size or --width: the frames and activations grow with the square of --size, the "
           "weights with the square of --width" if verb in ("export", "inspect", "bench")
           else "free memory, or use fewer streams")
    if verb == "bench":  # the sliding-window graph holds --window frames' activations at once
        fix += ", and those of the sliding window with --window"
    return f"{verb.replace('_', '-')} ran out of memory{what}; {fix}."


def _is_artifact(target: str) -> bool:
    """An artifact folder, its manifest or one of its ONNX files; a folder that is neither is an error,
    not a model name."""
    p = Path(target).expanduser()
    if (p / MANIFEST).is_file() or (p.is_file() and (p.name == MANIFEST or p.suffix == ".onnx")):
        return True
    from .runtime.manifest import artifacts_in, resolve_artifact
    from .zoo import names as zoo_names  # torch-free: the optional entries load only when it is called

    # A bare word may be a zoo name that happens to match a local folder; a path, or a folder holding
    # artifacts (`-o out` writes out/NAME.edge3d), is meant as an artifact. So is a path that does not
    # exist: "unknown model './x.edge3d'; choose one of d-resnet18, ..." would hide the typo.
    path_like = os.sep in target or "/" in target or target.startswith((".", "~")) or p.suffix in (".edge3d", ".onnx")
    factory_like = ":" in target[len(p.drive):]  # package.module:factory (past a Windows drive letter)
    a_file = p.is_file() and bool(p.suffix)  # zoo names have no suffix; "clip.mp4" is no model
    # A bare word naming a folder here and no zoo model ("edge3d inspect runs") means the folder:
    # "unknown model 'runs'" would send the user to the zoo list for a folder that holds no artifact.
    if p.is_dir() and not (artifacts_in(p) or path_like or factory_like or target in zoo_names()):
        raise ValueError(f"{target} is a folder here with no artifact in it (no manifest.json) and no zoo model; "
                         f"point to a folder written by `edge3d export`, or name a zoo model (`edge3d zoo`) or "
                         f"package.module:factory.")
    if (p.is_dir() and (artifacts_in(p) or path_like)) or (path_like and not factory_like and not p.exists()) or (
            a_file and not factory_like):
        resolve_artifact(p)  # raises, naming the artifacts inside p, or one beside it, if there are any
    return False


def _out_folder(path: Path, flag: str) -> None:
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {path} is a file; pass a folder to write into.")
    if (path / MANIFEST).is_file():  # `-o out/x.edge3d` for `-o out` nested a second artifact inside the first
        raise ValueError(f"{flag} {path} is an artifact folder; pass the folder to write into, such as "
                         f"{path.parent}.")


def _load(model: str, classes: int | None, size: str | None, width: float | None, head: str | None,
          checkpoint: Path | None = None, channels: int | None = None, labelled: int | None = None):
    """The model, its frame size (an int, or (height, width)) and its channels per frame; ``labelled``
    is the number of --labels names, the class count where --classes is left out and the model takes one."""
    from .models import build_model, check_channels, frame_channels, load_checkpoint

    asked = frame_size_option(size)
    check_channels(channels)  # flags first: a typo should not wait for the model to build
    m = build_model(model, num_classes=classes, frame_size=asked, width=width, head=head, labelled=labelled)
    if checkpoint is not None:
        load_checkpoint(m, checkpoint, model)
    frame_size = asked or getattr(m, "frame_size", None) or 112
    return m, frame_size, frame_channels(m, channels)


# --------------------------------------------------------------------------- zoo
@app.command(cls=OnceCommand)
@friendly
def zoo() -> None:
    """List the model zoo."""
    from . import zoo as z

    # At 80 columns (CI logs, a Jetson console) rich would cut the paper short with an ellipsis:
    # names and numbers stay whole, the rest wraps. The defaults are shown as the flags that change
    # them (the factory's own arguments, such as depth, are not options).
    table = Table(title="edge3d model zoo", show_lines=True,
                  caption="--size defaults to 112 (48 for the trained gesture models), --width to 1")
    table.add_column("name", no_wrap=True)
    table.add_column("model", overflow="fold")
    table.add_column("paper")
    table.add_column("--head", overflow="fold")
    table.add_column("--classes", no_wrap=True)
    for name in z.names():
        e = z.ZOO[name]
        classes = str(e.defaults["num_classes"]) if "num_classes" in e.defaults else "trained"
        table.add_row(name, e.summary, z.PAPERS.get(e.paper, e.paper), ", ".join(e.heads), classes)
    console.print(table)


def _refuse_model_flags(target: str, flags: list[tuple[str, Any]], whose: str = "",
                        fix: str = "pass the model instead") -> None:
    """Options that build a model, given with an artifact, which is built already: they were ignored."""
    given = [flag for flag, v in flags if v is not None and v is not False]
    if given:
        raise ValueError(f"{target} is an exported artifact{whose}; {given[0]} applies to a model: drop it, or {fix}.")


# --------------------------------------------------------------------------- inspect
@app.command(cls=OnceCommand)
@friendly
def inspect(
    target: Annotated[str, typer.Argument(help="Zoo name, package.module:factory (or path/to/file.py:factory), an artifact folder, or an "
                                          "ONNX file written by `edge3d export` (its manifest is embedded).")],
    classes: Classes = None, size: Size = None, width: Width = None, head: Head = None, channels: Channels = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
) -> None:
    """Parameters, MACs per frame and every state tensor of a model or an exported artifact."""
    if _is_artifact(target):
        from .runtime.manifest import DTYPE_BYTES, load_manifest, state_bytes

        _refuse_model_flags(target, [("--classes", classes), ("--size", size), ("--width", width), ("--head", head),
                                     ("--channels", channels)])

        p = Path(target)
        if p.suffix == ".onnx" and not (p.parent / MANIFEST).is_file():
            from .runtime.backend.onnxrt import embedded_manifest

            m = embedded_manifest(p)  # a bare .onnx copied out of its artifact folder
        else:
            m = load_manifest(target)
        m.pop("_folder", None)
        if as_json:
            print(json.dumps(m, indent=2))
            return
        model_entry = m.get("model") or {}
        check = model_entry.get("step_check")
        f, per_frame = m["frame"], m["output"]["shape"][1:]
        fit = f.get("fit", "stretch")
        color = f.get("color", "RGB")
        order = ": RGB frames are reversed for the model" if color == "BGR" else ""
        rows = [("frame", f"{f['channels']}×{f['height']}×{f['width']} ({color}{order}), fit {fit}: {_fit_text(fit)}"),
                ("normalisation", "(pixel / 255 - mean) / std, mean " + ", ".join(f"{v:g}" for v in f.get("mean", []))
                 + "; std " + ", ".join(f"{v:g}" for v in f.get("std", []))),
                ("frame rate", _rate_text(f.get("fps"))),
                ("output per frame", f"{'×'.join(map(str, per_frame))} map (a class per position)"
                 if output_map(m) else f"{math.prod(per_frame)} classes, {_class_names_text(m)}")]
        if "step_check" in model_entry:  # artifacts from before the check: no row
            rows.append((f"step check, {check['frames']} random frames", _step_check_text(check)) if check
                        else ("step check", "not checked (--no-verify)"))
        _print_report(m["name"], m["params"], m["macs_per_frame"], m["state_bytes"], m["input_history_bytes"],
                      m["states"], rows)
        prec = Table(title="precisions")
        for col in ("profile", "file", "cache / stream", "weights"):
            prec.add_column(col)
        for name, p in m["precisions"].items():
            files = p.get("files") or [p["file"]]  # a multi-rate artifact: a graph per stage, weights of all
            buffers = p.get("buffer_dtypes") or {}  # between stages: float16 in FP16, else as exported
            cache = sum(state_bytes(m, p.get("state_dtypes")).values()) + sum(
                int(b["bytes"]) * DTYPE_BYTES[buffers.get(b["name"], b["dtype"])] // DTYPE_BYTES[b["dtype"]]
                for b in m.get("buffers", []))
            prec.add_row(name, ", ".join(files), format_bytes(cache),
                         format_bytes(p["weight_bytes"]) if "weight_bytes" in p else "-")
        console.print(prec)
        _print_stages(m.get("stages", []), m.get("buffers", []))
        return
    from .accounting import inspect as account

    model, frame_size, frame_channels = _load(target, classes, size, width, head, channels=channels)
    report = account(model, frame_size, frame_channels)
    if as_json:
        print(json.dumps(report, indent=2))
        return
    _print_report(target, report["params"], report["macs_per_frame"], report["state_bytes"],
                  report["input_history_bytes"], report["states"])
    _print_stages(report.get("stages", []), report.get("buffers", []))


def _print_stages(stages: list[dict], buffers: list[dict]) -> None:
    """Multi-rate models: each stage's rate and I/O, and the buffers between stages."""
    if not stages:
        return
    table = Table(title="stages (multi-rate)")
    for col in ("stage", "runs every", "inputs", "outputs", "states"):
        table.add_column(col)
    for st in stages:
        names = [i["name"] if isinstance(i, dict) else i for i in st["inputs"]]
        outs = [o["name"] if isinstance(o, dict) else o for o in st["outputs"]]
        table.add_row(str(st["index"]), "frame" if st["rate"] == 1 else f"{st['rate']} frames", ", ".join(names), ", ".join(outs),
                      str(len(st["states"])))
    console.print(table)
    if buffers:
        bt = Table(title="buffers between stages (per stream)")
        for col in ("buffer", "stage", "frames", "shape", "bytes"):
            bt.add_column(col, justify="right" if col == "bytes" else "left")
        for b in buffers:
            shape = [d for d in b["shape"] if d != "N"]
            bt.add_row(b["name"], f"{b['from_stage']} → {b['to_stage']}", str(b["stride"]),
                       "×".join(map(str, shape)), f"{b['bytes']:,}")
        console.print(bt)


def _print_report(name: str, params: int, macs: int, state: int, history: int, states: list[dict],
                  rows: Sequence[tuple[str, str]] = ()) -> None:
    summary = Table(title=f"{name}", show_header=False)
    summary.add_row("parameters", f"{params / 1e6:.2f} M")
    summary.add_row("MACs per frame", f"{macs / 1e6:.1f} M")
    summary.add_row("state (intermediate caches)", format_bytes(state))
    summary.add_row("input-frame history", format_bytes(history))
    for row in rows:  # an artifact's frame, output and step check
        summary.add_row(*row)
    console.print(summary)
    if not states:  # an empty table would read as a display fault
        console.print("states (per stream): none; the model has no temporal layer, so each frame is predicted "
                      "on its own.")
        return
    table = Table(title="states (per stream)")
    for col in ("name", "shape", "dtype", "kind", "bytes"):
        table.add_column(col, justify="right" if col == "bytes" else "left")
    for s in states:
        shape = [d for d in s["shape"] if d != "N"]
        kind = s["kind"] + (" (input history)" if s.get("input_history") else "")
        table.add_row(s["name"], "×".join(map(str, shape)), s["dtype"], kind, f"{s['bytes']:,}")
    console.print(table)


# --------------------------------------------------------------------------- export
def _stream_counts(csv: str | None) -> list[int]:
    try:
        return list(dict.fromkeys(int(s) for s in split_names(csv)))  # 1,1 measured the same point twice
    except ValueError:
        raise ValueError(f"--streams {csv!r} must be comma-separated integers, e.g. 1,2,4,8.") from None


def _silence_stdout() -> None:
    """After a broken pipe, point stdout at /dev/null so that Python's flush at exit does not
    print a BrokenPipeError of its own (the recipe in Python's signal module documentation)."""
    with contextlib.suppress(OSError, ValueError, AttributeError):  # a test runner's stdout has no fd
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _one_source(values: list[str] | None, flag: str, what: str) -> str | None:
    """The one source a command reads. Click keeps the last of a repeated option, so two videos given
    as two flags would have been read as the second alone, without a word."""
    if values and len(values) > 1:
        raise ValueError(f"{flag} was given {len(values)} times, and {what} reads one source; put the videos (or "
                         "frame folders) in one folder and pass that folder.")
    return values[0] if values else None


def _output_file(path: Path | None, flag: str) -> None:
    """Fail before the work (a minute of benchmark, a whole video), not after it, when its output
    file has no folder to go into; other OSErrors on writing are `friendly`'s one sentence."""
    if path is not None and path.is_dir():
        raise ValueError(f"cannot write {flag} {path}: it is a folder; pass a file path, e.g. "
                         f"{path / ('preds.jsonl' if flag == '--output' else 'bench.json')}.")
    if path is not None and not path.parent.is_dir():
        raise ValueError(f"cannot write {flag} {path}: {path.parent} is not a folder; create it or pick "
                         "another path.")


@app.command(cls=OnceCommand)
@friendly
def export(
    model: Annotated[str, typer.Argument(help="Zoo name, package.module:factory or path/to/file.py:factory, or an artifact folder to "
                                               "change in place (--profile, --labels, --fit, --color, --mean, --std, --fps).")],
    out: Annotated[Path | None, typer.Option("-o", "--out", help="Folder to write <name>.edge3d/ into.",
                                             show_default="out")] = None,
    checkpoint: Annotated[Path | None, typer.Option("--checkpoint", help="A state_dict file to load.")] = None,
    classes: Classes = None, size: Size = None, width: Width = None, head: Head = None, channels: Channels = None,
    name: Annotated[str | None, typer.Option("--name", help="Artifact name (default: the model name).")] = None,
    labels: Annotated[Path | None, typer.Option(
        "--labels", help="Class names, in output order: one per line, UCF101's classInd.txt (1 ApplyEyeMakeup), "
                         "a CSV of id,name, or JSON (a list, or name -> index). Sets --classes when that is left "
                         "out.")] = None,
    fit: Annotated[str | None, typer.Option(
        "--fit", help="How a camera frame of another aspect ratio becomes the model's frame: stretch (resize it "
                      "whole), crop (its centre, of the model's aspect ratio, as models trained on centre crops saw "
                      "them) or crop:F (the centre F of that: crop:0.875 for a short side resized to 256, then 224 "
                      "cropped). Default: the model's frame_fit attribute, else stretch.")] = None,
    color: Annotated[str | None, typer.Option(
        "--color", help="The channel order a three-channel model was trained on: rgb, or bgr for frames read with "
                        "OpenCV and never converted (the runtime still takes RGB frames and reverses them). "
                        "Default: the model's frame_color attribute, else rgb.")] = None,
    mean: Annotated[str | None, typer.Option(
        "--mean", help="The per-channel mean the model was trained with, on the 0-1 scale, comma separated "
                       "(0.485,0.456,0.406 for ImageNet's), or one value for every channel: frames are fed as "
                       "(pixel / 255 - mean) / std. Default: the model's frame_mean attribute, else 0.45.")] = None,
    std: Annotated[str | None, typer.Option(
        "--std", help="The per-channel std to go with --mean (0.229,0.224,0.225 for ImageNet's). Default: the "
                      "model's frame_std attribute, else 0.225.")] = None,
    fps: Annotated[str | None, typer.Option(
        "--fps", help="The frame rate the model was trained at (every 5th frame of 30 fps video: 6): of a source "
                      "that sends more, run, compare, calibration and the camera app take only the frames nearest "
                      "that rate. source steps every frame the source gives. Default: the model's frame_fps "
                      "attribute, else source.")] = None,
    no_lower: Annotated[bool, typer.Option("--no-lower", help="Keep causal convs as Conv3d (for benchmarks).")] = False,
    no_verify: Annotated[bool, typer.Option(
        "--no-verify", help="Skip streaming a random clip through the step and comparing it with the model's clip "
                            "forward (the check that refuses forward code mixing frames outside edge3d.nn).")] = False,
    profile: Annotated[str, typer.Option("--profile", help="Precisions to build, comma separated: fp32,fp16,int8,...")] = "fp32",
    calib_sources: Annotated[list[str] | None, typer.Option("--calib-source", metavar="<str>", help="Frames for INT8 calibration: a video, a folder of clips (each gives an "
                                                 "equal share), or synthetic[:SEED] (the default).")] = None,
    calib_frames: Annotated[int | None, typer.Option("--calib-frames", help="Calibration frames.")] = None,
    calib_images_fps: Annotated[float | None, typer.Option(
        "--calib-images-fps", help="The frame rate the --calib-source's folders of images were extracted at, which "
                                   "images do not carry: they are then paced to the model's --fps as videos are.")] = None,
    target: Annotated[str, typer.Option("--target", help="onnx, or tensorrt to also build engines.")] = "onnx",
    streams: Annotated[int | None, typer.Option(
        "--streams", help="Max streams (batch) of the TensorRT engines and the Triton repository (default 8).")] = None,
    dla: Annotated[int | None, typer.Option("--dla", help="TensorRT DLA core (Jetson).")] = None,
    triton_repo: Annotated[Path | None, typer.Option("--triton-repo", help="Also write a Triton model repository.")] = None,
) -> None:
    """Export MODEL to an artifact folder: manifest.json + model.<profile>.onnx (+ engines).

    Given an artifact folder instead, change it in place: add the --profile precisions (keeping the
    others), name its classes with --labels, or set its --fit, --color, --mean, --std or --fps, without
    exporting it again.
    """
    from .exporters.onnx import check_artifact_name, export_artifact
    from .exporters.tensorrt import check_build_flags

    model_path = Path(model).expanduser()
    in_place = (model_path / MANIFEST).is_file()
    if not in_place and _is_artifact(model):  # a folder that holds artifacts has raised, naming them
        raise ValueError(f"{model} is a file of an artifact; pass the artifact folder to add precisions to it.")
    if in_place:
        _refuse_model_flags(model, [("-o", out), ("--checkpoint", checkpoint), ("--classes", classes),
                                    ("--size", size), ("--width", width), ("--head", head), ("--name", name),
                                    ("--channels", channels), ("--no-lower", no_lower), ("--no-verify", no_verify)],
                            ", whose precisions are added in place", "export the model again")
    out = out or Path("out")
    # Every flag is checked before the FP32 artifact is written, so a typo leaves the folder as it was.
    calib_source = _one_source(calib_sources, "--calib-source", "calibration")
    if fit is not None:
        from .runtime.preprocess import check_fit

        check_fit(fit, "--fit")
    if color is not None:
        from .runtime.preprocess import check_color

        check_color(color, 3, "--color")  # the channel count is checked with the model
    means, stds = _floats(mean, "--mean"), _floats(std, "--std")  # counted against the channels with the model
    if fps is not None or calib_images_fps is not None:
        from .runtime.rate import check_fps

        check_fps(fps, "--fps")
        check_fps(calib_images_fps, "--calib-images-fps", images=True)
    class_names = None
    if labels is not None:
        from .labels import read_labels

        class_names = read_labels(labels)
        if classes is not None and classes != len(class_names):
            raise ValueError(f"--labels {labels} names {len(class_names)} classes and --classes is {classes}; drop "
                             "--classes (the labels set it) or fix the file.")
    _out_folder(out, "-o")
    if triton_repo is not None:
        _out_folder(triton_repo, "--triton-repo")
    if name is not None:  # the default (a zoo name or a factory's) is checked with the model
        check_artifact_name(name)
    if target not in ("onnx", "tensorrt"):
        raise ValueError(f"unknown --target {target!r}; choose onnx or tensorrt.")
    _applies("--streams", streams, target == "tensorrt" or triton_repo is not None,
             "sets the batch of TensorRT engines and the Triton repository; add --target tensorrt or --triton-repo")
    _applies("--dla", dla, target == "tensorrt", "is a TensorRT option; add --target tensorrt")
    streams = DEFAULT_MAX_STREAMS if streams is None else streams
    check_build_flags(streams, dla)
    profiles = split_names(profile) or ["fp32"]
    extra = [p for p in profiles if p != "fp32"]
    frame_flags = fit is not None or color is not None or means is not None or stds is not None or fps is not None
    if in_place and not (extra or target == "tensorrt" or triton_repo is not None or labels is not None
                         or frame_flags):
        raise ValueError(f"{model} is already exported; name the precisions to add with --profile, "
                         "e.g. --profile int8 (or its classes with --labels FILE, its frame fit with --fit, its "
                         "channel order with --color, its normalisation with --mean and --std, its frame rate with --fps).")
    resolved = []
    if extra:
        from .exporters.precision import check_calib_frames, resolve_profiles

        check_calib_frames(calib_frames)
        resolved = resolve_profiles(extra)
    int8 = any(p.kind == "int8" for p in resolved)
    for flag, value in (("--calib-source", calib_source), ("--calib-frames", calib_frames),
                        ("--calib-images-fps", calib_images_fps)):
        _applies(flag, value, int8, "calibrates INT8 profiles only; add one, e.g. --profile int8")
    if int8:
        from .exporters.calibration import check_calib_source, default_calib_source
        from .exporters.precision import check_quantiser

        check_quantiser()  # before the model is exported, not after
        calib_source = calib_source or default_calib_source()
        check_calib_source(calib_source)  # and on a source without frames
    wants = [w for w, on in ((f"--profile {','.join(extra)}", extra), ("--target tensorrt", target == "tensorrt"),
                             ("--triton-repo", triton_repo is not None)) if on]
    one_graph = [w for w in wants if not w.startswith("--profile")]  # a multi-rate artifact takes precisions too
    if in_place:
        from .runtime.manifest import load_manifest, require_single_graph

        manifest = load_manifest(model_path)  # a corrupt artifact fails here
        if one_graph:
            require_single_graph(manifest, " with ".join(one_graph))
        _calib_paced(calib_images_fps, manifest["frame"].get("fps") if fps is None else fps, str(model_path))
        if class_names is not None:  # first, so that the precisions and repository written next carry them
            from .exporters.onnx import set_class_names

            with _disk_full(str(model_path), "its graphs were left as they were"), _labels_named(labels, model, ""):
                set_class_names(model_path, class_names)
            console.print(f"named the {len(class_names)} classes of [bold]{escape(str(model_path))}[/] from "
                          f"{escape(str(labels))} (every graph of every precision)")
        if frame_flags:
            from .exporters.onnx import set_frame

            with _disk_full(str(model_path), "its graphs were left as they were"), \
                    _flags_named(color=color, mean=means, std=stds), warnings.catch_warnings(record=True) as said:
                warnings.simplefilter("always")
                frame = set_frame(model_path, fit=fit, color=color, mean=means, std=stds, fps=fps)
            changed = ([f"frame fit {fit} ({_fit_text(fit)})"] if fit is not None
                       else []) + ([f"channel order {color.upper()}"] if color is not None else []) + \
                ([f"normalisation mean {frame['mean']}, std {frame['std']}"] if means or stds else []) + \
                ([f"frame rate {frame['fps']:g} fps" if frame.get("fps") else "every frame of a source stepped, "
                  "whatever its rate"] if fps is not None else [])
            console.print(f"set in [bold]{escape(str(model_path))}[/] (every graph of every precision): "
                          f"{escape('; '.join(changed))}")
            for w in said:  # an INT8 precision calibrated on frames prepared the old way
                console.print(f"  [yellow]{escape(str(w.message))}[/]", soft_wrap=True)
        if wants:
            with _disk_full(_written_to(model_path, triton_repo), "the precisions written before it are kept"):
                _finish_artifact(model_path, profiles, extra, calib_source, calib_frames, target, streams, dla,
                                 triton_repo, calib_images_fps)
        _say_abandoned(model_path.parent, model_path)
        return
    m, frame_size, frame_channels = _load(model, classes, size, width, head, checkpoint, channels,
                                          labelled=len(class_names) if class_names is not None else None)
    if one_graph:  # before the FP32 stages are written, not after
        from .staged import require_single_rate

        require_single_rate(m, model, " with ".join(one_graph))
    from .convert import unwrap

    _calib_paced(calib_images_fps, getattr(unwrap(m), "frame_fps", None) if fps is None else fps, model)
    if any(p.kind == "int8" for p in resolved):  # a multi-rate model's slowest stage needs a feed, checked now
        from .staged import is_multirate

        if is_multirate(m):
            from .convert import to_step
            from .exporters.onnx import frame_hw
            from .exporters.precision import check_calib_covers_stages

            period = to_step(m, (frame_channels, *frame_hw(frame_size))).periods[-1]
            check_calib_covers_stages(model, period, resolved, calib_frames)
    info = {"name": model, "options": {k: v for k, v in
                                       {"num_classes": classes, "frame_size": frame_size_option(size),
                                        "width": width, "head": head, "channels": channels}.items()
                                       if v is not None},
            "checkpoint": str(checkpoint) if checkpoint else None, **({"labels": str(labels)} if labels else {})}
    art_name = name or model.split(":")[-1]
    # by the names the graphs get: fp32 always, a profile file by the name inside it
    dropped, earlier = _not_carried_over(out / f"{art_name}.edge3d", ["fp32", *(p.name for p in resolved)])
    what = f"exporting {model} ({frame_channels}×{size_text(frame_size)}) to ONNX"
    with console.status(f"{what}...") as status, _disk_full(str(out), "nothing was written"), \
            _labels_named(labels, model), _flags_named(color=color, mean=means, std=stds):
        # what --mean, --std, --fit, --color, --fps and --labels leave out, export_artifact takes from the
        # model's frame_mean, frame_std, frame_fit, frame_color, frame_fps and class_names itself
        path = export_artifact(m, out, art_name, frame_size=frame_size, channels=frame_channels, lower=not no_lower,
                               model_info=info, verify=not no_verify, classes=class_names, fit=fit, color=color, fps=fps,
                               mean=_per_channel(means, frame_channels), std=_per_channel(stds, frame_channels),
                               progress=lambda phase: status.update(f"{what}: {escape(phase)}..."))
    console.print(f"wrote [bold]{escape(str(path))}[/] (fp32)")
    check = json.loads((path / MANIFEST).read_text())["model"].get("step_check")
    if check:
        console.print(f"  verified on {check['frames']} random frames: {_step_check_text(check)}")
    else:
        console.print("  [yellow]not verified against the clip forward or in ONNX Runtime (--no-verify)[/]")
    if earlier is not None and not _same_model(earlier, model):
        console.print(f"  [yellow]replaced the artifact there, an export of {escape(earlier)}, not {escape(model)}"
                      + (f" (its {', '.join(dropped)} too)" if dropped else "")
                      + "; to keep two models side by side, give each its own --name[/]")
    elif dropped:
        console.print(f"  [yellow]replaced the artifact there, without its {', '.join(dropped)} (made from the "
                      f"earlier weights); add {'it' if len(dropped) == 1 else 'them'} again with `edge3d export "
                      f"{escape(shlex.quote(str(path)))} --profile {','.join(dropped)}`[/]")
    with _disk_full(_written_to(path, triton_repo), "the fp32 artifact and the precisions written before it are kept"):
        _finish_artifact(path, profiles, extra, calib_source, calib_frames, target, streams, dla, triton_repo,
                         calib_images_fps)
    _say_abandoned(path.parent, path)


def _say_abandoned(*folders: Path) -> None:
    """Name the staging folders that exports killed outright (out of memory, a power cut) left in these
    folders (beside an artifact, inside it, in a Triton repository): hidden, up to a graph each, and
    removed by nobody."""
    from .runtime.manifest import abandoned_staging

    left = [d for folder in folders for d in abandoned_staging(folder)]
    if left:
        size = sum(f.stat().st_size for d in left for f in d.rglob("*") if f.is_file())
        console.print(f"  [yellow]{len(left)} hidden folder(s) of {size / 1e6:.1f} MB were left by an export that was "
                      f"killed (out of memory, say); remove them: rm -r "
                      f"{escape(' '.join(shlex.quote(str(d)) for d in left))}[/]", soft_wrap=True)


@contextlib.contextmanager
def _disk_full(where: str, kept: str) -> Any:
    """A full disk while writing an artifact, named with the folder: friendly's path-less "writing a
    file failed" left the user to guess which of -o, the temp folder or the source it was."""
    import errno

    try:
        yield
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        raise ValueError(f"{where} ran out of disk space while export wrote to it ({kept}); free space there or "
                         "export to another disk.") from e


def _written_to(artifact: Path, triton_repo: Path | None) -> str:
    return f"{artifact} (or {triton_repo})" if triton_repo is not None else str(artifact)


def _not_carried_over(folder: Path, profiles: list[str]) -> tuple[list[str], str | None]:
    """The precisions of an artifact that a new export will replace, and not write again, and the model
    that artifact was exported from.

    A re-export after retraining replaces the artifact whole, so the INT8 graph calibrated on the
    old weights goes; saying so beats the user finding out from `run --profile int8` on a device. The
    model is named because two files' factories both called `build` give one artifact name, and the
    second export replaced the first model's artifact with only "made from the earlier weights" said.
    """
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        old = manifest["precisions"]
    except (OSError, ValueError, KeyError, TypeError):  # none there, or not one we can read: nothing to say
        return [], None
    model = manifest.get("model")
    name = model.get("name") if isinstance(model, dict) else None
    return ([p for p in old if p not in profiles] if isinstance(old, dict) else []), name if isinstance(name, str) else None


@contextlib.contextmanager
def _labels_named(labels: Path | None, model: str, fix: str = " (--classes sets the count where the model takes "
                  "it)") -> Iterator[None]:
    """A --labels file of the wrong length is named, with what to change: the export only knew "names"."""
    from .exporters.onnx import ClassCountError

    try:
        yield
    except ClassCountError as e:
        if labels is None:
            raise
        raise ValueError(f"--labels {labels} names {e.given} classes and {model} has {e.outputs}; give one name per "
                         f"class, in output order{fix}.") from e


def _class_names_text(manifest: dict[str, Any], shown: int = 3) -> str:
    """Whether the classes are named, and the first few names: unnamed, `run` prints only indices."""
    names = manifest["output"].get("classes")
    if not names:
        return "unnamed (export --labels FILE names them)"
    more = f", ... {names[-1]}" if len(names) > shown + 1 else "".join(f", {n}" for n in names[shown:])
    return "named " + ", ".join(names[:shown]) + more


def _same_model(a: str, b: str) -> bool:
    """Two MODEL arguments naming one model: `./net.py:build` and `net.py:build` are the same file."""
    if a == b:
        return True
    (fa, _, ka), (fb, _, kb) = a.rpartition(":"), b.rpartition(":")
    if ka != kb or not (fa.endswith(".py") and fb.endswith(".py")):
        return False
    return Path(fa).resolve() == Path(fb).resolve()  # from the folder typed in, as the earlier export likely was


DEFAULT_MAX_STREAMS = 8  # export's --streams, when it applies


def _applies(flag: str, value: Any, applies: bool, why: str) -> None:
    """A flag given where it does nothing is an error: `--dla 0` without --target tensorrt was ignored."""
    if value is not None and not applies:
        raise ValueError(f"{flag} {why}, or drop {flag}.")


def _floats(text: str | None, flag: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.replace(" ", ",").split(",") if v)
    except ValueError:
        raise ValueError(f"{flag} {text!r} is not a comma-separated list of numbers; give one per channel, such as "
                         f"{flag} {'0.485,0.456,0.406' if flag == '--mean' else '0.229,0.224,0.225'}.") from None


def _per_channel(values: tuple[float, ...] | None, channels: int) -> tuple[float, ...] | None:
    """One --mean or --std value stands for every channel."""
    return values * channels if values is not None and len(values) == 1 else values


@contextlib.contextmanager
def _flags_named(**given: object) -> Any:
    """The frame checks name a value as the frame's mean, std or color, not as the flag that gave it:
    each given flag's name replaces them (a model's own frame_mean, with no --mean given, keeps its name)."""
    try:
        yield
    except ValueError as e:
        text = str(e)
        for word, value in given.items():
            if value is not None and text.startswith(f"frame {word} "):
                raise ValueError(f"--{word} " + text[len(f"frame {word} "):]) from None
        raise


def _rate_text(fps: float | None) -> str:
    return ("every frame the source gives" if fps is None else
            f"{fps:g} fps: of a faster source, only the frames nearest that rate are stepped")


def _fit_text(fit: str) -> str:
    from .runtime.preprocess import parse_fit

    fraction = parse_fit(fit)
    if fraction is None or fraction == 1:
        return "a frame of another aspect ratio is " + ("resized whole, squeezed" if fraction is None
                                                         else "cut to its centre, then resized")
    return f"each frame is cut to the centre {100 * fraction:g}% of its largest region of the model's aspect ratio, " \
           "then resized"


def _step_check_text(check: dict[str, Any]) -> str:
    """The manifest's step check in a few words, the same after `export` and in `inspect`."""
    onnx_err = check.get("onnx_max_error_relative")
    return (f"step = clip ±{check['max_error'] / check['scale']:.1e}"
            + (f", ONNX = step ±{onnx_err:.1e}" if onnx_err is not None else ""))


def _calib_paced(images_fps: float | None, fps: Any, what: str) -> None:
    """Refuse --calib-images-fps before anything is written where the model will have no frame rate (its
    --fps, or the one it has) to pace the images to."""
    from .runtime.rate import check_fps, check_images_fps

    check_images_fps(images_fps, {"frame": {"fps": check_fps(fps, "--fps")}}, what, "--calib-images-fps")


def _finish_artifact(path: Path, profiles: list[str], extra: list[str], calib_source: str | None,
                     calib_frames: int | None, target: str, streams: int, dla: int | None,
                     triton_repo: Path | None, calib_images_fps: float | None = None) -> None:
    """The precisions, engines and Triton repository an export asks for, into the artifact at ``path``."""
    if extra:
        from .exporters.precision import add_precisions

        add_precisions(path, extra, calib_source=calib_source, calib_frames=calib_frames, console=console,
                       calib_images_fps=calib_images_fps)
    if target == "tensorrt":
        from .exporters.tensorrt import build_or_script

        build_or_script(path, profiles, streams=streams, dla=dla, console=console)
    if triton_repo is not None:
        from .exporters.triton import write_repository

        repo = write_repository(path, triton_repo, max_batch=streams, console=console)
        console.print(f"wrote Triton model repository [bold]{escape(str(repo))}[/]")


# --------------------------------------------------------------------------- run
@app.command(cls=OnceCommand)
@friendly
def run(
    artifact: Annotated[Path, typer.Argument(help="An artifact folder written by `edge3d export`.")],
    source: Annotated[list[str] | None, typer.Option(
        "--source", metavar="<str>",
        help="FILE.mp4 | FOLDER | camera:INDEX | csi:SENSOR (a Jetson CSI camera) | '... ! appsink' (a GStreamer "
             "pipeline) | rtsp://... (a stream URL) | synthetic[:SEED]. Give it once per camera for several: one "
             "stream each, all stepped in one batched call.")] = None,
    frames: Annotated[int | None, typer.Option(
        "--frames", help="Stop after N frames of each source (default: synthetic 300, else all).")] = None,
    output: Annotated[Path | None, typer.Option(
        "--output", help="Write one JSON line per frame here; - writes them to stdout, and the live line and "
                         "summary to stderr, for a pipe.")] = None,
    profile: Annotated[str | None, typer.Option(
        "--profile", help="Precision to run (default: that of the .onnx file given, else fp32).")] = None,
    backend: Annotated[str, typer.Option("--backend", help="auto | onnxruntime | tensorrt")] = "auto",
    quiet: Annotated[bool, typer.Option("--quiet", help="No live line, summary only.")] = False,
    threads: Annotated[int | None, typer.Option(
        "--threads", help="ONNX Runtime intra-op threads (default: one per core); fewer leave cores to the "
                          "video decoder or other processes.")] = None,
    top_k: Annotated[int, typer.Option(
        "--top-k", help="Also write each frame's K most likely classes (top_k in the JSON lines) and, on a "
                        "labelled source, the top-K accuracy, as Kinetics and UCF101 results quote top-5.")] = 1,
    images_fps: Annotated[float | None, typer.Option(
        "--images-fps", help="The frame rate a folder of images was extracted at, which images do not carry (a "
                             "dataset shipped as frames: 30, say): its frames are then taken at the artifact's "
                             "--fps as a video's are. Needs an artifact with a frame rate.")] = None,
) -> None:
    """Stream a video, camera or the synthetic gesture source through an artifact."""
    import numpy as np
    from rich.live import Live

    from .runtime import Session
    from .runtime.rate import check_images_fps
    from .signals import Terminated, sigterm_as_interrupt
    from .sources import (
        KeepingUp,
        SourceLost,
        clip_class,
        frame_rounds,
        labels_apply,
        open_streams,
        redact,
        source_frame_size,
    )

    specs = source or ["synthetic"]
    many = len(specs) > 1  # several cameras: stream i is the i-th --source, all stepped in one call
    to_stdout = output is not None and str(output) == "-"  # `--output - | jq ...`: stdout is JSON lines only
    if not to_stdout:
        _output_file(output, "--output")
    if frames is not None and frames < 1:
        raise ValueError(f"--frames must be at least 1, got {frames}.")
    twice = next((s for s in specs if specs.count(s) > 1 and s.startswith(("camera:", "csi:"))), None)
    if twice is not None:  # the second open fails as "will not open", on a camera that just did
        raise ValueError(f"--source {twice} is given {specs.count(twice)} times, and a camera device feeds one "
                         "reader; give each camera once.")
    shown = err_console if to_stdout else console
    if isinstance(top_k, bool) or top_k < 1:
        raise ValueError(f"--top-k must be at least 1, got {top_k}.")
    session = Session(artifact, profile=profile, backend=backend, threads=threads, streams=len(specs))
    # a segmentation or heatmap model's map has a class per position: no top class, and the source's
    # per-frame labels cannot score it
    is_map = output_map(session.manifest) is not None
    classes_out = int(np.prod(session.manifest["output"]["shape"][1:]))
    if top_k > 1 and (is_map or top_k > classes_out):
        session.close()
        raise ValueError("--top-k ranks the classes of a class vector, and this artifact's output is a map (a class "
                         "at every position); drop --top-k." if is_map else
                         f"--top-k {top_k} asks for more classes than the artifact's {classes_out}; pass at most "
                         f"--top-k {classes_out}.")
    staged = hasattr(session, "stage_summary")  # a multi-rate artifact: ms per stage in the summary
    size = session.manifest["frame"]["height"]
    model_fps = session.manifest["frame"].get("fps")  # the rate the model was trained at: a faster source is paced
    # the synthetic source never ends: 300 frames unless told otherwise
    limits = [frames if frames is not None else 300 if s.startswith("synthetic") else None for s in specs]
    try:
        check_images_fps(images_fps, session.manifest, artifact)
        # a folder of one folder per class labels its clips with the classes named by those folders;
        # every source is opened (and a bad one named) before the first frame
        clips_of = [list(open_streams(s, frame_size=source_frame_size(s, size), classes=session.classes,
                                      fps=model_fps, images_fps=images_fps)) for s in specs]
    except BaseException:
        session.close()
        raise
    map_shape = "×".join(map(str, session.manifest["output"]["shape"][1:]))
    sink = sys.stdout if to_stdout else open(output, "w") if output else None
    n = nonfinite = 0
    counts = [0] * len(specs)  # frames per stream
    videos = [0] * len(specs)
    correct = [0] * len(specs)
    correct_k = [0] * len(specs)  # the label among the top K (--top-k)
    by_class: dict[int, list[int]] = {}  # label -> [frames right, frames], for the weakest classes
    labelled = [0] * len(specs)
    last_top: list[str | None] = [None] * len(specs)  # each stream's latest top class, for the live line
    clip_verdicts: dict[tuple[int, str], bool] = {}  # per labelled clip: whether its last prediction was its class
    whole: set[tuple[int, str]] = set()  # the clips played to their end
    unscored: set[str] = set()  # class folders whose names are not among the artifact's classes
    first_nonfinite: str | None = None
    unpredicted = 0  # frames a multi-rate model had no output for yet (each clip's first frames)
    call_ms: deque[float] = deque(maxlen=10000)  # the recent window, as Session.stats keeps: a camera runs for days
    interrupted = 0  # the exit code when stopped by a signal
    lost = ""  # why the run ended early: a camera gone, or --output no longer writable
    pace = KeepingUp(together=many)  # whether the run takes each camera's frames as fast as it sends them
    playing: list[Any] = [None] * len(specs)  # each stream's current clip (a camera's carries its frame rate)
    samplers: list[Any] = []  # each clip's choice of frames at the model's rate, for the summary

    def write_failed(e: OSError) -> str:
        return (f"writing --output {output} failed by frame {n} ({e.strerror or e}), so the run stopped there and "
                "the file lacks the last predictions; free space or pass --output on another disk.")

    def frames_of_every_video(i: int):
        # Each video of a folder is its own clip: it starts from the initial state, as in compare and
        # calibration, rather than from the last frames of the video before it.
        spec = specs[i]
        keep_labels = labels_apply(spec, session.manifest) and not is_map
        for k, (name, items) in enumerate(clips_of[i]):
            if k:
                session.reset(i if many else None)
            videos[i] += 1
            filed = clip_class(Path(spec), Path(name)) if name != spec else None
            playing[i] = items
            if (sampler := getattr(items, "sampler", None)) is not None:
                samplers.append(sampler)
            for j, (frame, label) in enumerate(items):
                if filed is not None and label is None:
                    unscored.add(filed)
                # the frame's index in its source, where frames the model's rate passes over are skipped
                yield (name if name != spec else None), getattr(items, "index", j), frame, \
                    (label if keep_labels else None)
            whole.add((i, name))  # played to its end: a clip cut short by --frames or Ctrl-C has no last frame

    def record(i: int, video: str | None, clip_frame: int, label: int | None, y: np.ndarray, predicted: bool,
               ms: float, fresh: bool | None) -> dict[str, Any]:
        """Score stream i's frame and return its JSON line."""
        nonlocal nonfinite, first_nonfinite, unpredicted
        ranked = session.top_k(y, top_k) if predicted and not is_map else []
        idx, cls, score = ranked[0] if ranked else (None, None, None)
        unpredicted += not predicted
        if predicted and not np.isfinite(y).all():
            nonfinite += 1
            if first_nonfinite is None:
                first_nonfinite = f"{counts[i]}" + (f" of stream {i}" if many else "")
        if label is not None and predicted:
            labelled[i] += 1
            correct[i] += int(idx == label)
            correct_k[i] += int(any(r[0] == label for r in ranked))
            tally = by_class.setdefault(label, [0, 0])
            tally[0] += int(idx == label)
            tally[1] += 1
            clip_verdicts[(i, video or specs[i])] = idx == label  # until the clip's last frame
        last_top[i] = (f"{map_shape} map" if is_map and predicted else
                       f"[bold]{escape(cls)}[/] ({score:.2f})" if predicted else None)
        rec: dict[str, Any] = {"stream": i} if many else {}
        if is_map:  # its largest and mean value: a glance at whether it is alive and finite
            rec.update({"frame": counts[i], "max": float(f"{y.max():.6g}") if predicted else None,
                        "mean": float(f"{y.mean():.6g}") if predicted else None, "ms": round(ms, 3)})
        else:
            rec.update({"frame": counts[i], "top": idx, "class": cls,
                        "score": None if score is None else round(score, 5), "ms": round(ms, 3)})
            if top_k > 1:  # most likely first, the top class included: [index, class, score] each
                rec["top_k"] = [[r[0], r[1], round(r[2], 5)] for r in ranked] if ranked else None
        if fresh is not None:  # multi-rate: whether this frame produced the output
            rec["fresh"] = fresh
        if video is not None:  # one of several clips: which, and the frame's place in it
            rec["video"], rec["clip_frame"] = video, clip_frame
        elif model_fps is not None:  # the source's frames the model's rate passed over are not counted in "frame"
            rec["source_frame"] = clip_frame
        if label is not None:
            rec["label"] = label
        return rec

    # a terminal redraws the live line in place; a log gets it as a plain line now and then
    plain_status = not quiet and not shown.is_terminal
    next_status = time.monotonic() + STATUS_EVERY_S
    gens = [frames_of_every_video(i) for i in range(len(specs))]
    try:
        with sigterm_as_interrupt(), Live(console=shown, refresh_per_second=8, transient=True) as live:
            for got in frame_rounds(gens, limits):
                t0 = time.perf_counter()
                if many:  # one batched call for every stream with a frame (a subset once some have ended)
                    ys = session.step_batch([item[2] for _, item in got],
                                            None if len(got) == len(specs) else [i for i, _ in got])
                else:
                    ys = session.step(got[0][1][2])[None]
                ms = (time.perf_counter() - t0) * 1e3  # resize and normalise included; stats time the graph
                call_ms.append(ms / len(got))
                for i, _ in got:
                    if (behind := pace.took(i, playing[i], time.monotonic())) is not None:
                        shown.print(f"[yellow]{escape(behind)}[/]")
                # a multi-rate model predicts nothing until a stream's slowest stage first runs: no class, no score
                ready = session.has_outputs
                fresh = session.fresh.tolist() if staged else [None] * len(got)  # per row of the call
                stop = False
                for (i, (video, clip_frame, _, label)), y, new in zip(got, ys, fresh, strict=True):
                    predicted = bool(ready[i])
                    rec = record(i, video, clip_frame, label, y, predicted, ms, new)
                    counts[i] += 1
                    n += 1
                    if sink and not stop:
                        try:
                            sink.write(json.dumps(json_safe(rec), allow_nan=False) + "\n")
                            if to_stdout:
                                sink.flush()  # a line per frame as it happens, not per 8 kB block
                        except BrokenPipeError:  # the reader has gone (`| head`): an end like --frames
                            _silence_stdout()
                            stop = True
                        except OSError as e:  # a full SD card on a camera that runs for days
                            lost = write_failed(e)  # this frame was stepped and scored
                            stop = True
                if stop:
                    break
                if not quiet and (n % 4 == 0 or n == len(got)):
                    s, p50 = session.stats.summary(), session.latency()["p50"]
                    if many:
                        tops = "  ".join(f"{i}: {last_top[i] or 'no output yet'}" for i in range(min(len(specs), 4)))
                        status = (f"{len(got)}/{len(specs)} streams  frames {n}  {s['fps']:.0f} fps  "
                                  f"{p50:.2f} ms/call  {tops}{'  ...' if len(specs) > 4 else ''}")
                    else:
                        status = (f"frame {n}  {s['fps']:.0f} fps  {p50:.2f} ms/frame  "
                                  f"cache {format_bytes(session.cache_bytes)}  "
                                  + (f"output: {last_top[0]}" if is_map and predicted
                                     else f"top: {last_top[0]}" if predicted else "no output yet"))
                    live.update(status)
                    if plain_status and time.monotonic() >= next_status:
                        shown.print(status, highlight=False)
                        next_status = time.monotonic() + STATUS_EVERY_S
    except KeyboardInterrupt as e:  # Ctrl-C (or SIGTERM) is how a camera run ends: the summary is still wanted
        interrupted = 143 if isinstance(e, Terminated) else 130
    except SourceLost as e:  # an unplugged camera: the summary, then the reason and exit code 1
        lost = str(e) + (f" The run stopped its other {len(specs) - 1} streams with it." if many else "")
    finally:
        for g in gens:
            g.close()  # lets go of each camera or video
        if sink and not to_stdout:
            try:
                sink.close()  # flushes: where a small run finds the disk full
            except OSError as e:
                lost = lost or write_failed(e)
        session.close()
    if n == 0:
        if interrupted:
            err_console.print("interrupted" if interrupted == 130 else "terminated")
            raise typer.Exit(interrupted)
        if many:
            raise ValueError("no source gave a frame; check the files, cameras or streams.")
        raise ValueError(f"source {redact(specs[0])!r} gave no frames; check the file, camera or stream.")
    s = session.stats.summary()
    stopped = {130: " (interrupted)", 143: " (terminated)"}.get(interrupted, "")
    table = Table(title=f"edge3d run: {artifact}{stopped}", show_header=False)
    clips = sum(videos)
    restarts = f"{clips} clips, each from the initial state" if clips > len(specs) else ""
    table.add_row("frames", f"{n} from {len(specs)} sources, stepped together" + (f"; {restarts}" if restarts else "")
                  if many else f"{n} from {restarts}" if restarts else str(n))
    per = "call" if many else "frame"
    lat = session.latency()  # a multi-rate model's over whole cycles of its stages, not over single frames
    table.add_row(f"model ms/{per}{' over whole cycles' if lat['cycles'] else ''} p50 / p95 / p99",
                  f"{lat['p50']:.2f} / {lat['p95']:.2f} / {lat['p99']:.2f}")
    table.add_row("model fps" + (" (all streams)" if many else ""), f"{s['fps']:.1f}")
    table.add_row("ms/frame with resize, p50 / p95",
                  " / ".join(f"{v:.2f}" for v in np.percentile(np.asarray(call_ms), [50, 95])))
    if is_map:
        table.add_row("output per frame", f"{map_shape} map, no top class")
    table.add_row("cache memory per stream", format_bytes(session.cache_bytes))
    table.add_row("backend / profile", f"{session.backend_name} / {session.profile}")
    from .runtime.preprocess import fit_note

    if fitted := fit_note(session.pre.sizes, session.manifest["frame"], artifact):
        table.add_row("frame fit", escape(fitted))
    from .runtime.rate import rate_note

    if paced := rate_note(samplers, model_fps):
        table.add_row("frame rate", escape(paced))
    for i, line in pace.rates().items():  # a camera: whether the run kept up with it
        table.add_row(f"{escape(pace.sources[i].name)} frame rate",
                      f"[yellow]{escape(line)}[/]" if i in pace.behind else escape(line))
    if staged:  # multi-rate artifact: ms per stage, bins used
        ss = session.stage_summary()
        for r in ss["stages"]:
            every = "every frame" if r["rate"] == 1 else f"every {r['rate']} frames"
            table.add_row(f"stage {r['stage']} ({every})", f"{r['ms_per_run']:.2f} ms/run, {r['runs']} runs"
                          if r["runs"] else f"not run: no clip reached {r['rate']} frames")
        if unpredicted:
            table.add_row("frames without an output yet", f"{unpredicted} (each clip's first "
                          f"{ss['stages'][-1]['rate'] - 1}, before the slowest stage first runs)")
        table.add_row("amortised ms/frame", f"{ss['amortised_ms_per_frame']:.2f}")
        table.add_row("buffers per stream", format_bytes(sum(ss["buffer_bytes"].values())))
        if "bins_used" in ss:
            b = ss["bins_used"]
            table.add_row("SGS bins used", f"mean {b['mean']:.2f} (min {b['min']}, max {b['max']}) over {b['chunks']} chunks")
    if nonfinite:  # e.g. a state overflowing float16: say it here, not only as nulls in the JSONL
        table.add_row("[bold red]outputs not finite[/]",
                      f"[bold red]{nonfinite} frames, from frame {first_nonfinite}; `edge3d compare` says which "
                      "state overflowed[/]")
    if many:  # which stream is which camera, as the JSON lines' "stream" numbers them
        for i, spec in enumerate(specs):
            acc = f", per-frame accuracy {100 * correct[i] / labelled[i]:.1f}%" if labelled[i] else ""
            table.add_row(f"stream {i}", f"{escape(redact(spec))}: {counts[i]} frames{acc}")
    if sum(labelled):
        table.add_row("per-frame accuracy", f"{100 * sum(correct) / sum(labelled):.1f}% of {sum(labelled)}")
        if top_k > 1:
            table.add_row(f"per-frame top-{top_k} accuracy", f"{100 * sum(correct_k) / sum(labelled):.1f}% of "
                          f"{sum(labelled)}")
        # where a dataset's accuracy goes: up to three classes it gets wrong most often (only classes with
        # frames wrong: "100% of 37" beside them named a class as weak that never missed)
        weakest = sorted(((c, rn) for c, rn in by_class.items() if rn[0] < rn[1]),
                         key=lambda kv: (kv[1][0] / kv[1][1], -kv[1][1]))[:3]
        if len(by_class) > 1 and weakest:
            table.add_row("weakest classes, per frame", ", ".join(
                f"{escape(session.class_name(c))} "
                f"{100 * right / n:.0f}% of {n}" for c, (right, n) in weakest))
    verdicts = [v for clip, v in clip_verdicts.items() if clip in whole]
    if clips > len(specs) and verdicts:  # a folder of one folder per class: the prediction each clip ends on
        table.add_row("per-clip accuracy (its last frame)",
                      f"{100 * sum(verdicts) / len(verdicts):.1f}% of {len(verdicts)} clips")
    if unscored and not is_map:
        names = sorted(unscored, key=str.lower)
        why = ("not among this artifact's classes" if session.classes else
               "this artifact has no class names (export --labels FILE names them)")
        table.add_row("[yellow]not scored[/]", f"[yellow]clips in {', '.join(map(escape, names[:4]))}"
                      f"{', ...' if len(names) > 4 else ''}: {why}[/]")
    if output:
        table.add_row("predictions", "stdout" if to_stdout else str(output))
    shown.print(table)
    if interrupted:
        raise typer.Exit(interrupted)
    if lost:
        _error(lost)
        raise typer.Exit(1)


@app.command(cls=OnceCommand)
@friendly
def bench(
    target: Annotated[str, typer.Argument(help="Zoo name, package.module:factory or path/to/file.py:factory, or an artifact folder.")],
    classes: Classes = None, size: Size = None, width: Width = None, head: Head = None, channels: Channels = None,
    frames: Annotated[int, typer.Option("--frames", help="Timed frames per measurement.")] = 100,
    window: Annotated[int | None, typer.Option(
        "--window", help="Sliding-window clip length to compare with (default 16, or a multi-rate model's "
                         "output period where that is longer).")] = None,
    rounds: Annotated[int, typer.Option("--rounds", help="Take the measurements in turn this many times, so a "
                                        "slow spell of a shared machine hits all of them.")] = 5,
    streams: Annotated[str | None, typer.Option("--streams", help="Also measure batched streams, as bench-streams "
                                                "does, e.g. 1,2,4,8.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the JSON report only.")] = False,
    json_out: Annotated[Path | None, typer.Option("--json-out", help="Write the JSON report here.")] = None,
    no_verify: Annotated[bool, typer.Option(
        "--no-verify", help="Skip the export's check of the step against the model's clip forward (as export "
                            "--no-verify), e.g. to time a model whose forward code mixes frames.")] = False,
    profiles: Annotated[str | None, typer.Option(
        "--profiles", help="Precisions to time against FP32, e.g. fp16,int8-cpu; given a model, they are built "
                           "for the bench (INT8 calibrated on synthetic frames). Default: every precision an "
                           "artifact holds.")] = None,
) -> None:
    """Measure step vs sliding window, 2D-lowered vs Conv3d, runtime overhead, PyTorch eager, precisions."""
    from .bench import run_bench

    _output_file(json_out, "--json-out")
    if _is_artifact(target):  # a folder that is no artifact has failed here, naming the artifacts inside it
        _refuse_model_flags(target, [("--classes", classes), ("--size", size), ("--width", width), ("--head", head),
                                     ("--channels", channels), ("--window", window), ("--no-verify", no_verify)])
    # a spinner through the minute of exports and timing, its steps printed above it
    with console.status("benchmarking...") if not as_json else contextlib.nullcontext():
        report = run_bench(target, classes=classes, size=frame_size_option(size), width=width, head=head,
                           channels=channels, frames=frames,
                           window=window, rounds=rounds, streams=_stream_counts(streams),
                           verify=not no_verify, log=None if as_json else console,
                           profiles=split_names(profiles) if profiles is not None else None)
    text = json.dumps(json_safe(report), indent=2, allow_nan=False)
    if json_out:
        try:
            json_out.write_text(text)
        except OSError as e:
            print(text)  # a run of a minute or more is not lost to a folder that went away meanwhile
            raise ValueError(f"cannot write --json-out {json_out} ({e.strerror}); the report is printed above "
                             "instead.") from e
    if as_json:
        print(text)
        return
    from .bench_streams import host_line

    console.print(f"host: {host_line(report['host'])}; compare ratios only with runs on the same host.")
    console.print(f"edge3d bench: {target}")  # a path as a table title would wrap mid-name
    if report["output_period"] > 1:
        console.print(f"a multi-rate model, one output every {report['output_period']} frames: times are per frame, "
                      "over whole cycles of its stages"
                      + ("; the sliding window runs once per output." if "window" in report["ms_by_round"][0] else "."))
    table = Table(title="measurements")
    table.add_column("measurement")
    table.add_column("value", justify="right")
    for k, v in report["results"].items():
        table.add_row(k, f"{v:.3f}" if isinstance(v, float) else str(v))
    console.print(table)
    ratios = Table(title="ratios (the overhead lower is better, the others higher)",
                   caption="target: the contract's, set for d-resnet18 at 112×112 on ONNX Runtime CPU")
    ratios.add_column("ratio")
    ratios.add_column("value", justify="right")
    ratios.add_column(f"range, {report['rounds']} round{'s' if report['rounds'] != 1 else ''}", justify="right")
    ratios.add_column("target", justify="right")
    targets = report.get("targets_for_d_resnet18_112", {})
    for k, v in report["ratios"].items():
        lo, hi = report["ratio_range_over_rounds"][k]
        ratios.add_row(k, f"{v:.2f}", f"{lo:.2f}–{hi:.2f}", targets.get(k, "").replace(">=", "≥").replace("<=", "≤"))
    console.print(ratios)
    for why in report.get("not_measured", {}).values():
        console.print(f"[yellow]not measured:[/] {escape(why)}")
    if report.get("streams"):  # --streams: measured, and printed as bench-streams prints it
        _print_streams(report["streams"])


def compare_tables(title: str, rows: list[list[str]], profiles: list[str], width: int) -> list[Table]:
    """compare's table, metrics down and profiles across, split by profiles into as many tables as
    ``width`` columns need, each with the metric names.

    A profile's name or a number is never cut short (no_wrap), so five profiles whose drift cells read
    like "0.00198 @ 679" did not fit 80 columns in one table, and rich squeezed the metric column to
    nothing: rows of numbers with no names.
    """
    metric = 10  # the metric names wrap to this width
    groups: list[list[int]] = [[]]
    used = metric + 4  # the metric column's padding and the borders either side of it
    for i, p in enumerate(profiles):
        w = max(len(p), *(len(r[i + 1]) for r in rows)) + 3  # padding and the border after it
        if groups[-1] and used + w > width:
            groups.append([])
            used = metric + 4
        groups[-1].append(i)
        used += w
    tables = []
    for g, cols in enumerate(groups):
        table = Table(title=title if g == 0 else "(continued)")
        table.add_column("metric", min_width=metric)
        for i in cols:
            table.add_column(profiles[i], justify="right", no_wrap=True, min_width=len(profiles[i]))
        for row in rows:
            table.add_row(row[0], *(row[i + 1] for i in cols))
        tables.append(table)
    return tables


# --------------------------------------------------------------------------- bench-streams
@app.command("bench-streams", cls=OnceCommand)
@friendly
def bench_streams(
    artifact: Annotated[Path, typer.Argument(help="An artifact folder written by `edge3d export`.")],
    streams: Annotated[str, typer.Option("--streams", help="Stream counts to measure, e.g. 1,2,4,8,16.")] = "1,2,4,8",
    frames: Annotated[int, typer.Option("--frames", help="Timed calls per mode and stream count.")] = 30,
    profile: Annotated[str, typer.Option("--profile", help="Precision to run.")] = "fp32",
    threads: Annotated[int | None, typer.Option("--threads", help="ONNX Runtime intra-op threads.")] = None,
    no_rss: Annotated[bool, typer.Option("--no-rss", help="Skip the memory measurement (child processes).")] = False,
    max_batch: Annotated[int | None, typer.Option(
        "--max-batch", help="Step the batched session in chunks of at most this many streams "
                            "(Session(max_batch=...)): about one state's bytes per extra stream.")] = None,
    no_spin: Annotated[bool, typer.Option(
        "--no-spin", help="Let ONNX Runtime's threads sleep between runs (Session(spin=False)): N sessions "
                          "stepped in turn in one process otherwise spin against each other.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the JSON report only.")] = False,
) -> None:
    """N streams batched in one Session vs N separate Sessions: frames/s, gather/scatter cost, memory."""
    from .bench_streams import measure_streams

    counts = _stream_counts(streams)
    with console.status("measuring streams...") if not as_json else contextlib.nullcontext():
        report = measure_streams(artifact, counts, frames, profile=profile, threads=threads, rss=not no_rss,
                                 max_batch=max_batch, spin=not no_spin)
    if as_json:
        print(json.dumps(json_safe(report), indent=2, allow_nan=False))
        return
    _print_streams(report, profile, max_batch, no_spin)


def _print_streams(report: dict[str, Any], profile: str = "fp32", max_batch: int | None = None,
                   no_spin: bool = False) -> None:
    """bench-streams' tables, and bench's with --streams, which measures the same."""
    from .bench_streams import MEMORY_CAPTION, MEMORY_HEADERS, THROUGHPUT_HEADERS, format_rows

    console.print(f"edge3d bench-streams: {report['model']} {'x'.join(map(str, report['frame']))}, {profile}, "
                  f"state {format_bytes(report['state_bytes_per_stream'])} per stream"
                  + (f", chunks of {max_batch}" if max_batch else "") + (", threads not spinning" if no_spin else "")
                  + (f"; a call steps {report['frames_per_call']} frames of each stream, one cycle of the stages"
                     if report.get("frames_per_call", 1) > 1 else ""))
    speed, memory = format_rows(report)
    for title, headers, rows, caption in (
            ("throughput: N streams in one batched Session vs N Sessions", THROUGHPUT_HEADERS, speed, None),
            ("resident memory (MB) each extra stream or session adds", MEMORY_HEADERS, memory, MEMORY_CAPTION)):
        if rows and all(cell == "-" for row in rows for cell in row[1:]):
            continue  # --no-rss
        table = Table(title=title, caption=caption)
        for i, col in enumerate(headers):
            # a number is never cut (min_width holds the widest); a header folds instead, when a noisy
            # run's gain of 24.35x widens its column past what 80 columns leave
            table.add_column(col, justify="right", overflow="fold", min_width=max(len(r[i]) for r in rows))
        for row in rows:
            table.add_row(*row)
        console.print(table)


# --------------------------------------------------------------------------- triton
@app.command(cls=OnceCommand)
@friendly
def triton(
    artifact: Annotated[Path, typer.Argument(help="An artifact folder written by `edge3d export`.")],
    out: Annotated[Path, typer.Option("-o", "--out", help="The Triton model repository to write into.")],
    max_batch: Annotated[int, typer.Option("--max-batch", help="Most streams Triton steps in one call.")] = 8,
    instances: Annotated[int, typer.Option("--instances", help="Model instances (parallel executions).")] = 1,
    name: Annotated[str | None, typer.Option("--name", help="Model name (default: the artifact's).")] = None,
    profile: Annotated[str, typer.Option("--profile", help="Which precision's ONNX graph to serve.")] = "fp32",
    max_sequences: Annotated[int | None, typer.Option(
        "--max-sequences", help="Cameras one instance keeps live (default: --max-batch).")] = None,
    idle_seconds: Annotated[float, typer.Option(
        "--idle-seconds", help="A sequence silent this long is dropped with its state.")] = 5.0,
    kind: Annotated[str, typer.Option("--kind", help="Instance kind of the ONNX model: auto | gpu | cpu.")] = "auto",
) -> None:
    """Write a Triton model repository: the ONNX graph (and any TensorRT engines) with implicit state."""
    from .exporters.triton import write_repository

    _out_folder(out, "-o")
    repo = write_repository(artifact, out, max_batch, console=console, model_name=name, instances=instances,
                            profile=profile, max_sequences=max_sequences, idle_seconds=idle_seconds, kind=kind)
    console.print(f"wrote Triton model repository [bold]{escape(str(repo))}[/]; serve it with")
    # printed to be pasted into a shell: quoted where the path has spaces or shell characters
    console.print(f"  tritonserver --model-repository={shlex.quote(str(repo.resolve()))}", soft_wrap=True,
                  highlight=False, markup=False)
    _say_abandoned(repo)


# --------------------------------------------------------------------------- build
@app.command(cls=OnceCommand)
@friendly
def build(
    artifact: Annotated[Path, typer.Argument(help="An artifact folder written by `edge3d export`.")],
    profile: Annotated[str | None, typer.Option("--profile", help="Precisions to build, comma separated (default: all).")] = None,
    streams: Annotated[int, typer.Option("--streams", help="Most streams (batch size) the engines accept.")] = 8,
    dla: Annotated[int | None, typer.Option("--dla", help="DLA core to build for, with GPU fallback (Jetson).")] = None,
    workspace: Annotated[int, typer.Option("--workspace", help="Builder workspace limit in MiB.")] = 1024,
) -> None:
    """Build strongly typed TensorRT engines on this device, one per precision's ONNX graph."""
    from .exporters.tensorrt import build_engines

    built = build_engines(artifact, split_names(profile) or None, streams=streams, dla=dla, workspace_mb=workspace,
                          console=console)
    console.print(f"wrote {len(built)} engine(s) into [bold]{escape(str(artifact))}[/]; "
                  f"`edge3d run {escape(shlex.quote(str(artifact)))} --backend tensorrt`")


# --------------------------------------------------------------------------- compare
@app.command(cls=OnceCommand)
@friendly
def compare(
    artifact: Annotated[Path, typer.Argument(help="An artifact folder with the precisions to compare.")],
    profiles: Annotated[str | None, typer.Option("--profiles", help="Comma separated, e.g. fp32,fp16,int8 (default: all built).")] = None,
    sources: Annotated[list[str] | None, typer.Option("--source", metavar="<str>", help="FILE.mp4 | FOLDER (of clips, or of one folder of clips per class: "
                                                        "scored per frame and per clip) | camera:INDEX | csi:SENSOR | "
                                                        "a GStreamer pipeline | synthetic[:SEED] (default: synthetic)."
                                                        )] = None,
    frames: Annotated[int, typer.Option("--frames", help="Frames to stream through every profile.")] = 1000,
    out: Annotated[Path, typer.Option("-o", "--out", help="Folder for report.json, report.md and the plots.")] = Path("compare"),
    save_polygraphy_inputs: Annotated[bool, typer.Option("--save-polygraphy-inputs", help="Also write a few step inputs (frame + states) for `polygraphy run --load-inputs`.")] = False,
    threads: Annotated[int, typer.Option("--threads", help="ONNX Runtime intra-op threads per session (1: the "
                                         "2N+1 sessions step in lockstep, and idle ORT pools spinning would "
                                         "contend for the cores and distort every latency).")] = 1,
    images_fps: Annotated[float | None, typer.Option(
        "--images-fps", help="The frame rate a folder of images was extracted at, which images do not carry (a "
                             "dataset shipped as frames: 30, say): its frames are then taken at the artifact's "
                             "--fps as a video's are. Needs an artifact with a frame rate.")] = None,
) -> None:
    """Compare precisions against FP32: latency, cache, per-step error, drift, top-1 agreement."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from .compare import TREND_FRAMES, outputs_text, report_notes, table_rows, threads_text
    from .compare import compare as run_compare
    from .runtime.manifest import load_manifest

    _out_folder(out, "-o")
    source = _one_source(sources, "--source", "compare")
    manifest = load_manifest(artifact)
    names = split_names(profiles) or list(manifest["precisions"])
    if "fp32" not in names:
        names.insert(0, "fp32")
    if names == ["fp32"]:  # fp32 against itself: every error 0, every agreement 100%
        others = [p for p in manifest["precisions"] if p != "fp32"]
        if others:
            raise ValueError("compare measures other precisions against fp32, and --profiles names only fp32; "
                             f"add one, e.g. --profiles fp32,{others[0]}.")
        raise ValueError("compare measures other precisions against fp32, and the artifact has only fp32; add some "
                         f"with `edge3d export {shlex.quote(str(artifact))} --profile fp16,int8` and compare those.")
    if source is None:
        from .sources import synthetic_available

        if not synthetic_available():
            raise ValueError("the synthetic source is not available here; pass --source VIDEO|FOLDER.")
        source = "synthetic"
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeRemainingColumn(), console=console, transient=True) as progress:
        task = progress.add_task(f"comparing {', '.join(names)}", total=frames)
        report = run_compare(artifact, names, source, frames, out_dir=out,
                             save_polygraphy_inputs=save_polygraphy_inputs, threads=threads, images_fps=images_fps,
                             progress=lambda n: progress.advance(task, n))
    stopped = ", interrupted" if report.get("interrupted") else ""
    for table in compare_tables(f"edge3d compare: {report['model']} on {report['source']} ({report['frames']} frames"
                                f"{outputs_text(report)}{stopped})", table_rows(report), list(report["profiles"]),
                                console.width):
        console.print(table)
    console.print("teacher-forced (TF): each profile fed the FP32 states, the error one step adds; drift: "
                  "free-running, each profile carrying its own state; growth: last-quarter over third-quarter "
                  "mean drift, in brackets with the TF growth divided out (about 1 when bounded)"
                  + (f"; it needs {TREND_FRAMES} frames or more." if report["outputs"] < TREND_FRAMES else "."))
    for note in report_notes(report):
        console.print(f"[bold red]{escape(note)}[/]")
    if report.get("host"):  # each precision's ms/frame belongs to this CPU
        from .bench_streams import host_line

        console.print(f"host: {escape(host_line(report['host']) + threads_text(report))}", highlight=False,
                      soft_wrap=True)
    console.print(f"wrote [bold]{escape(str(out / 'report.json'))}[/], "
                  + ", ".join(["report.md", *report.get("plots", []), "series.npz"]))
    if report.get("plots_skipped"):
        console.print(f"no plots: {escape(report['plots_skipped'])}.", highlight=False)
    for p, f in report.get("polygraphy_inputs", {}).items():
        model = shlex.quote(str(Path(report["artifact"]) / f"model.{p}.onnx"))
        console.print(f"  polygraphy run {model} --onnxrt --load-inputs {shlex.quote(str(out / f))}",
                      soft_wrap=True, highlight=False, markup=False)
    if report.get("interrupted"):
        terminated = report.get("interrupted_by") == "SIGTERM"
        err_console.print(f"{'terminated' if terminated else 'interrupted'} after {report['frames']} frames; the "
                          "report covers those.")
        raise typer.Exit(143 if terminated else 130)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
    sys.exit(0)
