"""Frame sources for the CLI: video files, cameras, folders of videos or of images, the synthetic stream.

Every source yields ``(frame, label)``: an H×W×3 uint8 RGB frame and the ground-truth class
index where the source knows it (the synthetic stream), else ``None``. OpenCV is imported
only for files and cameras, so the synthetic source works without the ``video`` extra.
"""

from __future__ import annotations

import itertools
import math
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .runtime.rate import MAX_FPS, FrameSampler

VIDEO_SUFFIXES = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg"}
# network sources OpenCV opens through FFmpeg: IP cameras (RTSP), encoders (RTMP, SRT, UDP), HTTP
STREAM_SCHEMES = ("rtsp", "rtsps", "rtmp", "rtmps", "srt", "udp", "tcp", "http", "https")
# how an error names the sources there are ("source X is neither ...")
SOURCE_FORMS = ("a file, a folder, camera:INDEX, csi:SENSOR, a GStreamer pipeline ending in appsink, a stream URL "
                "(rtsp://, http://, ...) nor synthetic[:SEED]")
# a Jetson CSI camera's capture mode when nothing else is asked for: width, height, frames per second
CSI_MODE = (1280, 720, 30)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


def _cv2():
    """OpenCV, with its own warnings and FFmpeg's turned down to errors and silence.

    A camera that is not there or a file that is not a video otherwise prints two or three lines
    of OpenCV and FFmpeg internals before the one sentence the CLI gives; a user who wants them
    back sets ``OPENCV_LOG_LEVEL`` or ``OPENCV_FFMPEG_LOGLEVEL``, which are left as they are.
    """
    from .runtime.preprocess import cv2_import_error, optional_cv2

    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")  # AV_LOG_QUIET, read when a capture opens
    cv2 = optional_cv2()
    if cv2 is None:
        broken = cv2_import_error()  # installed but not importable: another OpenCV would be the wrong fix
        raise ValueError(f"reading video files, images and cameras needs OpenCV, and {broken} (or use --source "
                         "synthetic)." if broken else
                         "reading video files, images and cameras needs OpenCV; pip install 'edge3d[video]' "
                         "(or use --source synthetic).")
    if "OPENCV_LOG_LEVEL" not in os.environ:
        # cv2.utils.logging is OpenCV 4.10's and later; 4.8 and 4.9 (JetPack 6 ships 4.8) have cv2.setLogLevel,
        # with the same levels (2 is ERROR)
        logging = getattr(getattr(cv2, "utils", None), "logging", None)
        if logging is not None:
            logging.setLogLevel(logging.LOG_LEVEL_ERROR)
        elif hasattr(cv2, "setLogLevel"):
            cv2.setLogLevel(2)
    return cv2


LIVE_GRACE_S = 2.0  # how long a live source may fail its reads before it counts as lost


class SourceLost(RuntimeError):
    """A live source (a camera, a GStreamer pipeline) stopped delivering frames.

    A file ends; a camera does not, so a failed read after the first frames means it was
    unplugged, lost power or hung. It is not a ValueError: the input was good until then.
    """


def capture_frames(cap, lost: str | None = None) -> Iterator[tuple[np.ndarray, None]]:
    """RGB frames from an opened ``cv2.VideoCapture`` until it ends; releases it either way.

    ``lost`` names a live source (e.g. "camera 0"): when its reads stop after at least one
    frame, :class:`SourceLost` is raised instead of ending quietly, so that the app or
    ``edge3d run`` can say so and exit non-zero (a service manager then restarts it). A source
    that gives no frame at all ends quietly, and the caller reports that it gave none.

    A live source also fails a read now and then (an RTSP packet lost, a USB camera's first reads
    while it starts): it is lost only when no read succeeds for ``LIVE_GRACE_S`` seconds. One
    failed read used to end a camera service's run, and its restart dropped every stream's state.
    """
    cv2 = _cv2()
    n = 0
    try:
        while True:
            ok, bgr = cap.read()
            if not ok and lost is not None:
                deadline = time.monotonic() + LIVE_GRACE_S
                while not ok and time.monotonic() < deadline:
                    time.sleep(0.02)
                    ok, bgr = cap.read()
            if not ok:
                if lost is not None and n:
                    raise SourceLost(f"{lost} stopped delivering frames after {n} frames; check its connection.")
                return
            n += 1
            yield cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), None
    finally:
        cap.release()


