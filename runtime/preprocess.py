"""Frame preprocessing from the manifest's frame spec (numpy only).

Cameras give H×W×3 uint8 frames; the step graph wants 3×H×W float32, resized and normalised
exactly as at training time. Doing it here keeps every app and backend consistent.
"""

from __future__ import annotations

import contextlib
import io
import math
import numbers
import os
import shlex
import sys
import warnings
from typing import Any

import numpy as np

_CV2: dict[str, Any] = {}  # the import's outcome, once per process: "module", or "error" (None: not installed)


def optional_cv2() -> Any:
    """OpenCV, or None where it cannot be imported; tried once per process.

    An OpenCV built against NumPy 1.x under NumPy 2 (JetPack 6's, once pip has put NumPy 2 in the
    venv) fails to import after NumPy prints some twenty lines and a stack to stderr. ``resize``
    tried the import for every frame, so a camera app printed that block thirty times a second.
    The attempt's stderr is kept out of the terminal; :func:`cv2_import_error` says what went wrong.
    """
    if "module" not in _CV2:
        said = io.StringIO()
        try:
            with contextlib.redirect_stderr(said):
                import cv2
            _CV2.update(module=cv2, error=None)
        except ImportError as e:
            _CV2.update(module=None, error=None if getattr(e, "name", None) == "cv2" and
                        isinstance(e, ModuleNotFoundError) else _cv2_failure(e, said.getvalue()))
    return _CV2["module"]


def cv2_import_error() -> str | None:
    """Why an installed OpenCV cannot be imported, with the fix; None when it imports or is not installed."""
    optional_cv2()
    return _CV2["error"]


def _cv2_failure(e: ImportError, said: str) -> str:
    if "NumPy 1.x" in said or "_ARRAY_API" in str(e) or "numpy.core.multiarray failed to import" in str(e):
        return (f"the installed OpenCV was built against NumPy 1.x, and this environment has NumPy {np.__version__}; "
                "pip install 'numpy<2' (JetPack's OpenCV, the one with GStreamer for CSI cameras, is such a build), "
                "or an OpenCV built for NumPy 2")
    return f"the installed OpenCV cannot be imported ({e}); reinstall it"


def _area_axis0(f: np.ndarray, dst: int) -> np.ndarray:
    """Area-average axis 0 of ``f`` down to ``dst``: each output is the mean of the source pixels
    under its footprint, a partly covered pixel weighted by the part covered (OpenCV's INTER_AREA).

    Only the ceil(scale) + 1 source pixels an output can touch are gathered, so a 1080p camera
    frame costs a few million multiply-adds rather than a dense 1080×112 matrix product.
    """
    src = f.shape[0]
    scale = src / dst
    lo = np.arange(dst) * scale
    j = np.floor(lo).astype(np.int64)[:, None] + np.arange(int(math.ceil(scale)) + 1)[None, :]
    w = np.clip(np.minimum(lo[:, None] + scale, j + 1) - np.maximum(lo[:, None], j), 0, None) / scale
    return np.einsum("dk,dk...->d...", w.astype(np.float32), f[np.minimum(j, src - 1)])


