"""Folding a BatchNorm after a sum of convs (exporters/fold.py), on hand-built ONNX graphs."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from edge3d.exporters.fold import fold_bn_into_conv_sums
from edge3d.exporters.graph import SCOPES_KEY, kept_by_profile
from onnx import TensorProto, helper, numpy_helper


def _graph(second_conv_bias: bool, sum_is_output: bool = False, taps: int = 2) -> onnx.ModelProto:
    """``taps`` grouped 3x3 convs over inputs x0.., summed by Adds, then a BatchNorm (C = 4)."""
    rng = np.random.default_rng(0)
    c = 4
    inits, nodes, inputs = [], [], []
    for i in range(taps):
        inputs.append(helper.make_tensor_value_info(f"x{i}", TensorProto.FLOAT, ["N", c, 6, 6]))
        inits.append(numpy_helper.from_array(rng.standard_normal((c, 1, 3, 3)).astype(np.float32), f"w{i}"))
        conv_in = [f"x{i}", f"w{i}"]
        if i == 0 or second_conv_bias:
            inits.append(numpy_helper.from_array(rng.standard_normal(c).astype(np.float32), f"b{i}"))
            conv_in.append(f"b{i}")
        nodes.append(helper.make_node("Conv", conv_in, [f"c{i}"], name=f"conv{i}", group=c, pads=[1, 1, 1, 1]))
    total = "c0"
    for i in range(1, taps):
        nodes.append(helper.make_node("Add", [total, f"c{i}"], [f"s{i}"], name=f"add{i}"))
        total = f"s{i}"
    for name, v in (("scale", rng.uniform(0.5, 2, c)), ("beta", rng.standard_normal(c)),
                    ("mean", rng.standard_normal(c)), ("var", rng.uniform(0.1, 3, c))):
        inits.append(numpy_helper.from_array(v.astype(np.float32), name))
    nodes.append(helper.make_node("BatchNormalization", [total, "scale", "beta", "mean", "var"], ["y"],
                                  name="bn", epsilon=1e-3))
    for n in nodes:  # module scopes as the torch exporter records them
        layer = "block.bn" if n.op_type == "BatchNormalization" else f"block.{n.name}"
        n.metadata_props.add(key=SCOPES_KEY, value=repr(["", "model", "model.block", f"model.{layer}"]))
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", c, 6, 6])]
    if sum_is_output:
        outputs.append(helper.make_tensor_value_info(total, TensorProto.FLOAT, ["N", c, 6, 6]))
    g = helper.make_graph(nodes, "g", inputs, outputs, inits)
    # IR 8, as artifacts are written, so the test runs on every onnxruntime edge3d supports; onnx
    # would stamp its own newest IR version, which older onnxruntime refuses
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)], ir_version=8)


def _run(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feeds)


@pytest.mark.parametrize("taps, bias", [(2, False), (2, True), (3, True)])
def test_bn_after_a_sum_of_convs_is_folded_exactly(taps: int, bias: bool) -> None:
    model = _graph(bias, taps=taps)
    rng = np.random.default_rng(1)
    feeds = {f"x{i}": rng.standard_normal((2, 4, 6, 6)).astype(np.float32) for i in range(taps)}
    want = _run(model, feeds)[0]
    assert fold_bn_into_conv_sums(model) == 1
    onnx.checker.check_model(model)
    assert [n.op_type for n in model.graph.node].count("BatchNormalization") == 0
    np.testing.assert_allclose(_run(model, feeds)[0], want, rtol=1e-5, atol=1e-5)
    assert {t.name for t in model.graph.initializer}.isdisjoint({"scale", "beta", "mean", "var"})
    # keep_layers may name the conv or the BN it absorbed, as after ONNX Runtime's own Conv+BN fold
    for i in range(taps):
        assert kept_by_profile(model.graph, (), [f"block.conv{i}"]) >= {f"conv{i}"}
    assert kept_by_profile(model.graph, (), ["block.bn"]) >= {f"conv{i}" for i in range(taps)}


def test_bn_is_left_alone_when_the_sum_is_needed_before_it() -> None:
    """A recurrent state (RCN's h) is the sum itself: rescaling the convs would change the state."""
    model = _graph(True, sum_is_output=True)
    before = model.SerializeToString()
    assert fold_bn_into_conv_sums(model) == 0
    assert model.SerializeToString() == before


def test_copies_of_one_weight_are_shared_and_different_weights_are_not() -> None:
    """ORT's Conv+BN fusion writes a fused weight per Conv node; a layer run several times (SGS's
    post-SGS layers over 8 unrolled bins) kept a copy per run."""
    from edge3d.exporters.graph import share_identical_initializers

    rng = np.random.default_rng(1)
    w = rng.standard_normal((4, 4, 3, 3)).astype(np.float32)
    near = w.copy()
    near.flat[7] = np.nextafter(near.flat[7], np.float32(np.inf))  # one ulp off: a different weight
    weights = {"w_run0": w, "w_run1": w.copy(), "w_run2": w.copy(), "w_near": near,
               "w_shape": w.reshape(4, 36, 1, 1).copy()}  # same bytes, another shape
    inits = [numpy_helper.from_array(v, k) for k, v in weights.items()]
    nodes, x = [], "x"
    for i, name in enumerate(["w_run0", "w_run1", "w_near", "w_run2"]):
        # zero biases, byte-identical, stay each conv's own: INT8 quantises a bias with its node's input scale
        inits.append(numpy_helper.from_array(np.zeros(4, np.float32), f"b{i}"))
        nodes.append(helper.make_node("Conv", [x, name, f"b{i}"], [f"h{i}"], name=f"conv{i}", pads=[1, 1, 1, 1]))
        x = f"h{i}"
    nodes.append(helper.make_node("Reshape", [x, "to_flat"], ["flat"], name="flat"))
    inits.append(numpy_helper.from_array(np.array([1, 36, 1, 1], np.int64), "to_flat"))
    nodes.append(helper.make_node("Conv", ["flat", "w_shape"], ["y"], name="conv_last"))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 3, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 1, 1])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    feed = {"x": rng.standard_normal((1, 4, 3, 3)).astype(np.float32)}

    def run(m: onnx.ModelProto) -> np.ndarray:
        return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)[0]

    before = run(model)
    assert share_identical_initializers(model.graph) == 2
    assert sorted(t.name for t in model.graph.initializer) == ["b0", "b1", "b2", "b3", "to_flat", "w_near", "w_run0",
                                                               "w_shape"]
    assert [n.input[1] for n in model.graph.node if n.op_type == "Conv"] == [
        "w_run0", "w_run0", "w_near", "w_run0", "w_shape"]
    onnx.checker.check_model(model)
    np.testing.assert_array_equal(run(model), before)
    assert share_identical_initializers(model.graph) == 0  # nothing left to share