def capture_clock(cap: Any, live: bool = False) -> Callable[[], float | None]:
    """The time, in seconds, of the frame ``cap`` read last: the capture's own timestamp (a video's or a
    stream's presentation time, a V4L2 camera's capture time), so that a source whose frames come at
    another rate than it reports, or at a varying one, is paced by when they were taken.

    Where the capture gives none that moves forward, a file's frame has None (the sampler counts it one
    frame at the reported rate), and a live source's frame the time its read returned, continuing from
    the last timestamp.
    """
    cv2 = _cv2()
    last: list[float] = []  # the last time given and the monotonic time of that read

    def clock() -> float | None:
        arrived = time.monotonic()
        try:
            stamp = float(cap.get(cv2.CAP_PROP_POS_MSEC)) / 1e3
        except (cv2.error, AttributeError, TypeError, ValueError):  # a capture-like object without get()
            stamp = math.nan
        if math.isfinite(stamp) and (not last or stamp > last[0]):
            t = stamp
        elif not live:
            return None
        else:
            t = last[0] + max(arrived - last[1], 1e-6) if last else 0.0
        last[:] = [t, arrived]
        return t
    return clock


class Paced:
    """The frames of a source that a model trained at ``sampler.fps`` takes (:class:`FrameSampler`), each
    yielded with the source's other frames read past; ``index`` is the source index of the last one.
    ``clock``, called after each frame is read, gives its timestamp where the source has them."""

    def __init__(self, items: Iterator[Any], sampler: FrameSampler,
                 clock: Callable[[], float | None] | None = None) -> None:
        self._items, self.sampler, self._clock = items, sampler, clock

    @property
    def index(self) -> int:
        return self.sampler.index

    def __iter__(self) -> Paced:
        return self

    def __next__(self) -> Any:
        while True:
            item = next(self._items)
            if self.sampler.keep(None if self._clock is None else self._clock()):
                return item

    def close(self) -> None:
        if hasattr(self._items, "close"):
            self._items.close()


def reported_fps(cap: Any) -> float | None:
    """The frame rate a capture reports, or None where it reports none or an implausible one (RTSP
    streams sometimes report 90000, their clock; a folder of images reports nothing)."""
    fps = float(cap.get(_cv2().CAP_PROP_FPS) or 0) if hasattr(cap, "get") else 0.0
    return fps if 1 <= fps <= MAX_FPS else None


def paced(items: Iterator[Any], fps: float | None, source_fps: float | None = None,
          clock: Callable[[], float | None] | None = None) -> Iterator[Any]:
    """``items`` as a model trained at ``fps`` takes them (every frame where ``fps`` is None)."""
    return items if fps is None else Paced(items, FrameSampler(fps, source_fps), clock)


def paced_capture(cap: Any, fps: float | None, label: int | None = None) -> Iterator[Any]:
    """A video file's (or a served file's) frames, each with ``label``, as a model trained at ``fps``
    takes them, paced by their timestamps."""
    frames = capture_frames(cap) if label is None else ((frame, label) for frame, _ in capture_frames(cap))
    return paced(frames, fps, reported_fps(cap), capture_clock(cap))


