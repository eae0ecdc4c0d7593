"""The frame rate a temporal model was trained at, and which of a faster source's frames it takes.

A causal temporal model learns motion per frame. Trained on every 5th frame of 30 fps video (VoV3D's
Kinetics-400 recipe samples 16 frames at a temporal stride of 5; D3D's Jester clips were downsampled by
2), it sees a 30 fps camera's motion 5× slower than anything it was trained on if it is given every
frame; VoV3D (Fig. 5) measures the accuracy lost when the test stride differs from the training one.
An artifact may therefore carry the rate its frames were sampled at (``frame.fps``), and whoever feeds
it (``edge3d run``, ``compare``, calibration, the camera app, or an app of your own) takes only the
source frames nearest to that rate's ticks. ``Session.step`` steps whatever it is given: the choice is
the caller's, because only the caller knows the source's rate.
"""

from __future__ import annotations

import math
import shlex
from collections.abc import Iterable
from fractions import Fraction

MAX_FPS = 240.0  # above this a reported rate is a stream's clock, not its frames
# A source up to this much faster than the model's rate gives every frame: dropping one frame in 25
# for a 25 fps camera and a 24 fps model jolts the motion more than a 4% faster tempo changes it.
SLACK = 1.1


def check_fps(fps: object, what: str = "frame fps", images: bool = False) -> float | None:
    """A model's frame rate as the manifest keeps it: a positive number of frames a second, or None
    (every frame the source gives) for None or "source"; with ``images``, the rate folders of images
    were extracted at (a number)."""
    if fps is None or (fps == "source" and not images):
        return None
    try:
        value = float(fps) if not isinstance(fps, bool) else math.nan
    except (TypeError, ValueError):
        value = math.nan
    if not 0 < value <= MAX_FPS:  # NaN fails too
        raise ValueError(f"{what} {fps!r} is not a frame rate above 0 and up to {MAX_FPS:g}: " + (
            "give the frames a second the images were extracted at (30, say)." if images else
            "give the frames a second the model was trained on (every 5th frame of 30 fps video is 6), or source to "
            "step every frame the source gives."))
    return value


def check_images_fps(images_fps: object, manifest: dict, artifact: object, flag: str = "--images-fps") -> float | None:
    """The rate folders of images were extracted at (`run` and `compare --images-fps`, `export
    --calib-images-fps`), refused where the artifact has no frame rate to pace them to: the flag would do
    nothing there."""
    if images_fps is None:
        return None
    value = check_fps(images_fps, flag, images=True)
    if manifest["frame"].get("fps") is None:
        raise ValueError(f"{flag} paces folders of images to the artifact's frame rate, and {artifact} has "
                         f"none (every frame is stepped); set the rate its model was trained at with `edge3d export "
                         f"{shlex.quote(str(artifact))} --fps N`, or drop {flag}.")
    return value


class FrameSampler:
    """Which frames of a source sending ``source_fps`` a model trained at ``fps`` takes: call
    :meth:`keep` once per source frame, in order, and step the frames it says yes to.

    Frame ``i`` is kept when a tick of the model's rate falls in ``(t_{i-1}, t_i]``: every 5th frame of
    30 fps for a 6 fps model, 6 frames in every 25 (gaps of 4 and 5) of 25 fps. Every frame is kept
    when either rate is unknown (None) or the source is no more than ``SLACK`` faster; a slower source
    cannot be sped up, and :func:`rate_note` says so.
    """

    def __init__(self, fps: float | None, source_fps: float | None) -> None:
        self.fps, self.source_fps = fps, source_fps
        fast = fps is not None and source_fps is not None and source_fps > SLACK * fps
        self.ratio = fps / source_fps if fast else None  # the share of the source's frames kept
        self.read = 0  # source frames seen
        self.kept = 0  # of them, the frames to step
        self.index = -1  # the source index of the last frame kept

    def keep(self) -> bool:
        i, self.read = self.read, self.read + 1
        r = self.ratio
        # integer tick counts, with a hair of slack so that 5 × 0.2 counts as 1, not 0.9999999
        take = r is None or i == 0 or math.floor(i * r + 1e-9) > math.floor((i - 1) * r + 1e-9)
        if take:
            self.kept += 1
            self.index = i
        return take


def rate_note(samplers: Iterable[FrameSampler], fps: float | None) -> str | None:
    """How the sources' frames met the model's rate, for `edge3d run`'s summary, `compare`'s report and
    the camera app; None where the artifact has no rate. Sources that report no rate (frame folders,
    the synthetic source) are stepped frame by frame, which the note says, since it may be wrong."""
    if fps is None:
        return None
    samplers = [s for s in samplers if s.read]
    said = [f"the model takes {fps:g} fps"]
    known = [(s, s.source_fps) for s in samplers if s.source_fps is not None]
    fast = [s for s, _ in known if s.ratio is not None]
    if fast:
        rates = sorted({round(rate, 2) for s, rate in known if s.ratio is not None})
        of = f"{rates[0]:g}" if len(rates) == 1 else f"{rates[0]:g}–{rates[-1]:g}"
        read, kept = sum(s.read for s in fast), sum(s.kept for s in fast)
        share = Fraction(fps / rates[0]).limit_denominator(60)  # of the rate, not of the counts: a run cut short
        stride = (f"{kept / read:.0%} of the frames" if len(rates) > 1 else
                  f"every {_ordinal(share.denominator)} frame" if share.numerator == 1 else
                  f"{share.numerator} in every {share.denominator} frames")
        said.append(f"{stride} of {of} fps ({kept:,} of {read:,} frames stepped)")
    unpaced = [rate for s, rate in known if s.ratio is None]  # about the model's rate, or slower
    if any(rate * SLACK >= fps for rate in unpaced):
        said.append("a source sends about that: every frame stepped")
    if slow := [rate for rate in unpaced if rate * SLACK < fps]:
        rate = min(slow)
        said.append(f"a source sends {rate:g} fps, under it: every frame stepped, so the model sees motion "
                    f"{fps / rate:.2g}× as fast per frame as in training")
    if any(s.source_fps is None for s in samplers):
        said.append("a source that reports no frame rate (a folder of images, synthetic) had every frame stepped, "
                    "as if sent at the model's rate")
    return "; ".join(said) if len(said) > 1 else None


def _ordinal(n: int) -> str:
    return f"{n}{'th' if 10 <= n % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"