def resize(frame: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize an H×W×C image the way OpenCV does, with or without OpenCV installed.

    Shrinking averages areas (INTER_AREA), anything else is bilinear (INTER_LINEAR). Without
    OpenCV (a runtime-only install on a device) the same two methods run in numpy, within one
    grey level of OpenCV's result, because a model's predictions should not depend on which
    optional package is installed: a bilinear shrink of a 640×480 frame to 112×112 reads 4 of the
    ~24 pixels under each output pixel and aliases; on 64×64 noise frames it moved the gesture
    model's logits by up to 2.9.
    """
    h, w = frame.shape[:2]
    if (h, w) == (height, width):
        return frame
    cv2 = optional_cv2()
    if cv2 is not None:
        interp = cv2.INTER_AREA if (height < h and width < w) else cv2.INTER_LINEAR
        out = cv2.resize(frame, (width, height), interpolation=interp)
        return out[..., None] if out.ndim < frame.ndim else out  # OpenCV drops a single channel's axis
    f = frame.astype(np.float32)
    if height < h and width < w:
        out = np.moveaxis(_area_axis0(np.moveaxis(_area_axis0(f, height), 1, 0), width), 0, 1)
        if frame.dtype == np.uint8 and h % height == 0 and w % width == 0:
            out = np.floor(out + (0.5 + 1e-4))  # OpenCV's whole-block path rounds halves up, not to even
    else:
        ys = (np.arange(height) + 0.5) * h / height - 0.5
        xs = (np.arange(width) + 0.5) * w / width - 0.5
        y0 = np.clip(np.floor(ys).astype(int), 0, h - 1)
        x0 = np.clip(np.floor(xs).astype(int), 0, w - 1)
        y1, x1 = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
        wy = np.clip(ys - y0, 0, 1)[:, None, None]
        wx = np.clip(xs - x0, 0, 1)[None, :, None]
        top = f[y0][:, x0] * (1 - wx) + f[y0][:, x1] * wx
        bot = f[y1][:, x0] * (1 - wx) + f[y1][:, x1] * wx
        out = top * (1 - wy) + bot * wy
    return np.clip(out.round(), 0, 255).astype(np.uint8) if frame.dtype == np.uint8 else out.astype(frame.dtype)


# How a camera frame of another aspect ratio becomes the model's H×W: "stretch" resizes the whole frame
# (a 16:9 frame is squeezed into a square model's), "crop" first takes the largest centred region of the
# model's aspect ratio, as models trained on centre crops (most Kinetics and UCF101 recipes) saw them, and
# "crop:F" the centre F of that region, as a recipe that resizes the short side to 256 and crops 224 does
# (F = 0.875).


def parse_fit(fit: object) -> float | None:
    """The crop fraction of a fit: None for stretch, 1 for crop, F for crop:F; ValueError otherwise."""
    if fit == "stretch":
        return None
    text = fit if isinstance(fit, str) else ""
    mode, _, fraction = text.partition(":")
    try:
        f = float(fraction) if fraction else 1.0
    except ValueError:
        f = math.nan
    if mode != "crop" or not 0 < f <= 1:
        raise ValueError(f"fit {fit!r} is not stretch, crop or crop:F with F in (0, 1]: stretch resizes the whole "
                         "frame to the model's size, crop first cuts the centre of the model's aspect ratio out of "
                         "it, crop:0.875 the centre 87.5% of that (a short side resized to 256, then 224 cropped).")
    return f


def check_fit(fit: object, what: str = "frame fit") -> str:
    """The fit, written one way ("crop:1" is "crop"): the manifest's, compared as text."""
    try:
        f = parse_fit(fit)
    except ValueError as e:
        raise ValueError(f"{what} {str(e)[len('fit '):]}") from None
    return "stretch" if f is None else "crop" if f == 1 else f"crop:{f:g}"


# The channel order a three-channel model was trained on. Frames reach the runtime as RGB whatever it is
# (edge3d run and the camera app convert OpenCV's BGR); a model trained on frames read with OpenCV and
# never converted wants BGR, and the runtime reverses the channels for it after the resize.
COLOR_ORDERS = ("RGB", "BGR")


def check_color(color: object, channels: int, what: str = "frame color") -> str:
    """A three-channel model's channel order, upper-cased; other channel counts have no choice."""
    order = color.upper() if isinstance(color, str) else color
    if channels != 3:
        raise ValueError(f"{what} {color!r} applies to a three-channel (RGB or BGR) model; this one takes "
                         f"{channels} channel{'s' if channels != 1 else ''}, so leave it out.")
    if order not in COLOR_ORDERS:
        raise ValueError(f"{what} {color!r} is not RGB or BGR: BGR is for a model trained on frames read with "
                         "OpenCV and never converted to RGB.")
    return str(order)


def centre_box(h: int, w: int, height: int, width: int, fraction: float = 1.0) -> tuple[int, int, int, int]:
    """(top, left, rows, columns) of the centred region of an h×w image with the aspect ratio
    ``width / height`` and ``fraction`` of the largest such region's sides, rounded to whole pixels."""
    if w * height > h * width:  # wider than the model's frame: cut the sides
        rows, cols = h, h * width / height
    else:  # taller (or the same): cut top and bottom
        rows, cols = w * height / width, w
    rows, cols = max(1, round(rows * fraction)), max(1, round(cols * fraction))
    return (h - rows) // 2, (w - cols) // 2, rows, cols


def centre_crop(frame: np.ndarray, height: int, width: int, fraction: float = 1.0) -> np.ndarray:
    """:func:`centre_box`'s region of ``frame`` (H×W×...), as a view; a frame already of that aspect is
    returned whole by ``fraction`` 1."""
    top, left, rows, cols = centre_box(frame.shape[0], frame.shape[1], height, width, fraction)
    return frame[top:top + rows, left:left + cols]


def fit_note(sizes: set[tuple[int, int]], frame_spec: dict[str, Any], artifact: object) -> str | None:
    """How images of these (height, width) sizes (a session's ``pre.sizes``) become the model's frame,
    where their aspect ratio is not the model's; None where it is. A square model fed a 16:9 camera sees everything squeezed
    1.78× across unless its artifact crops, and nothing else in a run says so: `edge3d run`'s summary
    and the camera app print this."""
    h, w = int(frame_spec["height"]), int(frame_spec["width"])
    fraction = parse_fit(frame_spec.get("fit", "stretch"))
    crop = fraction is not None
    said = []
    others = [(sh, sw) for sh, sw in sorted(sizes) if abs(math.log((sw / sh) / (w / h))) >= 0.02]  # 2% or more off
    for sh, sw in others[:2]:  # a dataset of clips of many sizes (Kinetics') gets two examples and a count
        squeeze = (sw / sh) / (w / h)
        images = f"{sw}×{sh}{'' if said else ' (width×height)'} images"
        if crop:
            ch, cw = centre_box(sh, sw, h, w, fraction)[2:]
            said.append(f"{images} cut to their centre {cw}×{ch}, then resized to the model's {w}×{h}")
        else:
            said.append(f"{images} resized whole to the model's {w}×{h}, squeezed "
                        f"{max(squeeze, 1 / squeeze):.2f}× {'across' if squeeze > 1 else 'top to bottom'}")
    if not said:
        return None
    if len(others) > 2:
        said.append(f"and so on for images of {len(others) - 2} other sizes")
    fix = "" if crop else (f"; if the model was trained on centre crops, `edge3d export {shlex.quote(str(artifact))} "
                           "--fit crop` cuts the centre instead")
    return "; ".join(said) + fix


def check_normalisation(mean: object, std: object, channels: int) -> None:
    """Refuse a mean or std that would feed the model frames unlike its training frames.

    Both exporting and loading an artifact check it: a zero std made every frame infinite, and
    the common ImageNet mean in 0–255 form (123.7, 116.3, 103.5) under this 0–1 formula shifted
    every input far off the range the model learnt, with no error anywhere.
    """
    checked = {}
    for label, values in (("mean", mean), ("std", std)):
        seq = list(values) if isinstance(values, (list, tuple, np.ndarray)) else None
        if seq is None or len(seq) != channels or not all(
                isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) for v in seq):
            count = "one finite number, for its one channel" if channels == 1 else \
                f"{channels} finite numbers, one per channel"
            raise ValueError(f"frame {label} {values!r} must be {count}.")
        checked[label] = tuple(float(v) for v in seq)
    if not all(v > 0 for v in checked["std"]):
        raise ValueError(f"frame std {checked['std']} must be positive in every channel.")
    if any(v > 1 for v in checked["mean"]):
        raise ValueError(f"frame mean {checked['mean']} is on the 0–255 scale, but edge3d normalises "
                         "(pixel / 255 - mean) / std; divide the mean and std by 255.")