class LiveFrames:
    """A live source's frames (as :func:`capture_frames` gives them) and the rate it sends them at.

    A camera does not wait for the model: when the model takes fewer frames a second than the camera
    sends, the rest queue up (an RTSP stream's buffers: the predictions fall further and further
    behind the scene) or are dropped by the driver (the model then sees a lower frame rate than the
    camera's, and a temporal model's motion per frame changes). `edge3d run` compares the rate it
    took frames at with ``wanted_fps`` and says so; ``fps`` is None where the source does not report a
    plausible one (:func:`reported_fps`). A model trained at a lower rate than the camera's (``model_fps``)
    takes only the frames :class:`FrameSampler` picks; the others are read and let go.
    """

    def __init__(self, cap: Any, name: str, model_fps: float | None = None) -> None:
        self.fps: float | None = reported_fps(cap)
        self.name = name
        self.waited_s = 0.0  # time spent in reads: waiting for the camera, or decoding
        self._frames = Paced(capture_frames(cap, lost=name), FrameSampler(model_fps, self.fps),
                             capture_clock(cap, live=True))
        self.sampler = self._frames.sampler

    @property
    def wanted_fps(self) -> float | None:
        """The frames a second the model takes of it: the camera's rate, or the model's where lower."""
        return None if self.fps is None else self.fps * (self.sampler.ratio or 1.0)

    @property
    def index(self) -> int:
        return self._frames.index

    def __iter__(self) -> LiveFrames:
        return self

    def __next__(self) -> tuple[np.ndarray, None]:
        t0 = time.perf_counter()
        try:
            return next(self._frames)
        finally:
            self.waited_s += time.perf_counter() - t0

    def close(self) -> None:
        self._frames.close()  # releases the capture


RATE_WINDOW_S = 5.0  # the span over which the rate frames are taken at is compared with a live source's
KEEP_UP = 0.9  # taking fewer than this share of a live source's frames a second is falling behind
WAITING = 0.5  # ... unless reads took this share of the time: then the source sent fewer than it reports


class KeepingUp:
    """Whether a run takes each live source's frames as fast as the source sends them.

    Fed one call per frame taken; the rate is measured over windows of ``RATE_WINDOW_S`` from the
    first frame (a camera's start-up is not counted), and a source is named once, the first time a
    window falls under ``KEEP_UP`` of its rate while the reads took under ``WAITING`` of the window's
    time. A reader that keeps up spends its spare time blocked in reads, waiting for the next frame;
    one that has fallen behind finds frames queued and spends little. The rate alone named a webcam
    that halves its rate in dim light, reporting 30 fps while sending 15, as the model falling behind.
    A file is read as fast as the model goes and is never named.
    """

    def __init__(self, taker: str = "the run", together: bool = False) -> None:
        self.taker = taker  # who took the frames, as the sentence names it
        self.together = together  # several sources stepped in rounds of one frame each: the slowest paces all
        # stream -> [first t, window t, frames at window t, frames, last t, read time at window t]
        self._seen: dict[int, list[float]] = {}
        self.sources: dict[int, LiveFrames] = {}
        self.behind: set[int] = set()  # the streams named as falling behind

    def took(self, stream: int, source: Any, now: float) -> str | None:
        """Record a frame of ``stream`` taken at ``now``; return the sentence to say, once, when it falls behind."""
        if not isinstance(source, LiveFrames) or source.wanted_fps is None:
            return None
        self.sources[stream] = source
        seen = self._seen.get(stream)
        if seen is None:
            self._seen[stream] = [now, now, 1, 1, now, source.waited_s]
            return None
        seen[3] += 1
        seen[4] = now
        if now - seen[1] < RATE_WINDOW_S:
            return None
        rate = (seen[3] - seen[2]) / (now - seen[1])
        waiting = (source.waited_s - seen[5]) / (now - seen[1])
        seen[1], seen[2], seen[5] = now, seen[3], source.waited_s
        if rate >= KEEP_UP * source.wanted_fps or waiting >= WAITING:
            return None
        if stream in self.behind:
            return None
        self.behind.add(stream)
        return (f"{source.name} sends {_sends(source)} frames a second and {self.taker} took {rate:.1f}: the frames it "
                "cannot take queue up, and its predictions fall behind the scene, or the camera drops them, and "
                "the model sees a lower frame rate than the camera's; lighten the model (a lower precision with "
                "--profile, a smaller --width or --size at export) or lower the camera's frame rate"
                + ("; with several sources each round takes one frame of each, so the slowest source paces the "
                   "others: give the cameras one frame rate." if self.together else "."))

    def rates(self) -> dict[int, str]:
        """Per live stream with a known rate: a line giving the rate it sends, the rate taken overall, and
        why they differ where they do (the reader fell behind, or the source sent fewer than it reports)."""
        out = {}
        for i, (first, _, _, frames, last, _) in self._seen.items():
            if frames > 1 and last > first:
                source, taken = self.sources[i], (frames - 1) / (last - first)
                why = (" (fell behind)" if i in self.behind else
                       f" (waiting for {source.name}: it sent fewer than it reports)"
                       if taken < KEEP_UP * source.wanted_fps else "")
                out[i] = f"sends {_sends(source)} fps, {self.taker} took {taken:.1f}{why}"
        return out


