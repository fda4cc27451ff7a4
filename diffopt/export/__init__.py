"""Export step programs: ONNX bundles (one graph per variant + manifest) for onnxruntime and TensorRT."""

from diffopt.export.onnx import ExportError, to_onnx
from diffopt.runtime.bundle import Manifest

__all__ = ["ExportError", "Manifest", "to_onnx"]
