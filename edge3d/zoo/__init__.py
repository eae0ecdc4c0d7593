"""The model zoo: paper architectures made causal, built from code (no downloaded weights).

``build(name, num_classes=..., frame_size=..., width=..., head=...)`` returns a clip-mode
model whose output is (N, num_classes, T): one prediction per frame.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import math
import numbers
import warnings
from dataclasses import dataclass, field
from typing import Any

from ..runtime.manifest import memory_available


@dataclass(frozen=True)
class ZooEntry:
    name: str
    factory: str  # "module:function", imported lazily so listing the zoo needs no torch
    summary: str
    paper: str
    defaults: dict[str, Any] = field(default_factory=dict)
    heads: tuple[str, ...] = ("fc",)


_ENTRIES = [
    ZooEntry("d-resnet18", "edge3d.zoo.resnet:d_resnet", "Dissected 3D ResNet-18 (temporal skip by concat)",
             "dissected-3d-cnns", {"depth": 18, "num_classes": 600}, ("fc", "lstm", "gru")),
    ZooEntry("d-resnet50", "edge3d.zoo.resnet:d_resnet", "Dissected 3D ResNet-50 (bottleneck, conv_last 512)",
             "dissected-3d-cnns", {"depth": 50, "num_classes": 600}, ("fc", "lstm", "gru")),
    ZooEntry("d-resnet101", "edge3d.zoo.resnet:d_resnet", "Dissected 3D ResNet-101",
             "dissected-3d-cnns", {"depth": 101, "num_classes": 600}, ("fc", "lstm", "gru")),
    ZooEntry("rcn-resnet18", "edge3d.zoo.resnet:rcn_resnet18", "ResNet-18 with recurrent conv units (RCN)",
             "recurrent-convolutions-rcn", {"num_classes": 400}, ("fc", "lstm", "gru")),
    ZooEntry("tsm-resnet18", "edge3d.zoo.resnet:tsm_resnet18", "ResNet-18 with online temporal shift",
             "deep-analysis-2d-3d-temporal-modules", {"num_classes": 400}, ("fc", "lstm", "gru")),
    ZooEntry("tam-resnet18", "edge3d.zoo.resnet:tam_resnet18", "ResNet-18 with causal temporal aggregation",
             "deep-analysis-2d-3d-temporal-modules", {"num_classes": 400}, ("fc", "lstm", "gru")),
    ZooEntry("r3d18-causal", "edge3d.zoo.multirate:r3d18_causal",
             "Causal 3D ResNet-18, temporal stride 2 in res3-res5 (multi-rate stages)",
             "adaptive-temporal-feature-resolution-sgs", {"num_classes": 400}),
    ZooEntry("sgs-resnet18", "edge3d.zoo.multirate:sgs_resnet18",
             "SGS paper's 3D ResNet-18 (Table A.1), causal before SGS, SGS after res2, chunk K=8",
             "adaptive-temporal-feature-resolution-sgs", {"num_classes": 400}),
]
ZOO: dict[str, ZooEntry] = {e.name: e for e in _ENTRIES}

# Each paper key as `edge3d zoo` cites it: first authors and a short title. The keys alone, one
# unbroken word each, were cut mid-word at 80 columns ("deep-analysis-2d-3d-temporal-m / odules").
PAPERS = {
    "dissected-3d-cnns": "Köpüklü et al., Dissected 3D CNNs",
    "recurrent-convolutions-rcn": "Singh and Cuzzolin, Recurrent Convolutions for Causal 3D CNNs",
    "deep-analysis-2d-3d-temporal-modules": "Chen et al., Deep Analysis of CNN-based Spatio-temporal "
                                            "Representations",
    "adaptive-temporal-feature-resolution-sgs": "Fayyaz et al., 3D CNNs with Adaptive Temporal Feature "
                                                "Resolutions",
    "vov3d": "Lee et al., Diverse Temporal Aggregation (VoV3D)",
}


def register(entry: ZooEntry) -> None:
    """Add a model to the zoo (used by optional modules such as VoV3D and the gesture demo)."""
    ZOO[entry.name] = entry


def names() -> list[str]:
    _load_optional()
    return list(ZOO)


def _load_optional() -> None:
    for mod in ("edge3d.zoo.vov3d", "edge3d.zoo.gestures"):
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:  # module not written yet, or torch missing
            if e.name not in (mod, "torch"):
                raise


def get(name: str) -> ZooEntry:
    _load_optional()
    if name not in ZOO:
        # a family's short name ("tsm", "vov3d") is a prefix, too far from the full names for difflib
        near = ([n for n in ZOO if n.startswith(name.lower())] if len(name) >= 3 else []) \
            or difflib.get_close_matches(name.lower(), list(ZOO), n=1)
        hint = f"did you mean {' or '.join(map(repr, near))}? " if near else ""
        raise ValueError(f"unknown model {name!r}; {hint}choose one of {', '.join(ZOO)} or pass package.module:factory.")
    return ZOO[name]


# the size options every zoo factory takes, and the CLI flag that sets each
SIZE_OPTIONS = {"num_classes": "--classes", "frame_size": "--size", "width": "--width"}


def check_options(options: dict[str, Any]) -> None:
    """Reject a size option that is not positive before a model is built: a width of -1 or zero
    classes would otherwise build, and a frame size of 0 silently becomes the default."""
    for key, flag in SIZE_OPTIONS.items():
        value = options.get(key)
        if key == "frame_size" and isinstance(value, tuple) and len(value) == 2 and all(
                isinstance(v, int) and v > 0 for v in value):
            continue  # (height, width): `--size 96x128`
        if value is not None and not (isinstance(value, numbers.Real) and math.isfinite(value) and value > 0):
            raise ValueError(f"{key} ({flag}) must be positive, got {value}; leave it out for the model's default.")


def build(name: str, **options: Any) -> Any:
    """Build a zoo model; ``None`` options fall back to the entry's defaults."""
    entry = get(name)
    check_options(options)
    kwargs = dict(entry.defaults)
    kwargs.update({k: v for k, v in options.items() if v is not None})
    if "head" in kwargs and kwargs["head"] not in entry.heads:
        head = kwargs["head"]
        near = f"did you mean {head.lower()!r}? " if isinstance(head, str) and head.lower() in entry.heads else ""
        raise ValueError(f"{name} has no head {head!r}; {near}choose one of {', '.join(entry.heads)}.")
    module, func = entry.factory.split(":")
    factory = getattr(importlib.import_module(module), func)
    params = inspect.signature(factory).parameters.values()
    takes = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    unknown = sorted(set(kwargs) - set(takes))
    if unknown and not any(p.kind is p.VAR_KEYWORD for p in params):
        raise ValueError(f"{name} takes no option {unknown[0]!r}; it takes {', '.join(takes)}.")
    _check_fits_memory(name, factory, kwargs, options)
    return factory(**kwargs)


