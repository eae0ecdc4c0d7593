"""FP32 step graph -> INT8 QDQ step graph (ONNX Runtime static quantisation), optionally with
int8 state storage.

The graph is prepared with ``quant_pre_process`` and quantised with ``quantize_static`` in
QDQ format (QuantizeLinear/DequantizeLinear pairs, which both ONNX Runtime and strongly typed
TensorRT read), per-channel int8 weights, and the calibration method of the profile, fed by a
:class:`~edge3d.exporters.calibration.RolloutReader`. The nodes that compute or read the
accumulators, and whatever the profile keeps, are excluded from quantisation.

``int8-lowmem`` then moves the state boundary into int8: ``state_in.X`` becomes an int8 input
followed by DequantizeLinear, ``state_out.X`` an int8 output behind QuantizeLinear, with the
scale calibrated for that state (symmetric, zero point 0 so a zero initial state stays 0).
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..profiles import Profile
from .graph import accumulator_nodes, ensure_node_names, kept_by_profile, unmatched_layers

_METHODS = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}
_QDTYPE = {"int8": TensorProto.INT8, "uint8": TensorProto.UINT8}


def quantize_qdq(fp32_path: Path, out_path: Path, manifest: dict[str, Any], profile: Profile, reader: Any) -> None:
    """Write the QDQ model of ``fp32_path`` to ``out_path``, calibrated by ``reader``."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    logging.getLogger("onnxruntime").setLevel(logging.ERROR)
    reader.prime()
    with tempfile.TemporaryDirectory(prefix="edge3d-int8-") as tmp:
        pre = Path(tmp) / "pre.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # The FP32 graph is already optimised at export (constant folding, Conv+BN folding); skipping
            # ORT's optimiser here keeps node names and the layer metadata keep_layers matches on.
            try:
                quant_pre_process(str(fp32_path), str(pre), skip_optimization=True)
            except Exception:
                # the symbolic shape inference of onnxruntime 1.19 and 1.20 fails on the step graphs (a
                # TypeError deep inside; 1.22 passes); onnx's shape inference alone is enough here
                quant_pre_process(str(fp32_path), str(pre), skip_optimization=True, skip_symbolic_shape=True)
        model = onnx.load(str(pre))
        ensure_node_names(model.graph)
        missing = unmatched_layers(model.graph, profile.keep_layers)
        if missing:
            raise ValueError(f"profile {profile.name}: keep_layers entry {missing[0]!r} matches no layer of the "
                             "model; use a module path from `edge3d inspect` (e.g. head.fc).")
        exclude = kept_by_profile(model.graph, profile.keep_op_types, profile.keep_layers)
        exclude |= accumulator_nodes(model.graph, manifest)
        onnx.save(model, str(pre))
        symmetric = profile.activation_dtype == "int8"
        extra: dict[str, Any] = {"ActivationSymmetric": symmetric, "WeightSymmetric": True}
        method = profile.calibration.method
        # Not CalibMaxIntermediateOutputs: ORT 1.31's MinMax calibrator discards (does not merge)
        # each full chunk, silently calibrating on the last partial chunk only. Its augmented
        # graph outputs per-tensor ReduceMin/ReduceMax, so keeping every step's is cheap anyway.
        if method == "percentile":
            extra["CalibPercentile"] = profile.calibration.percentile
        root = logging.getLogger()
        level = root.level
        # ORT's quantiser logs to the root logger, e.g. "Axis 1 is out-of-range for weight
        # 'model.bn1.weight'" for a BatchNorm left as a node (per-tensor is what it then does)
        root.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.ExitStack() as restore:
            restore.callback(root.setLevel, level)
            warnings.simplefilter("ignore")
            quantize_static(
                str(pre), str(out_path), reader, quant_format=QuantFormat.QDQ,
                per_channel=profile.per_channel, reduce_range=False,
                activation_type=QuantType.QInt8 if symmetric else QuantType.QUInt8,
                weight_type=QuantType.QInt8, nodes_to_exclude=sorted(exclude),
                calibrate_method=getattr(CalibrationMethod, _METHODS[method]), extra_options=extra,
            )


def _read_qdq_pair(g: onnx.GraphProto, name: str) -> tuple[onnx.NodeProto, onnx.NodeProto] | None:
    """The quantiser's (QuantizeLinear, DequantizeLinear) making graph output ``name``, when
    nodes inside the graph also read ``name``; else None."""
    producer = {o: n for n in g.node for o in n.output}
    dq = producer.get(name)
    if dq is None or dq.op_type != "DequantizeLinear" or not any(name in n.input for n in g.node):
        return None
    q = producer.get(dq.input[0])
    if q is None or q.op_type != "QuantizeLinear" or sum(q.output[0] in n.input for n in g.node) != 1:
        return None
    return q, dq


