"""A camera app that embeds the edge3d runtime: what a Jetson deployment looks like.

    python examples/jetson_app.py out/d-resnet18.edge3d --source csi:0 --profile fp16
    python examples/jetson_app.py ARTIFACT --source camera:0
    python examples/jetson_app.py ARTIFACT --source "v4l2src device=/dev/video0 ! videoconvert ! appsink"
    python examples/jetson_app.py ARTIFACT --source synthetic --backend onnxruntime --frames 100 --headless
    python examples/jetson_app.py ARTIFACT --source csi:0 --source csi:1     # two cameras, one batched call

It needs only the runtime (the edge3d wheel without extras, see docs/jetson.md), OpenCV, and on the
device TensorRT + pycuda for ``--backend tensorrt``. Every frame goes through ``Session.step``:
the model sees one frame at a time and carries its temporal state itself, so the app holds no clip
buffer. The top class (a map output's largest value, for a segmentation model) and the model's
ms/frame are drawn on the frame; ``--headless`` skips the window (over SSH, in a service) and stats
are printed every ``--log-every`` frames either way. ``--source`` given several times opens one
window per camera and steps them all with one ``Session.step_batch`` call per frame round.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator

import numpy as np
from edge3d.runtime import Session


def open_frames(spec: str, frame_size: int, width: int = 1280, height: int = 720,
                fps: int = 30, model_fps: float | None = None) -> Iterator[tuple[np.ndarray, int | None]]:
    """RGB uint8 frames (and labels where the source knows them) from any source ``edge3d run`` takes,
    ``csi:N`` (captured at width × height, fps) and GStreamer pipelines included; of a source faster
    than ``model_fps`` (the artifact's frame.fps), only the frames nearest that rate.

    This is a display loop, so a folder plays back to back as one stream, without the reset between
    videos that ``edge3d run`` does.
    """
    from edge3d.sources import open_source, source_frame_size

    # the synthetic gestures are drawn at >= 112 px and resized by the Session, as `edge3d run` does
    return open_source(spec, frame_size=source_frame_size(spec, frame_size), csi_mode=(width, height, fps),
                       fps=model_fps)


def overlay(rgb: np.ndarray, text: str, ms: float, crop: tuple[int, int, float] | None = None) -> np.ndarray:
    """A BGR copy of the frame with the top class and the model's ms/frame drawn on it and, where the
    artifact crops (``crop``: the model's height and width, and the crop fraction), a box round the part
    the model sees, so whoever aims the camera sees it too."""
    import cv2

    bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    scale = max(0.4, bgr.shape[0] / 480)
    if crop is not None:
        from edge3d.runtime.preprocess import centre_box

        top, left, rows, cols = centre_box(bgr.shape[0], bgr.shape[1], *crop)
        cv2.rectangle(bgr, (left, top), (left + cols - 1, top + rows - 1), (0, 255, 255), max(1, round(2 * scale)))
    for i, line in enumerate((text, f"{ms:.2f} ms/frame")):
        y = int((24 + 28 * i) * scale)
        cv2.putText(bgr, line, (8, y), cv2.FONT_HERSHEY_SIMPLEX, 0.7 * scale, (0, 0, 0), 3, cv2.LINE_AA)
        cv2.putText(bgr, line, (8, y), cv2.FONT_HERSHEY_SIMPLEX, 0.7 * scale, (255, 255, 255), 1, cv2.LINE_AA)
    return bgr


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Stream a camera through an edge3d artifact and show the top class.")
    p.add_argument("artifact", help="artifact folder written by `edge3d export`")
    p.add_argument("--source", action="append", default=None,
                   help="csi:N | camera:N | FILE.mp4 | FOLDER | rtsp://... (any stream URL) | synthetic[:SEED] | "
                        "a GStreamer pipeline ending in appsink (default csi:0); repeat it for several cameras")
    p.add_argument("--profile", default=None,
                   help="precision to run (fp32, fp16, int8, ...; default: that of the .onnx file given, else fp32)")
    p.add_argument("--backend", default="auto", choices=["auto", "onnxruntime", "tensorrt"])
    p.add_argument("--frames", type=int, default=None,
                   help="stop after N frames of each source (default: until the sources end)")
    p.add_argument("--headless", action="store_true", help="no window; only the logged stats")
    p.add_argument("--log-every", type=int, default=30, help="print stats every N frames")
    p.add_argument("--width", type=int, default=1280, help="CSI capture width")
    p.add_argument("--height", type=int, default=720, help="CSI capture height")
    p.add_argument("--fps", type=int, default=30, help="CSI capture frame rate")
    p.add_argument("--threads", type=int, default=None,
                   help="ONNX Runtime intra-op threads (default: one per core); leave cores to the camera pipeline")
    args = p.parse_args(argv)
    # argparse keeps the last of a repeated option: `--frames 100 ... --frames 10` ran 10 frames unsaid
    given = [a.split("=", 1)[0] for a in (sys.argv[1:] if argv is None else argv)]
    for flag in ("--profile", "--backend", "--frames", "--log-every", "--width", "--height", "--fps", "--threads"):
        if given.count(flag) > 1:
            p.error(f"{flag} was given {given.count(flag)} times, and it takes one value; give it once "
                    "(only --source repeats, once per camera)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # the CSI capture settings too: a zero or negative one makes a pipeline OpenCV cannot open, and
    # its message would blame GStreamer instead of the flag
    for flag, value in (("--frames", args.frames), ("--log-every", args.log_every), ("--width", args.width),
                        ("--height", args.height), ("--fps", args.fps), ("--threads", args.threads)):
        if value is not None and value < 1:
            print(f"error: {flag} must be at least 1, got {value}.", file=sys.stderr)
            return 2
    sources = args.source or ["csi:0"]
    many = len(sources) > 1
    try:
        # one stream per camera: their states live in one session, and each frame round is one call
        session = Session(args.artifact, profile=args.profile, backend=args.backend, threads=args.threads,
                          streams=len(sources))
    except ValueError as e:  # bad artifact, profile or backend: one sentence, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        # a model trained at a lower frame rate than the cameras send (frame.fps) gets the frames nearest it
        cameras = [open_frames(s, session.manifest["frame"]["height"], args.width, args.height, args.fps,
                               session.manifest["frame"].get("fps")) for s in sources]
    except ValueError as e:  # a bad source
        session.close()
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"edge3d {session.manifest['name']}: backend {session.backend_name}, profile {session.profile}, "
          f"state {session.cache_bytes / 1e3:.1f} kB per stream" + (f", {len(sources)} streams" if many else ""),
          flush=True)
    from edge3d.runtime.manifest import output_map
    from edge3d.runtime.preprocess import fit_note, parse_fit

    from edge3d.signals import sigterm_as_interrupt
    from edge3d.sources import KeepingUp, SourceLost, frame_rounds, labels_apply, redact

    frame = session.manifest["frame"]
    fraction = parse_fit(frame.get("fit", "stretch"))  # the part a cropping artifact's model sees is boxed
    crop = None if fraction is None else (frame["height"], frame["width"], fraction)
    # a segmentation or heatmap model's output is a map: no top class to draw, no frame label to score
    is_map = output_map(session.manifest) is not None
    keep_labels = [labels_apply(s, session.manifest) and not is_map for s in sources]  # gesture labels: gesture models
    windows = [f"edge3d {i}: {redact(s)}" if many else "edge3d" for i, s in enumerate(sources)]
    if not args.headless:
        import cv2

        try:  # before the first frame: a headless OpenCV build, or no display, cannot open a window
            for window in windows:
                cv2.namedWindow(window)
        except cv2.error:
            session.close()
            print("error: this OpenCV cannot open a window (a headless build such as opencv-python-headless, or "
                  "no display); pass --headless to log the stats only.", file=sys.stderr)
            return 2
    n = correct = labelled = 0  # n: frame rounds, one frame of each camera still running
    counts = [0] * len(sources)
    shown = ["no output yet"] * len(sources)
    lost = ""
    pace = KeepingUp("the app", together=many)  # a camera that sends more frames than the app takes is said, once
    t_start = time.perf_counter()
    try:
        with sigterm_as_interrupt():  # `systemctl stop` ends the app as Ctrl-C does: closing line, exit 0
            for got in frame_rounds(cameras, [args.frames] * len(sources)):
                if many:
                    ys = session.step_batch([rgb for _, (rgb, _) in got],
                                            None if len(got) == len(sources) else [i for i, _ in got])
                else:
                    ys = session.step(got[0][1][0])[None]
                ready = session.has_outputs  # per camera: none in a multi-rate model's first frames
                ms = session.stats.ms[-1]
                n += 1
                if n == 1 and (note := fit_note(session.pre.sizes, session.manifest["frame"], args.artifact)):
                    print(f"note: {note}", flush=True)  # a 16:9 camera squeezed into a square model, say
                for i, _ in got:
                    if (behind := pace.took(i, cameras[i], time.monotonic())) is not None:
                        print(f"warning: {behind}", file=sys.stderr, flush=True)
                quit_key = False
                for (i, (rgb, label)), y in zip(got, ys, strict=True):
                    predicted = bool(ready[i])
                    idx, name, score = session.top(y) if predicted and not is_map else (None, None, None)
                    shown[i] = (f"map max {y.max():.2f}" if is_map and predicted else
                                f"top {name} ({score:.2f})" if predicted else "no output yet")
                    counts[i] += 1
                    if label is not None and keep_labels[i] and predicted:
                        labelled += 1
                        correct += int(idx == label)
                    if not args.headless:
                        import cv2

                        cv2.imshow(windows[i], overlay(rgb, shown[i], ms, crop))
                if not args.headless:
                    import cv2

                    quit_key = cv2.waitKey(1) & 0xFF in (27, ord("q"))
                if n % args.log_every == 0:
                    s = session.latency()  # a multi-rate model's over whole cycles of its stages
                    tops = "; ".join(f"{i}: {shown[i]}" for i, _ in got) if many else shown[0]
                    print(f"frame {n}: model {s['p50']:.2f} ms/{'call' if many else 'frame'} p50, "
                          f"{s['p95']:.2f} p95; app {n / (time.perf_counter() - t_start):.1f} {'rounds/s' if many else 'fps'}; "
                          f"{tops}",
                          flush=True)
                if quit_key:
                    break
    except KeyboardInterrupt:
        pass
    except SourceLost as e:  # a camera that stops is a failure the service manager should see
        lost = str(e)
    finally:
        for camera in cameras:
            camera.close()
        session.close()
        if not args.headless:
            import cv2

            cv2.destroyAllWindows()
    if n == 0:
        which = f"source {redact(sources[0])!r}" if not many else "no source"
        print(f"error: {which} gave no frames; check the camera, file, stream or pipeline.", file=sys.stderr)
        return 2
    s = session.latency()
    acc = f", per-frame accuracy {100 * correct / labelled:.1f}%" if labelled else ""
    rate = n / (time.perf_counter() - t_start)
    if many:  # a round is one frame of each camera still running
        each = ", ".join(f"stream {i}: {c}" for i, c in enumerate(counts))
        print(f"done: {sum(counts)} frames ({each}), model {s['p50']:.2f} ms/call p50 ({s['p99']:.2f} p99), "
              f"app {rate:.1f} rounds/s{acc}", flush=True)
    else:
        print(f"done: {n} frames, model {s['p50']:.2f} ms/frame p50 ({s['p99']:.2f} p99), "
              f"app {rate:.1f} fps{acc}", flush=True)
    for i, line in pace.rates().items():
        print(f"{pace.sources[i].name}: {line}", flush=True)
    from edge3d.runtime.rate import rate_note

    samplers = [c.sampler for c in cameras if hasattr(c, "sampler")]
    if paced := rate_note(samplers, session.manifest["frame"].get("fps")):
        print(f"frame rate: {paced}", flush=True)
    if lost:
        print(f"error: {lost}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