def _sends(source: LiveFrames) -> str:
    """A camera's rate, as its timestamps show it where they differ from the rate it reports (a webcam in
    dim light), and the share of it a model trained at a lower rate takes: "30 (6 for the model)", "15 (it
    reports 30; 6 for the model)"."""
    wanted, rate = source.wanted_fps, source.sampler.rate  # the reported rate unless the timestamps differ
    notes = ([f"it reports {source.fps:g}"] if rate != source.fps else []) + (
        [f"{wanted:.3g} for the model"] if wanted is not None and wanted != source.fps else [])
    return f"{rate:g}" + (f" ({'; '.join(notes)})" if notes else "")


def stream_scheme(spec: str) -> str | None:
    """The scheme of a network source (``rtsp`` of ``rtsp://cam/1``), else None."""
    m = re.match(r"([A-Za-z][A-Za-z0-9+.-]*)://", spec)
    return m[1].lower() if m and m[1].lower() in STREAM_SCHEMES else None


def redact(spec: str) -> str:
    """A source as it may be printed or saved: an IP camera's URL often carries its password
    (rtsp://admin:secret@10.0.0.5/stream), which must not land in logs, reports or manifests."""
    return re.sub(r"^([A-Za-z][A-Za-z0-9+.-]*://[^:/@]+):[^@/]*@", r"\1:***@", spec)


def csi_pipeline(sensor: int, width: int, height: int, fps: int) -> str:
    """The usual GStreamer pipeline for a Jetson CSI camera (nvarguscamerasrc), ending in BGR for OpenCV."""
    return (f"nvarguscamerasrc sensor-id={sensor} ! video/x-raw(memory:NVMM), width={width}, height={height}, "
            f"framerate={fps}/1 ! nvvidconv ! video/x-raw, format=BGRx ! videoconvert ! video/x-raw, format=BGR "
            "! appsink drop=true max-buffers=1")


def is_gstreamer(spec: str) -> bool:
    """A GStreamer pipeline: elements joined by ``!``, which no camera or URL the CLI takes has (a file
    of that name that exists is still read as the file)."""
    return ("!" in spec and (" ! " in spec or spec.rstrip().endswith("appsink"))) and not os.path.exists(spec)


def opencv_has_gstreamer(cv2: Any) -> bool:
    """Whether this OpenCV was built with GStreamer; pip's opencv-python wheels are not."""
    return any(line.split(":", 1)[0].strip() == "GStreamer" and "YES" in line
               for line in cv2.getBuildInformation().splitlines())


def _open_gstreamer(pipeline: str, lost: str, fps: float | None = None) -> Iterator[tuple[np.ndarray, None]]:
    cv2 = _cv2()
    if not opencv_has_gstreamer(cv2):
        raise ValueError("this OpenCV is built without GStreamer (pip's opencv-python wheels are), so it cannot open "
                         f"{lost}; use an OpenCV built with it (on a Jetson, JetPack's python3-opencv, after pip "
                         "uninstall opencv-python-headless), or camera:INDEX for a USB camera.")
    if "appsink" not in pipeline.rsplit("!", 1)[-1]:
        raise ValueError(f"{lost} must end in appsink, which hands OpenCV its frames; add ' ! videoconvert ! "
                         "video/x-raw, format=BGR ! appsink'.")
    cap = cv2.VideoCapture(pipeline, cv2.CAP_GSTREAMER)
    if not cap.isOpened():
        raise ValueError(f"{lost} cannot be opened by OpenCV's GStreamer; try it with gst-launch-1.0 (a fakesink "
                         "in place of appsink) to see which element fails.")
    return LiveFrames(cap, lost, fps)


