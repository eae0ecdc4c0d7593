"""Fold a BatchNorm that follows a *sum* of convolutions into those convolutions.

ONNX Runtime folds a BatchNormalization into the Conv right before it, but not into an Add of
convs. Grouped causal convs step as a sum of per-tap Conv2d (edge3d.nn.conv), and a recurrent
conv as W_hh*h + W_xh*x, so the BN after them stayed a node of its own: VoV3D-M kept 31, each
one more op per frame, and ONNX Runtime's INT8 quantiser warned once per BN weight that it
could not quantise it per channel. BN(sum_i conv_i(x_i)) equals sum_i conv'_i(x_i) with every
conv's weights and bias scaled by s = gamma / sqrt(var + eps) and beta - mean * s added to the
first conv's bias, which is exact up to float rounding.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from .graph import SCOPES_KEY, consumers, node_scopes, producers


def fold_bn_into_conv_sums(model: onnx.ModelProto) -> int:
    """Fold every foldable BatchNormalization in ``model`` in place; return how many were folded."""
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    outputs = {o.name for o in g.output}
    folded = 0
    for bn in [n for n in g.node if n.op_type == "BatchNormalization"]:
        cons, prod = consumers(g), producers(g)
        if len(bn.output) != 1 or any(p not in inits for p in bn.input[1:5]):
            continue
        convs = _conv_leaves(bn.input[0], prod, cons, outputs, inits)
        if not convs:
            continue
        scale, beta, mean, var = (numpy_helper.to_array(inits[p]).astype(np.float64) for p in bn.input[1:5])
        eps = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
        s = scale / np.sqrt(var + eps)
        shift = beta - mean * s
        if any(numpy_helper.to_array(inits[c.input[1]]).shape[0] != s.shape[0] for c in convs):
            continue
        for i, conv in enumerate(convs):
            w = numpy_helper.to_array(inits[conv.input[1]])
            w_new = (w * s.reshape(-1, *([1] * (w.ndim - 1)))).astype(w.dtype)
            conv.input[1] = _add_init(g, inits, f"{conv.input[1]}__bn", w_new)
            has_bias = len(conv.input) > 2 and bool(conv.input[2])
            if not (has_bias or i == 0):  # no bias to scale, and the shift goes to the first conv
                continue
            b = numpy_helper.to_array(inits[conv.input[2]]).astype(np.float64) if has_bias else np.zeros_like(s)
            b_new = b * s + (shift if i == 0 else 0.0)
            name = _add_init(g, inits, f"{conv.name or conv.output[0]}__bn_bias", b_new.astype(w.dtype))
            if len(conv.input) > 2:
                conv.input[2] = name
            else:
                conv.input.append(name)
        for conv in convs:  # a folded conv answers to the BN's layer name too, as ORT's own fold does
            _add_scopes(conv, bn)
        root = prod[bn.input[0]]
        root.output[0] = bn.output[0]
        g.node.remove(bn)
        folded += 1
    if folded:  # the value_info of the renamed sums goes with simplify's sweep of dead tensors
        _drop_unused_initializers(g)
    return folded


def _conv_leaves(tensor: str, prod: dict, cons: dict, outputs: set[str], inits: dict) -> list[onnx.NodeProto]:
    """The Convs whose outputs an Add tree sums into ``tensor``, or [] when it is not such a tree.

    Every tensor in the tree must feed only the tree (or the BN), so rescaling changes nothing else.
    """
    node = prod.get(tensor)
    if node is None or tensor in outputs or len(cons.get(tensor, [])) != 1:
        return []
    if node.op_type == "Conv":
        return [node] if node.input[1] in inits else []
    if node.op_type != "Add" or node.output[0] != tensor:
        return []
    leaves = []
    for t in node.input:
        sub = _conv_leaves(t, prod, cons, outputs, inits)
        if not sub:
            return []
        leaves += sub
    return leaves


def _add_scopes(conv: onnx.NodeProto, bn: onnx.NodeProto) -> None:
    """Append the BN's module scopes to the conv's, so `keep_layers` naming either one matches."""
    own = node_scopes(conv)
    extra = [s for s in node_scopes(bn) if s not in own]
    if not extra:
        return
    merged = own + extra
    for p in conv.metadata_props:
        if p.key == SCOPES_KEY:
            p.value = repr(merged)
            return
    conv.metadata_props.add(key=SCOPES_KEY, value=repr(merged))


def _add_init(g: onnx.GraphProto, inits: dict, name: str, value: np.ndarray) -> str:
    while name in inits:
        name += "_"
    t = numpy_helper.from_array(value, name)
    g.initializer.append(t)
    inits[name] = t
    return name


def _drop_unused_initializers(g: onnx.GraphProto) -> None:
    used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    keep = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(keep)
