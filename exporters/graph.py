"""Small ONNX graph queries shared by the FP16 and INT8 builders.

Both builders must agree on which nodes stay float32: the ones that compute or read the
accumulator states (running sums and counters) and the ones a profile keeps by op type or
layer. Computing that set once, here, keeps the two precisions consistent.
"""

from __future__ import annotations

import ast
import fnmatch
import hashlib
from collections import defaultdict
from typing import Any

import onnx
from onnx import numpy_helper

# Ops that only move or reshape data: a value read from an accumulator through them is still the
# raw (large) sum or count, so they must stay float32 too, up to the first arithmetic op
# (the division that turns sum and count into a mean).
MOVEMENT_OPS = {"Reshape", "Unsqueeze", "Squeeze", "Flatten", "Transpose", "Expand", "Identity", "Cast",
                "Slice", "Gather", "Concat", "Split", "Tile", "CastLike"}


def consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    out: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for n in graph.node:
        for i in n.input:
            if i:
                out[i].append(n)
    return out


def producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {o: n for n in graph.node for o in n.output if o}


def ensure_node_names(graph: onnx.GraphProto) -> None:
    """Give every node a unique name: the quantiser's exclusion list refers to nodes by name."""
    seen: set[str] = set()
    for i, n in enumerate(graph.node):
        if not n.name or n.name in seen:
            n.name = f"{n.op_type}_{i}"
        seen.add(n.name)


def accumulator_nodes(graph: onnx.GraphProto, manifest: dict[str, Any]) -> set[str]:
    """Names of the nodes that compute or read the accumulator states (kept float32 everywhere).

    Computing: every node on a path from a layer's accumulator ``state_in`` tensors to its
    ``state_out`` tensors. Taken layer by layer: with all accumulators at once, a path could
    leave one layer's mean and reach a later layer's sum through the convs in between (VoV3D has
    a running mean in every block), and kept 185 of VoV3D's 197 convs out of FP16 and INT8.
    Reading: every consumer of an accumulator value, following data-movement ops (a reshaped
    sum is still a sum) up to and including the first arithmetic op, whose result (the mean)
    is bounded and may go back to lower precision.
    """
    acc = [s for s in manifest["states"] if s["kind"] == "accumulator"]
    if not acc:
        return set()
    cons, prod = consumers(graph), producers(graph)
    by_layer: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for s in acc:
        by_layer[s.get("layer") or s["name"]].append(s)
    keep: set[str] = set()
    acc_tensors: set[str] = {s["input"] for s in acc}
    for states in by_layer.values():
        forward: set[str] = set()  # tensors reachable from this layer's accumulator inputs
        stack = [s["input"] for s in states]
        while stack:
            t = stack.pop()
            if t in forward:
                continue
            forward.add(t)
            for n in cons.get(t, []):
                stack.extend(o for o in n.output if o)
        stack = [s["output"] for s in states]
        seen: set[str] = set()
        while stack:  # backward from the outputs, staying inside the forward cone
            t = stack.pop()
            if t in seen or t not in forward:
                continue
            seen.add(t)
            acc_tensors.add(t)
            n = prod.get(t)
            if n is not None:
                keep.add(n.name)
                stack.extend(i for i in n.input if i)
    stack = list(acc_tensors)
    visited: set[str] = set()
    while stack:  # readers of accumulator values
        t = stack.pop()
        if t in visited:
            continue
        visited.add(t)
        for n in cons.get(t, []):
            keep.add(n.name)
            if n.op_type in MOVEMENT_OPS:
                stack.extend(o for o in n.output if o)
    return keep


# Where the torch exporter records the module scopes a node came from.
SCOPES_KEY = "pkg.torch.onnx.name_scopes"


def node_scopes(node: onnx.NodeProto) -> list[str]:
    """The module scopes the torch exporter recorded for a node (a Python list literal), as written."""
    for p in node.metadata_props:
        if p.key == SCOPES_KEY:
            try:
                scopes = ast.literal_eval(p.value)
            except (ValueError, SyntaxError):
                return []
            return [s for s in scopes if isinstance(s, str)] if isinstance(scopes, list) else []
    return []