def _open_stream(spec: str, scheme: str, fps: float | None = None) -> Iterator[tuple[np.ndarray, None]]:
    cv2 = _cv2()
    cap = cv2.VideoCapture(spec, cv2.CAP_FFMPEG)
    shown = redact(spec)
    if not cap.isOpened():
        raise ValueError(f"stream {shown} cannot be opened by OpenCV's FFmpeg; check the address, the network and "
                         "that the source is streaming.")
    # a video file served over HTTP ends like a file; a camera's stream that stops is lost
    from urllib.parse import urlparse

    a_file = scheme in ("http", "https") and Path(urlparse(spec).path).suffix.lower() in VIDEO_SUFFIXES
    return paced_capture(cap, fps) if a_file else LiveFrames(cap, f"stream {shown}", fps)


def open_source(spec: str, frame_size: int = 112, csi_mode: tuple[int, int, int] = CSI_MODE,
                fps: float | None = None, images_fps: float | None = None) -> Iterator[tuple[np.ndarray, int | None]]:
    """Open ``synthetic[:SEED]``, ``camera:INDEX``, ``csi:SENSOR`` (a Jetson CSI camera, captured at
    ``csi_mode``: width, height, fps), a GStreamer pipeline ending in appsink, a stream URL, a video
    file, or a folder (of videos or images), its clips one after another.

    ``fps``, an artifact's ``frame.fps``, is the rate the model takes: of a source that reports a
    faster one only the frames nearest that rate's ticks are yielded (see ``runtime/rate.py``); a folder
    of images reports none, and ``images_fps`` is the rate its frames were extracted at, where known."""
    if (scheme := stream_scheme(spec)) is not None:
        return _open_stream(spec, scheme, fps)
    if spec.startswith("csi:"):
        sensor = spec.split(":", 1)[1]
        if not sensor.isdigit():
            raise ValueError(f"CSI source {spec!r} needs a numeric sensor id, e.g. csi:0.")
        return _open_gstreamer(csi_pipeline(int(sensor), *csi_mode), f"CSI camera {sensor}'s pipeline", fps)
    if is_gstreamer(spec):
        return _open_gstreamer(spec, "the GStreamer pipeline", fps)
    if spec.startswith("synthetic"):
        from .data import gestures

        seed = gestures.parse_source(spec)
        return paced(((f, int(lab)) for f, lab in gestures.iter_stream(seed, frame_size=frame_size)), fps)
    if spec.startswith("camera:"):
        index = spec.split(":", 1)[1]
        if not index.isdigit():
            raise ValueError(f"camera source {spec!r} needs a numeric index, e.g. camera:0.")
        cap = _cv2().VideoCapture(int(index))
        if not cap.isOpened():
            raise ValueError(f"camera {index} cannot be opened; check that it is connected and not in use.")
        return LiveFrames(cap, f"camera {index}", fps)
    path = Path(spec)
    # os.path's tests, not Path's: a spec too long for a file name (a long GStreamer pipeline, say)
    # raises "File name too long" from Path.is_dir() before Python 3.12
    if os.path.isdir(spec):
        return (item for clip in _clips_in(path) for item in _clip_frames(clip, fps=fps, images_fps=images_fps))
    if not os.path.isfile(spec):
        if spec.lower().startswith("file:"):  # a URL copied from a browser or a file manager
            from urllib.parse import unquote, urlparse

            raise ValueError(f"source {spec!r} is a file URL; pass the path itself: {unquote(urlparse(spec).path)}")
        if "://" not in spec and (path.suffix.lower() in VIDEO_SUFFIXES | IMAGE_SUFFIXES or "/" in spec
                                  or os.sep in spec):
            # meant as a path: the likely fault is the path, not the kind of source
            where = (f"; the folder {path.parent} exists, with no {path.name}" if os.path.isdir(path.parent)
                     and str(path.parent) != "." else "")
            relative = "" if path.is_absolute() else f" (relative paths start from {Path.cwd()})"
            raise ValueError(f"source {redact(spec)!r} does not exist{where}; check the path{relative}.")
        raise ValueError(f"source {redact(spec)!r} is neither {SOURCE_FORMS}; pass one of those{_meant(spec)}.")
    return paced_capture(_open_video(path), fps)


