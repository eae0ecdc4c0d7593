"""Resolve a model argument (zoo name or ``package.module:factory``) and load a checkpoint."""

from __future__ import annotations

import importlib
import importlib.util
import inspect as pyinspect
import warnings
from pathlib import Path
from typing import Any

from torch import nn


def build_model(spec: str, *, num_classes: int | None = None, frame_size: int | None = None,
                width: float | None = None, head: str | None = None, labelled: int | None = None) -> nn.Module:
    """A zoo name, or ``package.module:factory`` called with the options it accepts.

    ``labelled``: the number of class names given (``--labels``), passed as ``num_classes`` where
    ``num_classes`` is left out and the model takes it; a model whose classes are fixed (a trained
    zoo model, a factory without the parameter) is built as it is, and the names are checked
    against its output by the export, which names the two counts.
    """
    from . import zoo

    options = {"num_classes": num_classes, "frame_size": frame_size, "width": width, "head": head}
    if ":" not in spec:
        if num_classes is None and labelled is not None and "num_classes" in zoo.get(spec).defaults:
            options["num_classes"] = labelled
        return zoo.build(spec, **options)  # checks the options itself
    zoo.check_options(options)
    module_name, _, attr = spec.rpartition(":")  # the last colon: C:\\models\\net.py:build
    if not module_name or not attr:
        raise ValueError(f"model {spec!r} is neither a zoo name nor package.module:factory; pass e.g. "
                         "mypackage.models:build.")
    try:
        factory = getattr(_import_module(module_name), attr)
    except ModuleNotFoundError as e:
        parts = module_name.split(".")
        if e.name not in {".".join(parts[:i]) for i in range(1, len(parts) + 1)}:  # a package the module imports
            raise ValueError(f"importing {module_name} raised ModuleNotFoundError ({e}); install that package where "
                             "edge3d runs.") from e
        raise ValueError(f"cannot import {spec!r} ({e}); edge3d looks on PYTHONPATH and in the current folder, "
                         f"or give the file: path/to/{parts[-1]}.py:{attr}.") from e
    except (ImportError, AttributeError) as e:
        raise ValueError(f"cannot import {spec!r} ({e}); pass package.module:factory importable from here.") from e
    except _NoFactoryFile as e:
        raise ValueError(f"cannot import {spec!r} ({e}); give the path of the .py file that holds the factory, or "
                         "package.module:factory.") from e
    except SyntaxError as e:  # the user's own module: where to look, not edge3d's traceback
        raise ValueError(f"{module_name} has a syntax error ({e.msg}, {e.filename} line {e.lineno}); fix it and "
                         "run this again.") from e
    except Exception as e:
        raise ValueError(f"importing {module_name} raised {type(e).__name__} ({e}); import it from Python to see "
                         "the traceback.") from e
    if not callable(factory):
        raise ValueError(f"{spec} is not callable ({type(factory).__name__}); point it at a function that builds "
                         "the model.")
    kwargs = _factory_kwargs(spec, factory, options, labelled)
    try:
        model = factory(**kwargs)
    except Exception as e:  # the user's own code: its message, not edge3d's traceback
        raise ValueError(f"{spec} raised {type(e).__name__} while building the model ({e}); call it from Python "
                         "to see the traceback.") from e
    if not isinstance(model, nn.Module):
        raise ValueError(f"{spec} returned {type(model).__name__}, not a torch.nn.Module.")
    return model


class _NoFactoryFile(Exception):
    """A ``path/to/file.py`` model spec whose file is not there (not an error raised by the file's own code)."""


def _import_module(name: str) -> Any:
    """``package.module`` from PYTHONPATH or the current folder, or a ``.py`` file by its path.

    The `edge3d` command's sys.path starts at its own bin folder, not where the user stands, so
    ``edge3d export mynet:build`` beside mynet.py failed with "No module named 'mynet'"; the current
    folder goes last, after the installed packages, so a folder named like one cannot shadow it.
    """
    import os
    import sys

    if name.endswith(".py") or "/" in name or os.sep in name:
        path = Path(name).expanduser()
        if not path.is_file():
            raise _NoFactoryFile(f"{name} is not a file")
        folder = str(path.resolve().parent)
        if folder not in sys.path:  # so that the file's own imports of its neighbours work
            sys.path.append(folder)
        module_spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules.setdefault(path.stem, module)  # tracing looks classes up by their module's name
        module_spec.loader.exec_module(module)
        return module
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())
    return importlib.import_module(name)


# Training scripts commonly save {"state_dict": ...} (Lightning), {"model_state_dict": ..., "optimizer_state_dict":
# ...} (the PyTorch tutorials) or {"model": ...}; the weights are the same state_dict one level down.
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model")
# The model's keys one level down in a training wrapper: nn.DataParallel and DistributedDataParallel
# ("module."), torch.compile ("_orig_mod."), the attribute of a LightningModule that holds the network
# ("model.", "net.", ... whatever its author named it), or several of these ("module._orig_mod.").
PREFIX_DEPTH = 3