def _layout_hint(shape: tuple[int, ...], c: int) -> str:
    """The conversion for the layouts a camera or image library hands over instead of H×W×3 RGB:
    the shape alone says which, and a user staring at "(480, 640, 4)" wants the one line."""
    if c != 3 or 0 in shape:
        return ""
    if len(shape) == 2 or (len(shape) == 3 and shape[2] == 1):
        return "; this is a grey frame: make it RGB with cv2.cvtColor(frame, cv2.COLOR_GRAY2RGB)"
    if len(shape) == 3 and shape[2] == 4:
        return ("; this frame has an alpha channel: pass frame[..., :3] (cv2.COLOR_BGRA2RGB if it came from "
                "OpenCV)")
    if len(shape) == 3 and shape[0] == 3:
        return "; this frame is channels first: pass frame.transpose(1, 2, 0)"
    if len(shape) == 4 and shape[3] == 3:
        return "; this is a batch of frames: pass one (frames[0]), or one per stream to step_batch"
    return ""


# ITU-R BT.601 luma, as OpenCV's RGB2GRAY: an RGB frame for a one-channel (grey) model
LUMA = np.array([0.299, 0.587, 0.114], np.float32)


def _outside_runtime() -> int:
    """The stacklevel of the first caller outside the runtime package: a warning points at the user's
    `step()` line, whichever of step, step_batch and their lock wrapper led to it."""
    here = os.path.dirname(os.path.abspath(__file__))
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(here + os.sep):
        frame, level = frame.f_back, level + 1
    return level


