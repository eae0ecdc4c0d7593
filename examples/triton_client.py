#!/usr/bin/env python3
"""Stream several cameras to a Triton server that serves an edge3d model with implicit state.

Each camera is one Triton *sequence* (one sequence id): its first frame is sent with
``sequence_start``, its last with ``sequence_end``, and Triton keeps the camera's state tensors
in between, so a request carries one preprocessed frame and nothing else. All cameras' frames
for one time step are sent together (asynchronously) so the sequence batcher can put them in
one batch; a camera's next frame is sent only after its previous answer, which keeps each
sequence in order.

    edge3d triton out/d-resnet18.edge3d -o models --max-batch 8
    tritonserver --model-repository=$PWD/models          # on the serving machine
    python examples/triton_client.py --model-dir models/d-resnet18 --cameras 4 --frames 120

Frames come from the synthetic gesture source (``synthetic:SEED``, one seed per camera) or,
with ``--random-frames``, from random pixels. Needs ``tritonclient[grpc]`` and numpy; frames
are preprocessed by ``edge3d.runtime`` exactly as the embedded runtime does (torch-free).
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

NP_TO_TRITON = {"float32": "FP32", "float16": "FP16", "uint8": "UINT8", "int8": "INT8"}


@dataclass
class Camera:
    """One camera: its raw H×W×3 uint8 frames and, for the synthetic source, their labels."""

    index: int
    frames: list[np.ndarray]
    labels: list[int | None]


@dataclass
class Request:
    """Everything one ``async_infer`` call needs, built without a server."""

    camera: int
    t: int
    sequence_id: int
    sequence_start: bool
    sequence_end: bool
    frame: np.ndarray  # (1, C, H, W), preprocessed
    inputs: list[Any] = field(repr=False)
    outputs: list[Any] = field(repr=False)


def load_manifest_for(path: str | Path) -> dict[str, Any]:
    """The edge3d manifest of a Triton model folder (edge3d_manifest.json) or an artifact."""
    p = Path(path)
    for candidate in (p, p / "edge3d_manifest.json", p / "manifest.json"):
        if candidate.is_file():
            return json.loads(candidate.read_text())
    raise ValueError(f"{p} holds no edge3d manifest; pass the model folder written by `edge3d triton` "
                     "(it has edge3d_manifest.json) or an artifact folder.")


def make_cameras(n: int, frames: int, manifest: dict[str, Any], random_frames: bool = False,
                 seed: int = 0) -> list[Camera]:
    """``n`` cameras of ``frames`` frames each: synthetic gestures (seed + i), or random pixels."""
    h, w = int(manifest["frame"]["height"]), int(manifest["frame"]["width"])
    cams = []
    for i in range(n):
        if random_frames:
            rng = np.random.default_rng(seed + i)
            imgs = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(frames)]
            cams.append(Camera(i, imgs, [None] * frames))
            continue
        try:
            from edge3d.sources import open_source

            source = open_source(f"synthetic:{seed + i}", frame_size=max(h, 112))
            pairs = [pair for _, pair in zip(range(frames), source, strict=False)]
        except ImportError as e:
            raise ValueError(f"the synthetic gesture source is not available here ({e}); "
                             "pass --random-frames to stream random pixels instead.") from None
        cams.append(Camera(i, [f for f, _ in pairs], [lab for _, lab in pairs]))
    return cams


def plan_requests(cameras: list[Camera], frames: int, model_name: str, manifest: dict[str, Any],
                  sequence_base: int, datatype: str | None = None) -> Iterator[Request]:
    """The requests to send, time-major: every camera's frame t, then t + 1, ...

    Only the frame input is sent: Triton feeds the ``state_in.*`` inputs from its stored
    state, and the client asks for the model output alone.
    """
    import tritonclient.grpc as grpcclient
    from edge3d.runtime.preprocess import FramePreprocessor

    pre = FramePreprocessor(manifest["frame"])
    name = manifest["frame"].get("name", "frame")
    out_name = manifest["output"].get("name", "output")
    dtype = datatype or NP_TO_TRITON[manifest["frame"].get("dtype", "float32")]
    np_dtype = {v: k for k, v in NP_TO_TRITON.items()}[dtype]
    for t in range(frames):
        for cam in cameras:
            x = np.empty((1, *pre.shape), np.float32)
            pre(cam.frames[t], x[0])
            x = x.astype(np_dtype, copy=False)
            inp = grpcclient.InferInput(name, list(x.shape), dtype)
            inp.set_data_from_numpy(x)
            yield Request(camera=cam.index, t=t, sequence_id=sequence_base + cam.index,
                          sequence_start=t == 0, sequence_end=t == frames - 1, frame=x, inputs=[inp],
                          outputs=[grpcclient.InferRequestedOutput(out_name)])


def stream(client: Any, model_name: str, plan: Iterator[Request], cameras: int, out_name: str,
           timeout_s: float) -> dict[int, list[np.ndarray]]:
    """Send one time step of all cameras at once, wait for every answer, then the next step."""
    done: queue.Queue = queue.Queue()
    outputs: dict[int, list[np.ndarray]] = {c: [] for c in range(cameras)}
    step: list[Request] = []

    def flush() -> None:
        for r in step:
            client.async_infer(model_name, r.inputs, callback=lambda res, err, r=r: done.put((r, res, err)),
                               outputs=r.outputs, sequence_id=r.sequence_id, sequence_start=r.sequence_start,
                               sequence_end=r.sequence_end)
        for _ in step:
            try:
                r, res, err = done.get(timeout=timeout_s)
            except queue.Empty:
                raise RuntimeError(f"no answer from Triton within {timeout_s:g} s at frame {step[0].t}; "
                                   "check the server log, or raise --timeout.") from None
            if err is not None:
                raise RuntimeError(f"camera {r.camera} frame {r.t}: {err}")
            outputs[r.camera].append(res.as_numpy(out_name)[0])
        step.clear()

    for r in plan:
        if step and r.t != step[0].t:
            flush()
        step.append(r)
    if step:
        flush()
    return outputs


def top(output: np.ndarray, classes: list[str] | None) -> tuple[int, str, float]:
    o = np.asarray(output, np.float64).reshape(-1)
    i = int(o.argmax())
    p = np.exp(o - o.max())
    return i, (classes[i] if classes and i < len(classes) else str(i)), float(p[i] / p.sum())


def camera_line(index: int, sequence: int, outputs: list[np.ndarray], labels: list[int | None],
                manifest: dict) -> str:
    """One camera's closing line: its last top class and its per-frame accuracy where it has labels.
    A segmentation or heatmap model's output is a map, with a class per position and no top class."""
    from edge3d.runtime.manifest import output_map

    if output_map(manifest) is not None:
        shape = "×".join(map(str, manifest["output"]["shape"][1:]))
        return f"camera {index} (sequence {sequence}): a {shape} map, max {float(np.max(outputs[-1])):.2f}"
    _, name, score = top(outputs[-1], manifest["output"].get("classes"))
    line = f"camera {index} (sequence {sequence}): top class {name} ({score:.2f})"
    labelled = [(top(o, None)[0], lab) for o, lab in zip(outputs, labels, strict=True) if lab is not None]
    if labelled:
        line += f", per-frame accuracy {100 * np.mean([p == lab for p, lab in labelled]):.1f}%"
    return line


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="localhost:8001", help="Triton gRPC endpoint (default %(default)s).")
    ap.add_argument("--model-dir", required=False, type=Path,
                    help="The model folder written by `edge3d triton` (for its edge3d_manifest.json), "
                         "or an artifact folder.")
    ap.add_argument("--model", default=None, help="Model name on the server (default: the --model-dir name).")
    ap.add_argument("--cameras", type=int, default=4, help="Cameras (sequences) to stream (default %(default)s).")
    ap.add_argument("--frames", type=int, default=64, help="Frames per camera (default %(default)s).")
    ap.add_argument("--random-frames", action="store_true",
                    help="Random pixels instead of the synthetic gesture source.")
    ap.add_argument("--seed", type=int, default=0, help="Seed of camera 0 (camera i uses seed + i).")
    ap.add_argument("--sequence-base", type=int, default=None,
                    help="Sequence id of camera 0 (default: from the process id, so clients do not collide).")
    ap.add_argument("--timeout", type=float, default=30.0, help="Seconds to wait for one answer.")
    args = ap.parse_args(argv)
    from tritonclient.utils import InferenceServerException

    try:
        if args.model_dir is None:
            raise ValueError("pass --model-dir, the model folder written by `edge3d triton`.")
        if args.cameras < 1 or args.frames < 1:
            raise ValueError("--cameras and --frames must be at least 1.")
        import tritonclient.grpc as grpcclient

        manifest = load_manifest_for(args.model_dir)
        model = args.model or (args.model_dir.name if (args.model_dir / "config.pbtxt").is_file()
                               else manifest["name"])
        client = grpcclient.InferenceServerClient(url=args.url)
        try:
            live = client.is_server_live(client_timeout=5.0)
        except InferenceServerException as e:
            raise ValueError(f"cannot reach a Triton server at {args.url} ({e.message().splitlines()[0]}); "
                             "start `tritonserver --model-repository=REPO` or pass --url.") from None
        if not live or not client.is_model_ready(model):
            raise ValueError(f"the Triton server at {args.url} has no ready model {model!r}; check its log and "
                             "the --model name.")
        cfg = client.get_model_config(model, as_json=True)["config"]
        datatype = cfg["input"][0]["data_type"].removeprefix("TYPE_")
        cams = make_cameras(args.cameras, args.frames, manifest, args.random_frames, args.seed)
        base = args.sequence_base or (os.getpid() % 100000) * 1000 + 1
        plan = plan_requests(cams, args.frames, model, manifest, base, datatype)
        t0 = time.perf_counter()
        outputs = stream(client, model, plan, args.cameras, manifest["output"].get("name", "output"), args.timeout)
        seconds = time.perf_counter() - t0
    except (ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except InferenceServerException as e:  # the server went away or refused a request mid-stream
        print(f"error: Triton answered {e.message()}; check the server log.", file=sys.stderr)
        return 2
    print(f"{args.cameras} cameras x {args.frames} frames in {seconds:.2f} s "
          f"({args.cameras * args.frames / seconds:.1f} frames/s over gRPC)")
    for cam in cams:
        print(camera_line(cam.index, base + cam.index, outputs[cam.index], cam.labels, manifest))
    return 0


if __name__ == "__main__":
    sys.exit(main())