def _check_fits_memory(name: str, factory: Any, kwargs: dict[str, Any], options: dict[str, Any]) -> None:
    """Refuse a --width or --classes whose weights cannot fit in this machine's memory.

    Weights grow with the square of --width, and "--width 100" (read as a percentage) asks for
    10,000 times the paper's model: building it filled memory for minutes before torch failed
    with a traceback. Building on PyTorch's meta device counts the parameters without allocating
    them.
    """
    given = {k: v for k, v in options.items() if v is not None and k in ("width", "num_classes")}
    available = memory_available()
    if not given or available is None:
        return
    import torch

    try:
        with torch.device("meta"), warnings.catch_warnings():  # a checkpoint loaded onto meta warns
            warnings.simplefilter("ignore")
            model = factory(**kwargs)
    except Exception:  # a factory that cannot build on meta is built for real, as before
        return
    weight_bytes = 4 * sum(p.numel() for p in model.parameters())
    if weight_bytes > available:
        flags = " ".join(f"{SIZE_OPTIONS[k]} {v:g}" if isinstance(v, float) else f"{SIZE_OPTIONS[k]} {v}"
                         for k, v in given.items())
        fix = ("--width multiplies the paper's channel counts (1 is the paper's model, 0.25 a quarter of its "
               "channels), and the weights grow with its square" if "width" in given
               else "--classes is the number of classes the model tells apart")
        raise ValueError(f"{name} with {flags} would hold {weight_bytes / 1e9:,.1f} GB of float32 weights, more than "
                         f"the {available / 1e9:.1f} GB of memory free here; {fix}.")