def _meant(spec: str) -> str:
    """`Synthetic`, `synthtic:3` or `cam:0`: a source word misspelt, named with the word meant."""
    import difflib

    head, colon, rest = spec.partition(":")
    close = difflib.get_close_matches(head.lower(), ["synthetic", "camera", "csi"], n=1, cutoff=0.6)
    return f" (did you mean {close[0] + colon + rest!r}?)" if close else ""


def _open_video(path: Path, fix: str = "check the file and its codec"):
    cap = _cv2().VideoCapture(str(path))
    if not cap.isOpened():
        raise ValueError(f"video {path} cannot be opened by OpenCV; {fix}.")
    return cap


def _natural(p: Path) -> list[Any]:
    """Name order with numbers compared as numbers: frame_2.jpg before frame_10.jpg."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", p.name)]


def _images_in(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()), key=_natural)


def _videos_in(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if p.suffix.lower() in VIDEO_SUFFIXES), key=_natural)


def _image_folders_in(folder: Path) -> dict[Path, Path]:
    """Each subfolder that holds images (one clip), with its first image."""
    return {d: images[0] for d in sorted((d for d in folder.iterdir() if d.is_dir()), key=_natural)
            if (images := _images_in(d))}


def _clips_in(folder: Path) -> list[Path]:
    """The clips a folder holds, each checked before any frame is streamed.

    Its videos if it has any (each opened once, so a broken one fails here, not halfway through
    the folder with half a predictions file written); else, if it holds images, the folder itself
    is one clip, its frames in name order; else each subfolder that holds images is one clip (the
    layout of datasets shipped as frames, one folder per video); else each subfolder that holds
    videos or such folders is a class, named by the folder (UCF101's, HMDB51's and Kinetics'
    layout), and its clips are those (see :func:`clip_class`), taken one class after another (the
    first clip of each class, then the second of each, ...). An image clip's first image is
    checked here and every image as its turn comes.
    """
    if (folder / "manifest.json").is_file():  # `edge3d run ART --source ART`, or the two swapped
        raise ValueError(f"source {folder} is an edge3d artifact, not frames; give the artifact as the first "
                         "argument and a video, a folder of them, camera:N or synthetic as the source.")
    videos = _videos_in(folder)
    own = _images_in(folder)
    subs = _image_folders_in(folder)  # each folder listed once here, once more when it plays
    classes = {d: clips for d in sorted((d for d in folder.iterdir() if d.is_dir() and d not in subs), key=_natural)
               if (clips := [*_videos_in(d), *_image_folders_in(d)])}

    def named(what: str, found: list[Path]) -> str:
        return f"{what} ({', '.join(p.name for p in found[:2])}{', ...' if len(found) > 2 else ''})"

    kinds = [named(what, found) for what, found in (("videos", videos), ("images", own),
                                                    ("folders of images", list(subs)),
                                                    ("folders of clips", list(classes))) if found]
    if len(kinds) > 1:  # one kind would be played and the others skipped without a word
        raise ValueError(f"folder {folder} holds {' and '.join(kinds)}, so it is not clear which are the clips; "
                         "leave one kind in it and move the others out.")
    for d, clips in classes.items():  # a class of videos and folders of images: its folders went unplayed
        as_videos, as_images = [c for c in clips if not c.is_dir()], [c for c in clips if c.is_dir()]
        if as_videos and as_images:
            raise ValueError(f"class folder {d} holds {named('videos', as_videos)} and "
                             f"{named('folders of images', as_images)}; give each class one kind of clip (extract "
                             "the videos' frames to folders, or encode the folders as videos).")
    for v in videos + [c for clips in classes.values() for c in clips if not c.is_dir()]:
        _open_video(v, "check the file and its codec, or move it out of the folder").release()
    if videos:
        return videos
    firsts = {folder: own[0]} if own else subs
    if classes:
        firsts = {c: _images_in(c)[0] for clips in classes.values() for c in clips if c.is_dir()}
    elif not firsts:
        raise ValueError(f"folder {folder} holds no video files ({', '.join(sorted(VIDEO_SUFFIXES))}), no images "
                         f"({', '.join(sorted(IMAGE_SUFFIXES))}), no folders of images and no folders of those; pass "
                         "a video, or a folder of them.")
    cv2 = _cv2()
    for first in firsts.values():
        if not cv2.haveImageReader(str(first)):
            raise ValueError(f"image {first} cannot be read by OpenCV; check the file, or move it out of the folder.")
    if classes:  # round robin over the classes: a run cut short by --frames still sees every class
        return [c for turn in itertools.zip_longest(*classes.values()) for c in turn if c is not None]
    return list(firsts)


def clip_class(folder: Path, clip: Path) -> str | None:
    """The class a clip of ``folder`` is filed under: its parent folder's name in a layout of one folder
    per class, else None."""
    return clip.parent.name if clip.parent != folder else None


def _clip_frames(clip: Path, label: int | None = None, fps: float | None = None,
                 images_fps: float | None = None) -> Iterator[tuple[np.ndarray, int | None]]:
    """A video's frames, or a folder's images in name order (each must decode: a clip with a hole
    in it is not the clip the model should see), each with the clip's label; those a model trained at
    ``fps`` takes, where the video reports a faster rate (a folder of images reports none: ``images_fps``
    says what it was extracted at)."""
    if not clip.is_dir():
        # opened here, not at the first frame: its rate is known before one is read
        return paced_capture(_open_video(clip), fps, label)
    return paced(_image_frames(clip, label), fps, images_fps)


def _image_frames(clip: Path, label: int | None) -> Iterator[tuple[np.ndarray, int | None]]:
    cv2 = _cv2()
    for image in _images_in(clip):
        bgr = cv2.imread(str(image), cv2.IMREAD_COLOR)
        if bgr is None:
            raise ValueError(f"image {image} cannot be read by OpenCV; check the file, or move it out of the folder.")
        yield cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), label


def _class_key(name: str) -> str:
    return re.sub(r"[\s_-]+", "_", name.strip().casefold())


def class_index(classes: list[str] | None) -> Any:
    """Folder name -> class index, None for a name that is no class. Case, spaces, hyphens and
    underscores are not told apart ("Air Drumming" is air_drumming, as datasets and models spell
    their classes differently), except where that would make two classes one."""
    exact = {name: i for i, name in enumerate(classes or [])}
    loose: dict[str, int | None] = {}
    for name, i in exact.items():
        key = _class_key(name)
        loose[key] = None if key in loose else i  # two classes alike: only their exact names match
    return lambda name: None if name is None else exact.get(name, loose.get(_class_key(name)))


def _a_folder(spec: str) -> bool:
    return (not spec.startswith(("synthetic", "camera:", "csi:")) and stream_scheme(spec) is None
            and not is_gstreamer(spec) and os.path.isdir(spec))


def open_streams(spec: str, frame_size: int = 112, classes: list[str] | None = None, fps: float | None = None,
                 images_fps: float | None = None) -> Iterator[tuple[str, Iterator[tuple[np.ndarray, int | None]]]]:
    """Like :func:`open_source`, but one ``(name, frames)`` per independent stream.

    A folder of clips (videos, or folders of images) is several streams, each named by its path:
    a stateful model must start each clip from its initial state (`edge3d run`, calibration and
    comparison reset between them), whereas ``open_source`` concatenates them. Every other
    source, a folder of images included, is a single stream named ``spec``. A bad source raises
    here, not at the first frame; each video of a folder is opened only when its turn comes, so a
    folder of many videos holds one capture at a time. In a folder of one folder per class, each
    frame is labelled with its folder's index in ``classes`` (None for a name not among them). ``fps``
    and ``images_fps`` pace each clip as :func:`open_source` does.
    """
    path = Path(spec)
    if _a_folder(spec):
        clips = _clips_in(path)
        if clips == [path]:
            return iter([(spec, _clip_frames(path, fps=fps, images_fps=images_fps))])
        index = class_index(classes)
        return ((str(c), _clip_frames(c, index(clip_class(path, c)), fps, images_fps)) for c in clips)
    return iter([(spec, open_source(spec, frame_size, fps=fps))])


def frame_rounds(streams: list[Iterator[Any]], limits: list[int | None] | None = None
                 ) -> Iterator[list[tuple[int, Any]]]:
    """``[(stream index, item), ...]``: one item of each stream still running, per round, as one
    batched step of several cameras takes them (`edge3d run` and the Jetson app).

    A stream stops when it ends or has given ``limits[i]`` items, and the others go on (a subset
    call). A limit is checked after its round has been used, so no source is read past it.
    """
    counts = [0] * len(streams)
    running = list(range(len(streams)))
    while running:
        got = [(i, item) for i in running if (item := next(streams[i], None)) is not None]
        if not got:
            return
        yield got
        for i, _ in got:
            counts[i] += 1
        running = [i for i, _ in got if limits is None or limits[i] is None or counts[i] < limits[i]]


def source_frame_size(spec: str, model_size: int) -> int:
    """Size to open a source at: the synthetic renderer draws at >= 112 px (then it is resized)."""
    return max(model_size, 112) if spec.startswith("synthetic") else model_size


def streams_of(source: str | Path | Iterable[Any], model_size: int, classes: list[str] | None = None,
               fps: float | None = None, images_fps: float | None = None) -> tuple[str, Iterable[tuple[str, Iterable[Any]]]]:
    """``(description, streams)`` for a source spec (file, folder, synthetic[:SEED]) or frames.

    A non-string source is one stream of frames (uint8 H×W×3 images or normalised C×H×W
    float32 arrays, optionally as ``(frame, label)`` pairs): what tests and notebooks pass.
    ``classes`` labels the clips of a folder of one folder per class (see :func:`open_streams`), and
    ``fps`` (an artifact's ``frame.fps``) paces a source path's clips (``images_fps``: the rate its frame
    folders were extracted at); frames from Python are the caller's choice already.
    """
    if isinstance(source, (str, Path)):
        spec = str(source)
        return redact(spec), open_streams(spec, source_frame_size(spec, model_size), classes, fps, images_fps)
    if isinstance(source, (list, tuple)) and source and all(isinstance(s, (str, Path)) for s in source):
        # read as frames, each path failed as "frame dtype <U5 is not supported"
        raise ValueError(f"the source is a list of {len(source)} paths, and one source is read; put the videos (or "
                         "frame folders) in one folder and pass that folder, or pass frames.")
    return "frames from Python", [("frames", source)]


def labels_apply(source: Any, manifest: dict[str, Any]) -> bool:
    """Whether a source's labels are the model's classes. The synthetic source labels each frame
    with a gesture class index, which says nothing about a model with other classes: an untrained
    5-class D-ResNet would be scored against them. Labels from Python frames are the caller's own."""
    if not (isinstance(source, (str, Path)) and str(source).startswith("synthetic")):
        return True
    from .data import gestures

    return list((manifest.get("output") or {}).get("classes") or []) == list(gestures.classes)


def split_item(item: Any) -> tuple[np.ndarray, int | None]:
    """A source item is a frame or a ``(frame, label)`` pair."""
    if isinstance(item, tuple) and len(item) == 2:
        return item[0], None if item[1] is None else int(item[1])
    return item, None


def synthetic_available() -> bool:
    """Whether ``synthetic[:SEED]`` works here (the gesture renderer is installed)."""
    import importlib.util

    try:
        return importlib.util.find_spec("edge3d.data.gestures") is not None
    except ModuleNotFoundError:
        return False
