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
from collections import deque
from collections.abc import Iterable
from fractions import Fraction

MAX_FPS = 240.0  # above this a reported rate is a stream's clock, not its frames
# A source up to this much faster than the model's rate gives every frame: dropping one frame in 25
# for a 25 fps camera and a 24 fps model jolts the motion more than a 4% faster tempo changes it.
SLACK = 1.1
GAPS = 30  # a source's rate is measured over its last this many gaps between timestamps


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

    The model's ticks fall every ``1 / fps`` seconds from the first frame, and each tick takes the source
    frame nearest it: every 5th frame of 30 fps for a 6 fps model, 6 frames in every 25 (gaps of 4 and
    5) of 25 fps. A frame's time is its timestamp where the caller gives one (a video's presentation
    time, a camera's capture time), else its index over ``source_fps``. Timestamps are what make the
    pace right where the reported rate is wrong: a phone's variable-rate video, or a webcam that reports
    30 fps and sends 15 in dim light (taking every 5th of its frames would give a 6 fps model 3 a
    second). Every frame is kept when either rate is unknown (None), or the source is no more than
    ``SLACK`` faster: by its timestamps, measured over its last ``GAPS`` gaps, once it has given three
    in a row, else by the rate it reports. A slower source cannot be sped up, and :func:`rate_note` says so.
    """

    def __init__(self, fps: float | None, source_fps: float | None) -> None:
        self.fps, self.source_fps = fps, source_fps
        fast = fps is not None and source_fps is not None and source_fps > SLACK * fps
        self.ratio = fps / source_fps if fast else None  # the share of the reported rate's frames kept
        self.read = 0  # source frames seen
        self.kept = 0  # of them, the frames to step
        self.index = -1  # the source index of the last frame kept
        self._t: float | None = None  # the time of the last frame read, seconds
        self._due = 0.0  # the model's next tick
        self._stamps: deque[float] = deque(maxlen=GAPS + 1)  # the last timestamps the caller gave, in a row

    @property
    def measured_fps(self) -> float | None:
        """The rate the source's timestamps show over its last ``GAPS`` gaps (None before it has given
        three in a row): their mean, over which a camera's jitter cancels, and a median's does not."""
        stamps = self._stamps
        return (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) >= 3 else None

    @property
    def rate(self) -> float | None:
        """The source's rate as the pacing sees it: measured from its timestamps (to 0.1 fps) where they
        differ from the reported rate by more than 2% (or it reports none), else the reported rate."""
        measured, reported = self.measured_fps, self.source_fps
        if measured is None or (reported is not None and abs(measured - reported) <= 0.02 * reported):
            return reported
        return round(measured, 1)

    def keep(self, t: float | None = None) -> bool:
        """Whether to step this source frame; ``t`` is its timestamp in seconds where the source has
        one. A timestamp that is missing, repeats or goes back counts one frame at the source's rate."""
        i, self.read = self.read, self.read + 1
        last = self._t
        if t is not None and math.isfinite(t) and (last is None or t > last):
            self._stamps.append(t)
        else:
            rate = self.measured_fps or self.source_fps
            self._stamps.clear()  # the mean is over timestamps in a row
            if rate is None:  # no clock at all: every frame, as from a source of unknown rate
                return self._take(i)
            t = 0.0 if last is None else last + 1 / rate
        self._t = t
        if self.fps is None:  # every frame; the timestamps still measure the source's rate (rate_note, run)
            return self._take(i)
        rate = self.rate
        period = 1 / self.fps
        if i == 0 or rate is None or rate <= SLACK * self.fps:
            self._due = t + period  # every frame; ticks resume from here if the source speeds up
            return self._take(i)
        half = 0.5 / rate  # a frame is nearest a tick within half its gap: jitter smaller than that moves nothing
        if t < self._due - half - 1e-9:
            return False
        # the next tick after this frame's reach (a gap in the source passes over the ticks in it)
        self._due += period * max(1, math.floor((t + half - self._due) / period) + 1)
        return self._take(i)

    def _take(self, i: int) -> bool:
        self.kept += 1
        self.index = i
        return True


def rate_note(samplers: Iterable[FrameSampler], fps: float | None) -> str | None:
    """How the sources' frames met the model's rate, for `edge3d run`'s summary, `compare`'s report and
    the camera app; None where the artifact has no rate. A source's rate is the one its timestamps
    showed where they differ from the one it reports (:attr:`FrameSampler.rate`). Sources with no rate
    (frame folders, the synthetic source) are stepped frame by frame, which the note says, since it may
    be wrong."""
    if fps is None:
        return None
    samplers = [s for s in samplers if s.read]
    said = [f"the model takes {fps:g} fps"]
    known = [(s, rate) for s in samplers if (rate := s.rate) is not None]
    fast = [(s, rate) for s, rate in known if rate > SLACK * fps]
    if fast:
        rates = sorted({round(rate, 2) for _, rate in fast})
        of = f"{rates[0]:g}" if len(rates) == 1 else f"{rates[0]:g}–{rates[-1]:g}"
        read, kept = sum(s.read for s, _ in fast), sum(s.kept for s, _ in fast)
        share = Fraction(fps / rates[0]).limit_denominator(60)  # of the rate, not of the counts: a run cut short
        stride = (f"{kept / read:.0%} of the frames" if len(rates) > 1 else
                  f"every {_ordinal(share.denominator)} frame" if share.numerator == 1 else
                  f"{share.numerator} in every {share.denominator} frames")
        said.append(f"{stride} of {of} fps ({kept:,} of {read:,} frames stepped)")
    unpaced = [rate for _, rate in known if rate <= SLACK * fps]  # about the model's rate, or slower
    if any(rate * SLACK >= fps for rate in unpaced):
        said.append("a source sends about that: every frame stepped")
    if slow := [rate for rate in unpaced if rate * SLACK < fps]:
        rate = min(slow)
        said.append(f"a source sends {rate:g} fps, under it: every frame stepped, so the model sees motion "
                    f"{fps / rate:.2g}× as fast per frame as in training")
    if len(known) < len(samplers):  # a source with no rate, reported or measured
        said.append("a source that reports no frame rate (a folder of images, synthetic) had every frame stepped, "
                    "as if sent at the model's rate")
    return "; ".join(said) if len(said) > 1 else None


def _ordinal(n: int) -> str:
    return f"{n}{'th' if 10 <= n % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"
