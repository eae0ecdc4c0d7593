"""The artifact's manifest: the contract between exporter and runtime.

Loading validates everything the runtime will rely on, so that a corrupt, truncated or
mismatched artifact fails here, at load, and never in the middle of a stream.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import numbers
import os
import re
import secrets
import shlex
from pathlib import Path
from typing import Any

from .preprocess import COLOR_ORDERS, check_fit, check_normalisation
from .rate import check_fps

# The newest format this edge3d reads and writes. Version 2 adds the frame's "fit" and the BGR "color",
# version 3 the frame rate ("fps") the model was trained at, version 4 precisions other than fp32 in a
# multi-rate artifact (stage graphs whose states and buffers are float16 or int8); an artifact is written
# with the oldest version that describes it (format_version_for), so a device whose edge3d predates them
# refuses an artifact that crops, wants BGR, takes a lower frame rate than its cameras send or holds
# such stage graphs, which it would feed squeezed, RGB or every frame, or fail on at the first step with
# float32 states, and still reads every other.
FORMAT_VERSION = 4
READS = (1, 2, 3, 4)
MANIFEST = "manifest.json"
METADATA_KEY = "edge3d.manifest"
# An artifact is the folder <name>.edge3d and, by default, the Triton model <name>: one plain name that
# both accept.
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

DTYPE_BYTES = {"float32": 4, "float16": 2, "int8": 1, "uint8": 1, "int32": 4, "int64": 8}


class ArtifactError(ValueError):
    """The artifact cannot be used; the message says what is wrong and how to fix it."""


def multirate_message(name: str, what: str) -> str:
    return (f"{name} is a multi-rate model (one graph per stage), and {what} takes single-graph artifacts only; "
            "multi-rate artifacts run on ONNX Runtime, in every precision, with `edge3d run`, `edge3d compare`, "
            "`edge3d bench` or Session (see docs/multirate.md).")


def require_single_graph(manifest: dict[str, Any], what: str) -> None:
    """Multi-rate artifacts (manifest "stages") run on ONNX Runtime only: TensorRT, Triton and compare's
    Polygraphy inputs each take one graph with one set of states, and would otherwise fail deep inside on
    the first stage's graph."""
    if "stages" in manifest:
        raise ArtifactError(multirate_message(str(manifest.get("name", "the artifact")), what))


def output_map(m: dict[str, Any]) -> tuple[int, ...] | None:
    """The positions of a per-frame map output ((H, W) of a segmentation or heatmap model's (C, H, W)),
    or None for a class vector. A map has a class at every position, not one for the frame, so the
    verbs that name a top class (`run`, `Session.top`) must tell the two apart; axes of size 1 (a
    classifier that kept its pooled 1×1) are still a vector."""
    axes = tuple(m["output"].get("shape", [])[2:])
    return axes if math.prod(d if isinstance(d, int) else 2 for d in axes) > 1 else None


def state_io_names(state_name: str) -> tuple[str, str]:
    return f"state_in.{state_name}", f"state_out.{state_name}"


# A buffer between two stages of a multi-rate artifact (edge3d/staged.py) is the reading stage's graph
# input BUFFER_IN + layer, which the runtime fills one frame at a time from the writing stage's graph
# output FEED_OUT + layer. The manifest's "buffers" list the inputs' names.
BUFFER_IN, FEED_OUT = "buffer.", "feed."


def buffer_io_names(layer: str) -> tuple[str, str]:
    return BUFFER_IN + layer, FEED_OUT + layer


def buffer_of_feed(feed: str) -> str:
    return BUFFER_IN + feed.removeprefix(FEED_OUT)


def feed_of_buffer(buffer: str) -> str:
    return FEED_OUT + buffer.removeprefix(BUFFER_IN)


def output_period(manifest: dict[str, Any]) -> int:
    """Frames from one output to the next: the slowest stage's rate of a multi-rate artifact, else 1.
    Any this many frames in a row run every stage of the schedule, so timings and calibration shares
    are taken in whole cycles of it."""
    return int(manifest["stages"][-1]["rate"]) if "stages" in manifest else 1