class FrameScaleWarning(UserWarning):
    """A float frame far outside the range normalised pixels span: probably 0-255 pixels, not normalised."""


class FramePreprocessor:
    """Turns one raw frame into the graph's normalised (C, H, W) float32 input, validating it."""

    def __init__(self, frame_spec: dict) -> None:
        self.channels = int(frame_spec["channels"])
        self.height, self.width = int(frame_spec["height"]), int(frame_spec["width"])
        mean = np.asarray(frame_spec.get("mean", [0.0] * self.channels), np.float32)  # checked at load
        std = np.asarray(frame_spec.get("std", [1.0] * self.channels), np.float32)
        self.crop = parse_fit(frame_spec.get("fit", "stretch"))  # the crop fraction, or None; both checked at load
        self.bgr = self.channels == 3 and frame_spec.get("color") == "BGR"
        self.scale = (1.0 / (255.0 * std)).reshape(-1, 1, 1)
        self.offset = (mean / std).reshape(-1, 1, 1)
        # The span of normalised pixels (pixel 0 or 255, any channel). A float frame far beyond it is
        # most likely 0-255 pixels cast with astype(np.float32), which pass every shape check and
        # stream confident garbage: warned about, once, not refused, since the float path is also how
        # 16-bit thermal or depth frames reach a model trained on values of its own scale. 16x leaves
        # room for frames normalised with other statistics, or augmented; a dark frame slips under it.
        self.span = (float((-mean / std).min()), float(((1.0 - mean) / std).max()))
        self.limit = 16.0 * max(abs(v) for v in self.span)
        self.warned = False
        self.sizes: set[tuple[int, int]] = set()  # (height, width) of the images stepped, for fit_note

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.channels, self.height, self.width)

    def _fitted(self, frame: np.ndarray) -> np.ndarray:
        return frame if self.crop is None else centre_crop(frame, self.height, self.width, self.crop)

    def __call__(self, frame: np.ndarray, out: np.ndarray) -> None:
        """Write the preprocessed frame into ``out`` (C, H, W); raise ValueError on bad input."""
        if not isinstance(frame, np.ndarray):
            kind = type(frame)
            # the runtime never imports torch, so a tensor is recognised by its module's name
            fix = ("pass frame.cpu().numpy()" if kind.__module__.split(".")[0] == "torch"
                   else "pass np.asarray(frame, np.uint8) for an image, np.float32 for a normalised one"
                   if isinstance(frame, (list, tuple))
                   else "pass np.asarray(frame)" if hasattr(frame, "__array__")  # a PIL image, say
                   else "pass an H×W×3 uint8 image or a normalised float32 array")
            raise ValueError(f"frame must be a numpy array, got {kind.__name__}; {fix}.")
        c, h, w = self.shape
        if frame.dtype == np.uint8:
            if c == 1 and 0 not in frame.shape and (frame.ndim == 2 or (frame.ndim == 3 and frame.shape[2] in (1, 3))):
                # a grey model takes a grey frame, or an RGB camera's, converted (resized first: cheaper)
                self.sizes.add(frame.shape[:2])
                img = resize(self._fitted(frame if frame.ndim == 3 else frame[..., None]), h, w)
                grey = img @ LUMA if img.shape[2] == 3 else img[..., 0]
                np.multiply(grey, self.scale[0], out=out[0], casting="unsafe")
                out -= self.offset
                return
            if frame.ndim != 3 or frame.shape[2] != c or 0 in frame.shape:
                expected = {3: "H×W×3 (RGB)", 1: "H×W (grey) or H×W×3 (RGB, converted to grey)"}.get(c, f"H×W×{c}")
                raise ValueError(
                    f"uint8 frame has shape {frame.shape}; expected {expected}, any size "
                    "(it is resized), or a normalised float32 array of shape "
                    f"{(c, h, w)}{_layout_hint(frame.shape, c)}."
                )
            self.sizes.add(frame.shape[:2])
            img = resize(self._fitted(frame), h, w)
            if self.bgr:
                img = img[..., ::-1]  # a view: the multiply below reads it in place
            np.multiply(img.transpose(2, 0, 1), self.scale, out=out, casting="unsafe")
            out -= self.offset
            return
        if frame.dtype.kind == "f" and not frame.dtype.isnative:  # big-endian, as read from some files
            frame = frame.astype(frame.dtype.newbyteorder("="))
        if frame.dtype not in (np.float32, np.float16, np.float64):
            raise ValueError(
                f"frame dtype {frame.dtype} is not supported; pass H×W×{c} uint8 or normalised "
                f"float32 of shape {(c, h, w)}."
            )
        if frame.shape != (c, h, w):
            hint = ("; if it is normalised already, frame.transpose(2, 0, 1) puts its channels first"
                    if frame.shape == (h, w, c) else "")
            raise ValueError(
                f"float frame has shape {frame.shape}; expected normalised {(c, h, w)} "
                f"(or pass an H×W×{c} uint8 image to have it resized and normalised){hint}."
            )
        # Check the copy, not the caller's array: the check then sees what the graph will see, so a
        # float64 value beyond the float32 range (finite before the cast, inf after it) is rejected
        # instead of reaching the state. ``out`` holds no state; the next call overwrites it.
        with np.errstate(over="ignore", invalid="ignore"):
            np.copyto(out, frame, casting="unsafe")
        low, high = float(out.min()), float(out.max())  # NaN propagates through both, Inf reaches one
        if not (math.isfinite(low) and math.isfinite(high)):
            raise ValueError(f"frame contains NaN or Inf, or values beyond the {out.dtype} range; pass finite "
                             "values (the stream's state is unchanged).")
        if max(-low, high) > self.limit and not self.warned:
            self.warned = True
            warnings.warn(
                f"float frame holds values from {low:.4g} to {high:.4g}, far beyond the {self.span[0]:.3g} to "
                f"{self.span[1]:.3g} that normalised pixels span: if these are 0-255 pixels, pass the H×W×{c} "
                "uint8 image, which step() resizes and normalises, or normalise it first as (pixel / 255 - mean) "
                "/ std with the manifest's frame mean and std; if the model takes values of this scale, export it "
                "with a frame_mean and frame_std that describe them. (Said once per session.)",
                FrameScaleWarning, stacklevel=_outside_runtime())