def _unwrap(state: Any) -> Any:
    for key in WRAPPER_KEYS:
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            return state[key]
    return state


def _model_keys(keys: Any) -> set[str]:
    return {k for k in keys if not k.endswith(BN_COUNTER)}


def _strip_prefix(state: dict[str, Any], own: dict[str, Any], path: Path) -> dict[str, Any]:
    """The model's weights in a checkpoint whose keys carry a wrapper's prefix, else the state as it is.

    A prefix is taken only when the keys under it are exactly the model's, with the same shapes, so
    an unrelated checkpoint still gets the mismatch message. Keys beside it (a loss module's buffers,
    a Lightning metric) are left out; two copies of the model (a network and its EMA, a teacher and
    its student) are refused, since only the user knows which one was meant.
    """
    wanted = _model_keys(own)
    if not wanted or _model_keys(state) >= wanted:
        return state
    prefixes = {prefix for k in state if isinstance(k, str) for depth in range(1, PREFIX_DEPTH + 1)
                if k.count(".") >= depth and k[len(prefix := ".".join(k.split(".")[:depth]) + "."):] in wanted}
    found = {}
    for prefix in sorted(prefixes, key=lambda q: (q.count("."), q)):
        sub = {k[len(prefix):]: v for k, v in state.items() if isinstance(k, str) and k.startswith(prefix)}
        if _model_keys(sub) == wanted and all(getattr(sub[k], "shape", None) == own[k].shape for k in wanted):
            found[prefix] = sub
    if len(found) > 1:
        first, second = list(found)[:2]
        times = "twice" if len(found) == 2 else f"{len(found)} times"
        raise ValueError(f"checkpoint {path} holds this model's weights {times}, under {first!r} and {second!r} (a "
                         f"network and its EMA copy, say); save the copy to export, as in torch.save({{k[{len(first)}:]: "
                         f"v for k, v in sd.items() if k.startswith({first!r})}}, 'weights.pt') where sd is the "
                         "checkpoint's weights, and pass that file.")
    return next(iter(found.values()), state)


BN_COUNTER = "num_batches_tracked"


def _is_safetensors(path: Path) -> bool:
    """safetensors: an 8-byte little-endian header length, then that many bytes of JSON."""
    with open(path, "rb") as f:
        head = f.read(8)
        size = int.from_bytes(head, "little") if len(head) == 8 else 0
        return 1 < size < path.stat().st_size and f.read(1) == b"{"