def io_names(m: dict[str, Any]) -> tuple[set[str], set[str]]:
    """The graph inputs and outputs a manifest promises: frame + every state_in.*, output + every state_out.*."""
    return ({"frame"} | {state_io_names(s["name"])[0] for s in m["states"]},
            {"output"} | {state_io_names(s["name"])[1] for s in m["states"]})


def resolve_artifact(path: str | Path) -> Path:
    """Accept the artifact folder, its manifest.json, or one of its ONNX files; ``~`` is expanded, as a
    shell would for the CLI, since apps pass paths such as "~/models/x.edge3d" from their config."""
    p = Path(path).expanduser()
    if p.is_file() and p.name == MANIFEST:
        return p.parent
    if p.is_file() and p.suffix == ".onnx":
        if not (p.parent / MANIFEST).is_file():
            raise ArtifactError(f"{p} is an ONNX file outside its artifact folder (no {MANIFEST} beside it); "
                                "pass the folder written by `edge3d export` (`edge3d inspect` reads the "
                                "manifest embedded in the file).")
        return p.parent
    if not p.exists():
        if len(p.parts) == 1:  # a bare word: a zoo name given to a verb that takes an exported artifact
            from ..zoo import names as zoo_names

            if p.name in zoo_names():
                raise ArtifactError(f"{p.name} is a model of the zoo, not an artifact; export it first "
                                    f"(`edge3d export {p.name} -o out`) and pass out/{p.name}.edge3d.")
        # A typo'd name beside the real one; stems are compared, as every artifact ends in .edge3d.
        siblings = {q.stem: q for q in artifacts_in(p.parent)}
        near = difflib.get_close_matches(p.stem, list(siblings), n=1, cutoff=0.75)
        fix = f"did you mean {siblings[near[0]]}?" if near else "create it with `edge3d export MODEL -o DIR`."
        raise ArtifactError(f"artifact {p} does not exist; {fix}")
    if p.is_file():  # a video given where the artifact goes, say, with the two arguments swapped
        raise ArtifactError(f"{p} is a file, not an artifact folder; pass the folder `edge3d export` wrote (it holds "
                            f"{MANIFEST} and model.<profile>.onnx).")
    if not (p / MANIFEST).is_file():
        inside = artifacts_in(p)
        fix = (f"point to one of the artifacts in it: {', '.join(map(str, inside))}" if inside
               else "point to a folder written by `edge3d export`")
        raise ArtifactError(f"{p} has no {MANIFEST}; {fix}.")
    return p


def artifacts_in(folder: Path) -> list[Path]:
    """Artifact folders directly inside ``folder``: `edge3d export -o out` writes ``out/NAME.edge3d``,
    and ``out`` is the path a user most often passes by mistake."""
    try:
        return sorted(q for q in folder.iterdir() if (q / MANIFEST).is_file())
    except OSError:  # not a folder, or one we may not list: there is nothing to point to
        return []


def load_manifest(path: str | Path) -> dict[str, Any]:
    """Read and validate ``manifest.json`` of an artifact folder."""
    folder = resolve_artifact(path)
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{folder / MANIFEST} is not valid JSON ({e.msg}); re-export the artifact.") from e
    validate_manifest(manifest, str(folder / MANIFEST))
    manifest["_folder"] = str(folder)
    return manifest


def format_version_for(frame: dict[str, Any], manifest: dict[str, Any] | None = None) -> int:
    """The oldest format version that describes an artifact with this frame spec (and, given its
    manifest, these stages and precisions)."""
    if manifest is not None and "stages" in manifest and set(manifest.get("precisions", {})) - {"fp32"}:
        return 4
    if frame.get("fps") is not None:
        return 3
    return 1 if frame.get("fit", "stretch") == "stretch" and frame.get("color") != "BGR" else 2


