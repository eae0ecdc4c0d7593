"""Exporters: step module -> ONNX artifact (+ precisions, TensorRT engines, Triton repository).

Imported lazily by the CLI; these modules need the ``export`` extra (torch, onnx).
"""
