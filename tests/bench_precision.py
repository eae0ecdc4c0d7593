"""Benchmark (not a test): full-size d-resnet18 (112×112) per precision on ONNX Runtime CPU.

    PYTHONPATH=. python3 tests/bench_precision.py [--frames 100] [--threads 2] [--out DIR]

Exports d-resnet18 (random seeded weights, 600 classes, fc head), adds fp16, int8,
int8-lowmem and int8-cpu calibrated on 256 frames of the numpy pattern stream, then steps the
same frames through every precision *interleaved* (frame i goes to every session before frame
i+1), so that load from other processes hits all precisions alike, and prints the median
ms/frame, the ratio to FP32 from this one run, cache bytes per stream and weight bytes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

PROFILES = ["fp32", "fp16", "int8", "int8-lowmem", "int8-cpu"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("/tmp/edge3d-bench-precision"))
    args = ap.parse_args()

    import torch
    from edge3d.exporters.onnx import export_artifact
    from edge3d.exporters.precision import add_precisions
    from edge3d.runtime import Session
    from precision_helpers import pattern_stream

    from edge3d import zoo

    art = args.out / "d-resnet18.edge3d"
    if not art.exists():
        torch.manual_seed(0)
        t = time.perf_counter()
        art = export_artifact(zoo.build("d-resnet18").eval(), args.out, "d-resnet18", frame_size=112)
        print(f"export {time.perf_counter() - t:.1f} s")
        t = time.perf_counter()
        add_precisions(art, PROFILES[1:], calib_source=[f for f, _ in pattern_stream(300, size=112, seed=77)])
        print(f"fp16 + int8 builds incl. calibration {time.perf_counter() - t:.1f} s")
    frames = [f for f, _ in pattern_stream(args.warmup + args.frames, size=112, seed=5)]
    sessions = {p: Session(art, profile=p, backend="onnxruntime", threads=args.threads) for p in PROFILES}
    ms: dict[str, list[float]] = {p: [] for p in PROFILES}
    for i, f in enumerate(frames):
        for p, s in sessions.items():
            t = time.perf_counter()
            s.step(f)
            if i >= args.warmup:
                ms[p].append((time.perf_counter() - t) * 1e3)
    ref = float(np.median(ms["fp32"]))
    rows = {}
    for p, s in sessions.items():
        med = float(np.median(ms[p]))
        rows[p] = {"ms_median": med, "ms_p95": float(np.percentile(ms[p], 95)), "speedup_vs_fp32": ref / med,
                   "cache_bytes": s.cache_bytes, "weight_bytes": s.precision["weight_bytes"]}
        print(f"{p:12s} {med:8.2f} ms/frame (p95 {rows[p]['ms_p95']:7.2f})  x{ref / med:4.2f} vs fp32  "
              f"cache {s.cache_bytes:>9,} B  weights {s.precision['weight_bytes']:>11,} B")
        s.close()
    (args.out / "bench.json").write_text(json.dumps({"frames": args.frames, "threads": args.threads,
                                                     "profiles": rows}, indent=2))


if __name__ == "__main__":
    main()