def validate_manifest(m: dict[str, Any], where: str = "manifest") -> None:
    version = m.get("format_version")
    if version not in READS or isinstance(version, bool):
        newer = is_positive_int(version) and version > FORMAT_VERSION  # a device whose edge3d lags the workstation's
        fix = ("it was written by a newer edge3d: upgrade edge3d here to the workstation's version, or re-export "
               "the model with this one" if newer else "re-export the model with this edge3d version")
        raise ArtifactError(f"{where} has format_version {version!r} but this edge3d reads versions "
                            f"{READS[0]} to {READS[-1]}; {fix}.")
    for key in ("frame", "output", "states", "precisions"):
        if key not in m:
            raise ArtifactError(f"{where} lacks the {key!r} entry; re-export the artifact.")
    for s in m["states"]:
        for key in ("name", "shape", "dtype", "kind", "bytes"):
            if key not in s:
                raise ArtifactError(f"{where}: state {s.get('name', '?')!r} lacks {key!r}; re-export the artifact.")
    if not m["precisions"]:
        raise ArtifactError(f"{where} lists no precision; re-export the artifact.")
    f = m["frame"]
    try:  # a hand-edited or foreign manifest; export checks the same before writing one
        check_normalisation(f.get("mean", [0.0] * f.get("channels", 3)), f.get("std", [1.0] * f.get("channels", 3)),
                            f.get("channels"))
        check_fit(f.get("fit", "stretch"))
        if f.get("fps") is not None:  # a number: "source" is how flags say none, not how a manifest does
            check_fps(math.nan if isinstance(f["fps"], (str, bool)) else f["fps"])
        if f.get("channels") == 3 and f.get("color", "RGB") not in COLOR_ORDERS:  # the runtime reads the exact word
            raise ValueError(f"frame color {f['color']!r} is not RGB or BGR (upper case), the channel order the "
                             "model was trained on.")
    except ValueError as e:
        raise ArtifactError(f"{where}: {e}") from None
    classes, shape = m["output"].get("classes"), m["output"].get("shape", [])
    if classes is not None and all(isinstance(d, int) for d in shape[1:]):
        outputs = class_count(shape[1:])
        # names edited by hand (translated, say) must still be one per output, or top() would name some
        # classes and number the others
        if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes) or len(classes) != outputs:
            count = f"{len(classes)} entries" if isinstance(classes, list) else f"a {type(classes).__name__}"
            raise ArtifactError(f"{where}: output.classes has {count} where the model has {outputs} classes; list "
                                "one class name (a string) per class, in output order, or set it to null.")


def class_count(output_shape: Any) -> int:
    """How many class names an output of this per-frame shape takes: one per value of a vector, one
    per channel of a map (a segmentation model names its channels, not its pixels)."""
    dims = [int(d) for d in output_shape]
    return dims[0] if math.prod(dims[1:]) > 1 else math.prod(dims)


def precision_entry(m: dict[str, Any], profile: str) -> dict[str, Any]:
    if not isinstance(profile, str):
        raise ValueError(f"profile must be a precision name such as 'fp32', got {profile!r}.")
    if profile not in m["precisions"]:
        from ..profiles import builtin_names

        known = builtin_names()
        fix = (f"did you mean {profile.lower()!r}?" if profile.lower() in m["precisions"] else
               f"add it with `edge3d export {shlex.quote(m.get('_folder', 'ARTIFACT'))} --profile {profile}`"
               if profile in known else
               f"pick one of those, or export one of the profiles {', '.join(known)} or a profile .toml")
        raise ArtifactError(f"the artifact has no {profile!r} precision (it has {', '.join(m['precisions'])}); {fix}.")
    return m["precisions"][profile]


def state_bytes(m: dict[str, Any], dtypes: dict[str, str] | None = None) -> dict[str, int]:
    """Bytes per stream of every state, under the dtypes of one precision if given."""
    out = {}
    for s in m["states"]:
        dtype = (dtypes or {}).get(s["name"], s["dtype"])
        n = 1
        for d in s["shape"][1:]:
            n *= int(d)
        out[s["name"]] = n * DTYPE_BYTES[dtype]
    return out


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


_DIGESTS: dict[tuple[str, int, int], str] = {}  # (path, mtime, size) -> digest: hash a file once per process