def _load_safetensors(path: Path) -> dict[str, Any]:
    """The tensors of a safetensors file: the format Hugging Face and many training scripts save
    weights in (torch.load cannot read it). It holds tensors only, so nothing is unpickled."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, ValueError, TypeError) as e:  # a truncated file, a header that is not its tensors
        raise ValueError(f"checkpoint {path} is a safetensors file that cannot be read ({e}); save the weights "
                         "again.") from e


def _checkpoint_kind(path: Path) -> str:
    """The rest of a sentence for a file that is plainly not a state_dict, else ''.

    An exported graph or a TorchScript archive is what a user often has at hand next to the
    weights; torch.load's own failure on them names neither.
    """
    import zipfile

    with open(path, "rb") as f:
        head = f.read(8)
    # torch.save writes a zip ("PK") or, in the legacy format, a pickle (0x80); an ONNX model starts
    # with its ir_version field (tag 0x08)
    if path.suffix == ".onnx" or head[:1] == b"\x08":
        return ("an ONNX graph, not PyTorch weights; pass the state_dict (.pt) saved from the trained model with "
                "torch.save(model.state_dict(), path).")
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            if any(n.split("/", 1)[-1].startswith("code/") or n.endswith("/constants.pkl") for n in z.namelist()):
                return ("a TorchScript archive (torch.jit.save); save its weights with "
                        "torch.save(torch.jit.load(path).state_dict(), 'weights.pt') and pass that file.")
    return ""


def _torch_load(path: Path) -> Any:
    """torch.load of weights only; a file it cannot read is one sentence."""
    import torch

    try:
        with warnings.catch_warnings():  # torch's own warnings would come before the one sentence
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        if "weights only" in str(e).lower() or "weights_only" in str(e):
            raise ValueError(
                f"checkpoint {path} holds pickled Python objects (a whole model saved with torch.save(model), "
                "say), which edge3d does not unpickle because unpickling runs code; load it where you trust "
                "it and save model.state_dict() instead."
            ) from e
        raise ValueError(f"checkpoint {path} cannot be read by torch.load ({type(e).__name__}); "
                         "save it with torch.save(model.state_dict(), path).") from e


def load_checkpoint(model: nn.Module, path: str | Path, what: str = "the model") -> None:
    """Load a ``state_dict`` file strictly; a mismatch is one sentence naming keys and the fix.

    A training checkpoint that wraps the state_dict (``WRAPPER_KEYS``), or whose keys carry a
    wrapper's prefix (DataParallel's ``module.``, torch.compile's ``_orig_mod.``, a LightningModule's
    attribute), is accepted as it is, since that is what most users have."""
    import torch

    path = Path(path)
    if path.is_dir():
        raise ValueError(f"checkpoint {path} is a folder; pass the file saved with "
                         "torch.save(model.state_dict(), path).")
    if not path.is_file():
        what = "is not a regular file" if path.exists() else "does not exist"
        raise ValueError(f"checkpoint {path} {what}; pass the path of a saved state_dict.")
    safetensors = _is_safetensors(path)
    kind = "" if safetensors else _checkpoint_kind(path)
    if kind:
        raise ValueError(f"checkpoint {path} is {kind}")
    state = _load_safetensors(path) if safetensors else _torch_load(path)
    state = _unwrap(state)
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint {path} holds a {type(state).__name__}, not a state_dict.")
    if state and not any(isinstance(v, torch.Tensor) for v in state.values()):
        # a training checkpoint under a key edge3d does not know ('net', 'ema', ...): name where the
        # weights are instead of listing every model key as missing
        holders = [k for k, v in state.items()
                   if isinstance(v, dict) and any(isinstance(t, torch.Tensor) for t in v.values())]
        keys = ", ".join(map(str, list(state)[:6])) + (", ..." if len(state) > 6 else "")
        hint = (f"the weights look to be under {holders[0]!r}: save them with "
                f"torch.save(checkpoint[{holders[0]!r}], 'weights.pt') and pass that file"
                if holders else "save the model's weights with torch.save(model.state_dict(), path)")
        raise ValueError(f"checkpoint {path} holds no tensors at its top level (its keys: {keys}); {hint}.")
    own = model.state_dict()
    state = _strip_prefix(state, own, path)
    # BatchNorm's batch counter matters only to training with momentum=None; checkpoints saved by
    # parameter-only or EMA code, or converted from other frameworks, often lack it. Keep the model's.
    state = {**{k: v for k, v in own.items() if k.endswith(BN_COUNTER) and k not in state}, **state}
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    not_tensors = [k for k in own if k in state and not isinstance(state[k], torch.Tensor)]
    if not_tensors:
        k = not_tensors[0]
        raise ValueError(f"checkpoint {path} holds a {type(state[k]).__name__} for {k!r}, not a tensor; "
                         "save it with torch.save(model.state_dict(), path).")
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} shape mismatches (e.g. {k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)})")
        raise ValueError(
            f"checkpoint {path} does not match {what}: {', '.join(parts)}; pass the checkpoint saved from "
            "this model with the same --classes/--width/--head."
        )
    model.load_state_dict(state)


def _factory_kwargs(spec: str, factory: Any, options: dict[str, Any], labelled: int | None = None) -> dict[str, Any]:
    """The options a user factory takes. An option given but not taken is an error, as for the zoo,
    except ``frame_size``: it also sets the export's frame shape, which any model needs. ``labelled``
    (the count of --labels names) is passed as ``num_classes`` only where the factory takes one."""
    from .zoo import SIZE_OPTIONS

    flags = {**SIZE_OPTIONS, "head": "--head"}
    params = pyinspect.signature(factory).parameters
    accepts_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    given = {k: v for k, v in options.items() if v is not None}
    for k in given:
        if not accepts_any and k not in params and k != "frame_size":
            raise ValueError(f"{spec} takes no {k} option, so {flags[k]} would be ignored; drop {flags[k]}, or add "
                             f"a {k} parameter to the factory.")
    kwargs = {k: v for k, v in given.items() if accepts_any or k in params}
    if labelled is not None and "num_classes" not in kwargs and (accepts_any or "num_classes" in params):
        kwargs["num_classes"] = labelled
    needed = [p.name for p in params.values() if p.default is p.empty and p.name not in kwargs
              and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if needed:
        raise ValueError(f"{spec} needs an argument {needed[0]!r} that edge3d cannot pass; give it a default "
                         "(edge3d passes only num_classes, frame_size, width and head, from the flags).")
    return kwargs


def check_channels(channels: int | None) -> None:
    if channels is not None and not (isinstance(channels, int) and not isinstance(channels, bool) and channels > 0):
        raise ValueError(f"--channels must be a positive integer, got {channels!r}; leave it out to take the "
                         "model's first convolution's.")


def frame_channels(model: nn.Module, channels: int | None = None) -> int:
    """The channels per frame: ``--channels``, else the model's ``frame_channels`` attribute, else the
    ``in_channels`` of its first convolution (in registration order, the stem in every usual model),
    else 3. A grey, thermal or depth camera model (1 channel) then exports without a flag; a wrong
    guess fails the step's shape check, whose message names --channels."""
    check_channels(channels)
    if channels is not None:
        return channels
    own = getattr(model, "frame_channels", None)
    if isinstance(own, int) and not isinstance(own, bool) and own > 0:
        return own
    for m in model.modules():
        c = getattr(m, "in_channels", None)
        if isinstance(c, int) and not isinstance(c, bool) and c > 0:
            return c
    return 3


def model_options(model: nn.Module, **given: Any) -> dict[str, Any]:
    return {k: v for k, v in given.items() if v is not None}