def _quantise_output(g: onnx.GraphProto, output: str, sc: str, zp: str) -> None:
    """Make graph output ``output`` the QuantizeLinear (scale ``sc``, zero point ``zp``) of the value
    it was, which the graph's own readers of it go on reading in float."""
    raw = f"{output}__float"
    pair = _read_qdq_pair(g, output)  # before the readers below are renamed
    for n in g.node:  # readers inside the graph read the float value
        for k, t in enumerate(n.input):
            if t == output:
                n.input[k] = raw
    if pair is not None:
        # The state is also read inside the graph (a GRU's h feeds the head), through the
        # quantiser's Q -> DQ. A QuantizeLinear after that DQ, the plain form below, makes
        # ONNX Runtime 1.30's optimiser drop the pair's Q and refuse the model ("Node input
        # ..._QuantizeLinear_Output is not a graph input"). So the pair takes this state's
        # scale: its Q writes the int8 output and its DQ feeds the readers, one rounding.
        q, dq = pair
        q.input[1:] = [sc, zp]
        q.output[0] = output
        dq.input[:] = [output, sc, zp]
        dq.output[0] = raw
    else:
        # Not read inside the graph (the usual ring cache): DQ -> Q. Reading the float before
        # the quantiser's pair instead makes ONNX Runtime 1.17 and 1.18 (memory patterns on)
        # return wrong caches from the second step on.
        for n in g.node:
            for k, t in enumerate(n.output):
                if t == output:
                    n.output[k] = raw
        g.node.append(helper.make_node("QuantizeLinear", [raw, sc, zp], [output], name=f"quantize_{output}"))


def store_states_int8(model: onnx.ModelProto, manifest: dict[str, Any], ranges: dict[str, float],
                      dtype: str = "int8", ends: Sequence[tuple[str, str | None, str | None]] = ()
                      ) -> tuple[onnx.ModelProto, dict[str, dict[str, Any]]]:
    """Make every non-accumulator state an int8 graph input/output; return the model and scales.

    ``ranges[name]`` is the calibrated magnitude of the state; scale = range / 127. ``ends`` adds
    values stored the same way that enter or leave this graph only, ``(name, input, output)`` with
    one of the two None: the buffers between a multi-rate model's stage graphs, written as one
    stage's ``feed.X`` output and read as the next one's ``buffer.X`` input, with one scale.
    """
    g = model.graph
    qtype = _QDTYPE[dtype]
    qmax = 127.0 if dtype == "int8" else 255.0
    quant: dict[str, dict[str, Any]] = {}
    inputs = {i.name: i for i in g.input}
    outputs = {o.name: o for o in g.output}
    new_nodes: list[onnx.NodeProto] = []
    states = [(s["name"], s["input"], s["output"]) for s in manifest["states"] if s["kind"] != "accumulator"]
    for name, input_name, output_name in [*states, *ends]:
        scale = max(float(ranges.get(name, 0.0)), 1e-8) / qmax
        sc, zp = f"{input_name or output_name}__scale", f"{input_name or output_name}__zero_point"
        g.initializer.append(numpy_helper.from_array(np.asarray(scale, np.float32), sc))
        g.initializer.append(numpy_helper.from_array(np.asarray(0, np.int8 if dtype == "int8" else np.uint8), zp))
        if input_name is not None:  # input side: int8 input -> DequantizeLinear -> every former consumer
            deq = f"{input_name}__dequantized"
            for n in g.node:
                for k, t in enumerate(n.input):
                    if t == input_name:
                        n.input[k] = deq
            new_nodes.append(helper.make_node("DequantizeLinear", [input_name, sc, zp], [deq],
                                              name=f"dequantize_{input_name}"))
            inputs[input_name].type.tensor_type.elem_type = qtype
        if output_name is not None:  # output side: producer -> QuantizeLinear -> int8 output
            _quantise_output(g, output_name, sc, zp)
            outputs[output_name].type.tensor_type.elem_type = qtype
        quant[name] = {"scale": scale, "zero_point": 0, "dtype": dtype}
    nodes = new_nodes + list(g.node)
    del g.node[:]
    g.node.extend(nodes)
    used = {t for n in g.node for t in n.input}
    kept = [init for init in g.initializer if init.name in used]  # a re-scaled pair's own scale and zero point
    del g.initializer[:]
    g.initializer.extend(kept)
    del g.value_info[:]
    model = onnx.shape_inference.infer_shapes(model)
    onnx.checker.check_model(model)
    return model, quant