def check_file_hash(path: Path, recorded: str | None) -> None:
    """Fail at load when a graph file is not the one its manifest records.

    A flipped bit in the weights (an SD card, an interrupted copy that left the right length)
    still parses, and would stream wrong outputs without a word; the sha256 recorded at export
    catches it before the first frame. Files of artifacts that predate the hashes are not checked,
    nor are TensorRT engines: ``build_engines.sh`` rebuilds them on the device and leaves the
    manifest's entry (from a build elsewhere) as it was.
    """
    if not recorded:
        return
    st = path.stat()
    key = (str(path.resolve()), st.st_mtime_ns, st.st_size)
    digest = _DIGESTS.get(key) or file_sha256(path)
    _DIGESTS[key] = digest
    if digest != recorded:
        raise ArtifactError(
            f"{path.name} is not the file manifest.json records (its sha256 differs): it is corrupt or truncated, "
            "or was changed after export; re-export the artifact, or copy it again."
        )


def staging_folder(parent: Path, prefix: str) -> Path:
    """A new hidden folder in ``parent`` to assemble an artifact or a Triton model in before it is
    renamed into place.

    ``tempfile.mkdtemp`` makes its folder 0700 whatever the umask, and a folder keeps its mode when
    renamed: the exported artifact, and the Triton model, could then be read by their owner alone, not
    by a camera app's service account or a Triton container running as another user. ``mkdir``
    applies the umask, as for any folder the user makes. The name carries this process's id, so that
    one left behind by a killed export (the OOM killer, a power cut) can be told from one in use:
    :func:`abandoned_staging`.
    """
    for _ in range(100):
        path = Path(parent) / f"{prefix}{os.getpid()}-{secrets.token_hex(4)}"
        try:
            path.mkdir()
        except FileExistsError:
            continue
        return path
    raise FileExistsError(f"no free name for a temporary folder in {parent}; remove the hidden {prefix}* folders "
                          "there.")


def abandoned_staging(parent: Path) -> list[Path]:
    """The staging folders in ``parent`` (see :func:`staging_folder`) whose process is gone: an export
    killed outright (SIGKILL, out of memory) leaves its hidden folder, up to a whole graph, with no one
    to remove it. Only named, never removed here: the folder may be on a disk another machine writes to."""
    if os.name != "posix":  # os.kill(pid, 0) tests for a process on POSIX; on Windows it would end that process
        return []
    found = []
    for d in sorted(Path(parent).glob(".*")):
        m = re.fullmatch(r"\..+\.(\d+)-[0-9a-f]{8}", d.name)
        if not (m and d.is_dir()):
            continue
        try:
            os.kill(int(m[1]), 0)  # signal 0: is there such a process
        except PermissionError:
            continue  # there is, another user's
        except (OSError, OverflowError):
            found.append(d)  # none (ProcessLookupError), or an id no process can have
    return found


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    """Rewrite manifest.json atomically (used when precisions or engines are added).

    It lives here, numpy-free and torch-free, because engines are added on the device, where only
    the runtime is installed.
    """
    data = {k: v for k, v in manifest.items() if not k.startswith("_")}
    tmp = Path(folder) / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, Path(folder) / MANIFEST)


def is_positive_int(v: object) -> bool:
    """A count of streams, frames or threads: an int or NumPy integer of at least 1, never a bool
    (True is an int to Python, and 2.5 or "8" would fail later inside ONNX Runtime or a loop)."""
    return not isinstance(v, bool) and isinstance(v, numbers.Integral) and v >= 1


def json_safe(obj: Any) -> Any:
    """NaN and ±inf as null: Python's json writes bare NaN/Infinity, which jq, JavaScript and most
    other JSON readers reject (an overflowing float16 profile puts them in reports and predictions)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def memory_available() -> int | None:
    """Bytes of memory the kernel says new allocations can get (Linux's MemAvailable), else None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def format_bytes(n: float, like: float | None = None) -> str:
    """Bytes for people: kB below 100 kB, else MB (10^6 B, as the D3D paper counts cache).

    ``like`` picks the unit that value would get, so a row of sizes reads in one unit (0.102 MB
    beside 0.051 MB, not beside 51.2 kB) and compares at a glance.
    """
    return f"{n / 1e6:.3f} MB" if (n if like is None else like) >= 1e5 else f"{n / 1e3:.1f} kB"