def node_layers(node: onnx.NodeProto) -> list[str]:
    """The model layers a node belongs to, from the exporter's name-scope metadata.

    The torch exporter records ``['', 'model', 'model.layer1.0.conv1', ...]``; the leading
    ``model.`` is the StepModule wrapper and is dropped so the names match ``model.named_modules()``.
    """
    return [s.removeprefix("model.") for s in node_scopes(node) if s and s != "model"]


def kept_by_profile(graph: onnx.GraphProto, keep_op_types: tuple[str, ...] | list[str],
                    keep_layers: tuple[str, ...] | list[str]) -> set[str]:
    """Nodes a profile keeps in float32: by op type, or by layer (a layer keeps its sub-layers).

    A layer pattern may use shell wildcards (``layer4.*``) and also matches node names.
    """
    ops = set(keep_op_types)
    keep = set()
    for n in graph.node:
        if n.op_type in ops:
            keep.add(n.name)
            continue
        names = node_layers(n) + [n.name]
        for pattern in keep_layers:
            if any(fnmatch.fnmatchcase(s, pattern) or s.startswith(pattern + ".") for s in names):
                keep.add(n.name)
                break
    return keep


def unmatched_layers(graph: onnx.GraphProto, keep_layers: tuple[str, ...] | list[str]) -> list[str]:
    """Layer patterns that match no node: almost always a typo, so the builders reject them."""
    return [p for p in keep_layers if not kept_by_profile(graph, (), (p,))]


# (op type, input index) of the weights of the ops that carry them
WEIGHT_SLOTS = {("Conv", 1), ("ConvTranspose", 1), ("Gemm", 1), ("MatMul", 1)}


def share_identical_initializers(graph: onnx.GraphProto) -> int:
    """Point every node at one copy of each distinct weight; return how many copies were dropped.

    ONNX Runtime's Conv+BatchNorm fusion writes a fused weight per Conv node, so a layer the graph
    runs several times with one set of weights (an SGS stage stepping its post-SGS layers over 8 bins,
    unrolled, where a layer keeps it from running the bins as one batch) came out with a copy per run: the SGS stage's graph held 8× its parameters, in the
    file and in memory. Copies must match in dtype, shape and every byte, so sharing them is exact.

    Only weights are shared: tensors that every consumer takes as the weight of a Conv, Gemm or
    MatMul. A bias must stay each node's own, because INT8 quantises it with the scale of that
    node's input (two zero biases of an untrained model are byte-identical, and quantisers that
    meet one bias under two scales get one of them wrong). A graph with subgraphs (Loop, If, Scan),
    which may name outer initializers, is left as it is, and so is a tensor that is also a graph
    input or output (a caller may feed or read it).
    """
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in graph.node for a in n.attribute):
        return 0
    exposed = {v.name for v in graph.input} | {v.name for v in graph.output}
    slots: dict[str, set[tuple[str, int]]] = defaultdict(set)
    for n in graph.node:
        for i, name in enumerate(n.input):
            slots[name].add((n.op_type, i))
    # kept by digest, not by bytes (a second copy of every weight); a digest match is compared in full
    first: dict[tuple[int, tuple[int, ...], bytes], list[onnx.TensorProto]] = defaultdict(list)
    alias: dict[str, str] = {}
    for t in graph.initializer:
        if t.name in exposed or t.data_location == onnx.TensorProto.EXTERNAL or not slots[t.name] or not (
                slots[t.name] <= WEIGHT_SLOTS):
            continue
        raw = numpy_helper.to_array(t).tobytes()
        same = first[(t.data_type, tuple(t.dims), hashlib.sha256(raw).digest())]
        match = next((s.name for s in same if numpy_helper.to_array(s).tobytes() == raw), None)
        if match is None:
            same.append(t)
        else:
            alias[t.name] = match
    if not alias:
        return 0
    for n in graph.node:
        for i, name in enumerate(n.input):
            if name in alias:
                n.input[i] = alias[name]
    keep = [t for t in graph.initializer if t.name not in alias]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    return len(alias)
