"""Precision profiles: TOML files that say how a precision of an artifact is built.

The built-in profiles (``fp32``, ``fp16``, ``int8``, ``int8-lowmem``) are the ``*.toml`` files
beside this module; a user profile is any other TOML file passed by path. A profile is data,
not code, so the same file can be reviewed, versioned and shipped with a model, and the
exporter, ``edge3d compare`` and the TensorRT builder all read the same decisions.

This module is stdlib only (``tomllib``): loading a profile needs neither torch nor onnx.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

FOLDER = Path(__file__).resolve().parent
FLOAT_DTYPES = ("float32", "float16")
INT_DTYPES = ("int8", "uint8")
METHODS = ("minmax", "entropy", "percentile")
BACKENDS = ("onnxruntime", "tensorrt")
_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
_KEYS = {"name", "description", "weight_dtype", "activation_dtype", "state_dtype", "accumulator_dtype",
         "io_dtype", "per_channel", "keep_op_types", "keep_layers", "backends", "calibration"}
_CALIB_KEYS = {"method", "frames", "warmup", "percentile"}


@dataclass(frozen=True)
class Calibration:
    """How INT8 scales are chosen: ``method`` over ``frames`` rollout steps after ``warmup`` steps."""

    method: str = "none"
    frames: int = 0
    warmup: int = 16
    percentile: float = 99.999


@dataclass(frozen=True)
class Profile:
    """One precision: dtypes of weights, activations, states and accumulators, and how to get there.

    ``kind`` (fp32 / fp16 / int8) follows from the weight dtype and picks the builder.
    ``keep_op_types`` and ``keep_layers`` name op types (``Softmax``) and model layers
    (``head.fc``, matched with their sub-layers) that stay float32.
    """

    name: str
    description: str = ""
    weight_dtype: str = "float32"
    activation_dtype: str = "float32"
    state_dtype: str = "float32"
    accumulator_dtype: str = "float32"
    io_dtype: str = "float32"
    per_channel: bool = False
    keep_op_types: tuple[str, ...] = ()
    keep_layers: tuple[str, ...] = ()
    backends: tuple[str, ...] = BACKENDS
    calibration: Calibration = field(default_factory=Calibration)
    source: str = ""

    @property
    def kind(self) -> str:
        return {"float32": "fp32", "float16": "fp16"}.get(self.weight_dtype, "int8")

    @property
    def file_name(self) -> str:
        return f"model.{self.name}.onnx"

    def to_dict(self) -> dict[str, Any]:
        """The profile as recorded in the manifest (so an artifact says how it was built)."""
        return {
            "name": self.name, "description": self.description, "weight_dtype": self.weight_dtype,
            "activation_dtype": self.activation_dtype, "state_dtype": self.state_dtype,
            "accumulator_dtype": self.accumulator_dtype, "io_dtype": self.io_dtype,
            "per_channel": self.per_channel, "keep_op_types": list(self.keep_op_types),
            "keep_layers": list(self.keep_layers), "backends": list(self.backends),
            "calibration": {"method": self.calibration.method, "frames": self.calibration.frames,
                            "warmup": self.calibration.warmup, "percentile": self.calibration.percentile},
        }


def builtin_names() -> list[str]:
    """Names of the profiles shipped with edge3d."""
    return sorted(p.stem for p in FOLDER.glob("*.toml"))


def _is_path(spec: str) -> bool:
    return spec.endswith(".toml") or "/" in spec or "\\" in spec


def load_profile(spec: str | Path) -> Profile:
    """A built-in profile by name, or a user profile from a TOML file; ValueError if bad."""
    spec_s = str(spec)
    if isinstance(spec, Path) or _is_path(spec_s):
        path = Path(spec_s)
        if not path.is_file():
            raise ValueError(f"profile file {path} does not exist; pass a built-in profile "
                             f"({', '.join(builtin_names())}) or the path of a .toml profile.")
    else:
        path = FOLDER / f"{spec_s}.toml"
        if not path.is_file():
            near = f"did you mean {spec_s.lower()!r}? " if spec_s.lower() in builtin_names() else ""
            raise ValueError(f"unknown precision profile {spec_s!r}; {near}choose one of "
                             f"{', '.join(builtin_names())} or pass the path of a .toml profile.")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"profile {path} is not valid TOML ({e}); fix the file.") from e
    except UnicodeDecodeError as e:
        raise ValueError(f"profile {path} is not a UTF-8 text file; pass a .toml profile.") from e
    return parse_profile(data, str(path))


def _str(data: dict[str, Any], key: str, default: str, allowed: tuple[str, ...], where: str) -> str:
    value = data.get(key, default)
    if value not in allowed:
        raise ValueError(f"profile {where}: {key} = {value!r} is not one of {', '.join(allowed)}; fix the file.")
    return value


def _list(data: dict[str, Any], key: str, default: tuple[str, ...], where: str) -> tuple[str, ...]:
    value = data.get(key, list(default))
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"profile {where}: {key} must be a list of strings, got {value!r}; fix the file.")
    return tuple(value)


def _did_you_mean(key: str, keys: Any) -> str:
    """A misspelt key (`weigth_dtype`) is named with the key meant: among twelve, it is easy to miss."""
    import difflib

    close = difflib.get_close_matches(key, sorted(keys), n=1, cutoff=0.75)
    return f" (did you mean {close[0]!r}?)" if close else ""


def parse_profile(data: dict[str, Any], where: str = "profile") -> Profile:
    """Validate a decoded TOML table; every problem is one sentence naming the key and the fix."""
    unknown = sorted(set(data) - _KEYS)
    misplaced = [k for k in unknown if k in _CALIB_KEYS]
    if misplaced:  # `warmup = 0` written above the table it belongs to
        raise ValueError(f"profile {where}: {misplaced[0]!r} belongs in the [calibration] table; move it below "
                         "the [calibration] line.")
    if unknown:
        raise ValueError(f"profile {where}: unknown key {unknown[0]!r}{_did_you_mean(unknown[0], _KEYS)}; the keys "
                         f"are {', '.join(sorted(_KEYS))}.")
    name = data.get("name")
    if name is None:
        raise ValueError(f"profile {where} has no name; add a line such as name = \"int8-mine\" (it names "
                         "model.<name>.onnx).")
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"profile {where}: name must be lower-case letters, digits, '-' or '_' "
                         f"(it names model.<name>.onnx), got {name!r}.")
    weight = _str(data, "weight_dtype", "float32", FLOAT_DTYPES + ("int8",), where)
    floating = weight in FLOAT_DTYPES
    activation = _str(data, "activation_dtype", weight,
                      (weight,) if floating else INT_DTYPES, where)
    state = _str(data, "state_dtype", "float32", FLOAT_DTYPES if floating else ("float32", "int8"), where)
    accumulator = _str(data, "accumulator_dtype", "float32",
                       FLOAT_DTYPES if floating else ("float32",), where)
    io = _str(data, "io_dtype", "float32", FLOAT_DTYPES if weight == "float16" else ("float32",), where)
    if state == "int8" and activation != "int8":
        raise ValueError(f"profile {where}: int8 states need symmetric int8 activations "
                         "(activation_dtype = \"int8\"), so that the initial state 0 stays 0.")
    per_channel = data.get("per_channel", not floating)
    if not isinstance(per_channel, bool):
        raise ValueError(f"profile {where}: per_channel must be true or false, got {per_channel!r}.")
    backends = _list(data, "backends", BACKENDS, where)
    for b in backends:
        if b not in BACKENDS:
            raise ValueError(f"profile {where}: backend {b!r} is not one of {', '.join(BACKENDS)}.")
    calib = data.get("calibration", {})
    if not isinstance(calib, dict):
        raise ValueError(f"profile {where}: [calibration] must be a table.")
    unknown = sorted(set(calib) - _CALIB_KEYS)
    if unknown:
        raise ValueError(f"profile {where}: unknown calibration key {unknown[0]!r}"
                         f"{_did_you_mean(unknown[0], _CALIB_KEYS)}; the keys are {', '.join(sorted(_CALIB_KEYS))}.")
    if floating:
        calibration = Calibration("none", 0, int(calib.get("warmup", 16)))
    else:
        method = _str(calib, "method", "minmax", METHODS, where + " [calibration]")
        frames, warmup = calib.get("frames", 256), calib.get("warmup", 16)
        pct = calib.get("percentile", 99.999)
        if not isinstance(frames, int) or isinstance(frames, bool) or frames < 1:
            raise ValueError(f"profile {where}: calibration frames must be a positive integer, got {frames!r}.")
        if not isinstance(warmup, int) or isinstance(warmup, bool) or warmup < 0:
            raise ValueError(f"profile {where}: calibration warmup must be an integer >= 0, got {warmup!r}.")
        if not isinstance(pct, (int, float)) or not 50 < pct <= 100:
            raise ValueError(f"profile {where}: calibration percentile must be in (50, 100], got {pct!r}.")
        calibration = Calibration(method, frames, warmup, float(pct))
    description = data.get("description", "")
    if not isinstance(description, str):
        raise ValueError(f"profile {where}: description must be a string.")
    return Profile(name, description, weight, activation, state, accumulator, io, per_channel,
                   _list(data, "keep_op_types", (), where), _list(data, "keep_layers", (), where),
                   backends, calibration, where)


def split_names(names: str | Iterable[str] | None) -> list[str]:
    """A list of names from the command line's comma-separated form or from a sequence: a plain
    string passed from Python must mean its comma-separated names, never its letters."""
    if names is None:
        return []
    if isinstance(names, str):
        return [n.strip() for n in names.split(",") if n.strip()]
    return [str(n) for n in names]


def resolve_profiles(names: str | Iterable[str]) -> list[Profile]:
    """Load every named profile, failing on the first bad one before any slow work starts."""
    names = split_names(names)
    profiles = [load_profile(n) for n in names]
    seen: dict[str, str] = {}
    for p, n in zip(profiles, names, strict=True):
        if p.name == "fp32" and n != "fp32":  # it would be skipped: model.fp32.onnx is the export itself
            raise ValueError(f"profile {n} is named 'fp32', the reference precision every artifact is exported "
                             "with; give it another name.")
        if n != p.name and p.name in builtin_names() and p.to_dict() != load_profile(p.name).to_dict():
            # model.int8.onnx must mean the built-in int8 wherever an artifact goes: a float16 graph
            # under that name, or a re-export with --profile int8 silently replacing the user's
            # graph, would mislabel what ships.
            raise ValueError(f"profile {n} is named {p.name!r}, the name of a built-in profile, but builds "
                             "something else; give it a name of its own (such as "
                             f"'{p.name}-mine') so that {p.name!r} in an artifact always means the built-in one.")
        if p.name in seen and seen[p.name] != n:
            raise ValueError(f"profiles {seen[p.name]!r} and {n!r} are both named {p.name!r}; "
                             "give the user profile another name.")
        seen[p.name] = n
    unique: dict[str, Profile] = {}
    for p in profiles:
        unique.setdefault(p.name, p)
    return list(unique.values())
