"""FP32 step graph -> FP16 step graph with float32 islands, written by walking the graph.

Why not a generic converter: the step graph has a contract a generic tool does not know.
Frame and output keep the dtype the profile names at the graph boundary (apps keep feeding
float32), ring and recurrent states take the profile's state dtype (float16 halves the cache),
and accumulators (running sums and frame counters) plus every op that computes or reads them
stay float32 - float16 stops counting at 2048 and overflows at 65504, which a stream passes
in about half a minute at 30 fps. Casts are inserted exactly where a float32 value meets a
float16 op or the other way round, so the result is strongly typed, as TensorRT 10+ wants.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..profiles import Profile
from ..runtime.manifest import feed_of_buffer
from .graph import accumulator_nodes, ensure_node_names, kept_by_profile, unmatched_layers

FLOAT, HALF = TensorProto.FLOAT, TensorProto.FLOAT16
_ELEM = {"float32": FLOAT, "float16": HALF}
_F16_MAX = float(np.finfo(np.float16).max)


def _schema(node: onnx.NodeProto, opset: int):
    try:
        return onnx.defs.get_schema(node.op_type, opset, node.domain or "")
    except onnx.defs.SchemaError:
        return None


def _formal(params: list, i: int):
    if not params:
        return None
    return params[min(i, len(params) - 1)]


def _may_be_half(schema, params: list, i: int) -> bool:
    """Whether formal parameter ``i`` accepts float16 (a literal ``tensor(float)`` does not)."""
    formal = _formal(params, i)
    if formal is None:
        return False
    constraints = {c.type_param_str: c.allowed_type_strs for c in schema.type_constraints}
    if formal.type_str in constraints:
        return "tensor(float16)" in constraints[formal.type_str]
    return formal.type_str == "tensor(float16)"


def _to_half(t: onnx.TensorProto, name: str) -> onnx.TensorProto:
    a = numpy_helper.to_array(t)
    return numpy_helper.from_array(np.clip(a, -_F16_MAX, _F16_MAX).astype(np.float16), name)


def boundary_dtypes(manifest: dict[str, Any], profile: Profile) -> dict[str, str]:
    """The dtype each graph input and output has in this profile (frame, output, every state, and the
    buffers between the stages of a multi-rate model: ``feed.X`` out of one stage graph, ``buffer.X``
    into the next, held by the runtime like a ring state and stored in the state dtype)."""
    want = {"frame": profile.io_dtype, "output": profile.io_dtype}
    for s in manifest["states"]:
        d = profile.accumulator_dtype if s["kind"] == "accumulator" else profile.state_dtype
        want[s["input"]] = want[s["output"]] = d
    for b in manifest.get("buffers", []):
        want[b["name"]] = want[feed_of_buffer(b["name"])] = profile.state_dtype
    return want


def convert_fp16(model: onnx.ModelProto, manifest: dict[str, Any], profile: Profile) -> onnx.ModelProto:
    """Return the float16 version of ``model`` under ``profile`` (the input is not modified)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    m = onnx.shape_inference.infer_shapes(m)
    g = m.graph
    ensure_node_names(g)
    missing = unmatched_layers(g, profile.keep_layers)
    if missing:
        raise ValueError(f"profile {profile.name}: keep_layers entry {missing[0]!r} matches no layer of the "
                         "model; use a module path from `edge3d inspect` (e.g. head.fc).")
    opset = next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), 18)
    block = kept_by_profile(g, profile.keep_op_types, profile.keep_layers)
    if profile.accumulator_dtype == "float32":
        block |= accumulator_nodes(g, manifest)

    types: dict[str, int] = {}
    for vi in list(g.value_info) + list(g.input) + list(g.output):
        types[vi.name] = vi.type.tensor_type.elem_type
    inits = {t.name: t for t in g.initializer}
    for name, t in inits.items():
        types[name] = t.data_type
    want = {k: _ELEM[v] for k, v in boundary_dtypes(manifest, profile).items()}

    home: dict[str, int] = {}  # dtype each float tensor has in the new graph
    for i in g.input:
        if types.get(i.name) == FLOAT:
            home[i.name] = want.get(i.name, FLOAT)
            i.type.tensor_type.elem_type = home[i.name]
    new_inits: list[onnx.TensorProto] = []
    used_fp32_inits: set[str] = set()
    cast_names: dict[tuple[str, int], str] = {}
    nodes: list[onnx.NodeProto] = []

    def get(t: str, to: int) -> str:
        if t in inits:
            if inits[t].data_type != FLOAT:
                return t
            if to == FLOAT:
                used_fp32_inits.add(t)
                return t
            if (t, HALF) not in cast_names:
                cast_names[(t, HALF)] = f"{t}__fp16"
                new_inits.append(_to_half(inits[t], f"{t}__fp16"))
            return cast_names[(t, HALF)]
        have = home.get(t)
        if have is None or have == to:
            return t
        if (t, to) not in cast_names:
            out = f"{t}__{'fp16' if to == HALF else 'fp32'}"
            nodes.append(helper.make_node("Cast", [t], [out], name=f"cast_{out}", to=to))
            cast_names[(t, to)] = out
        return cast_names[(t, to)]

    for n in g.node:
        schema = _schema(n, opset)
        half = n.name not in block and schema is not None
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value" and a.t.data_type == FLOAT and half:
                    a.t.CopyFrom(_to_half(a.t, a.t.name))
            if types.get(n.output[0]) == FLOAT:
                home[n.output[0]] = HALF if half else FLOAT
            nodes.append(n)
            continue
        for idx, t in enumerate(n.input):
            if not t or types.get(t) != FLOAT:
                continue
            to = HALF if half and _may_be_half(schema, list(schema.inputs), idx) else FLOAT
            n.input[idx] = get(t, to)
        if half:
            for a in n.attribute:
                if n.op_type == "Cast" and a.name == "to" and a.i == FLOAT:
                    a.i = HALF
                if n.op_type == "ConstantOfShape" and a.name == "value" and a.t.data_type == FLOAT:
                    a.t.CopyFrom(_to_half(a.t, a.t.name))
        for idx, o in enumerate(n.output):
            if not o:
                continue
            if n.op_type == "Cast":
                to_attr = next(a.i for a in n.attribute if a.name == "to")
                if to_attr in (FLOAT, HALF):
                    home[o] = to_attr
                continue
            if types.get(o) == FLOAT:
                home[o] = HALF if half and _may_be_half(schema, list(schema.outputs), idx) else FLOAT
        nodes.append(n)

    # Graph outputs keep the boundary dtype: cast where the producing op ran in the other one.
    for o in g.output:
        if types.get(o.name) != FLOAT:
            continue
        target = want.get(o.name, FLOAT)
        if home.get(o.name, FLOAT) != target:
            inner = f"{o.name}__{'fp16' if home[o.name] == HALF else 'fp32'}_raw"
            for n in nodes:
                for k, t in enumerate(n.input):
                    if t == o.name:
                        n.input[k] = inner
                for k, t in enumerate(n.output):
                    if t == o.name:
                        n.output[k] = inner
            nodes.append(helper.make_node("Cast", [inner], [o.name], name=f"cast_{o.name}", to=target))
        o.type.tensor_type.elem_type = target

    del g.node[:]
    g.node.extend(nodes)
    keep = [t for t in g.initializer if t.data_type != FLOAT or t.name in used_fp32_inits]
    del g.initializer[:]
    g.initializer.extend(keep + new_inits)
    del g.value_info[:]
    m = onnx.shape_inference.infer_shapes(m, strict_mode=True)
    onnx.checker.check_model(m)
    return m
