"""dtop-export: train DToP image-retrieval models and ship them as ONNX / TensorRT descriptors.

Heavy imports (torch, timm, onnx) are deliberately not made here so that ``import dtop_export`` and
``dtop-export --help`` stay instant; import from the submodules instead.
"""

from dtop_export.errors import DToPError

__version__ = "0.1.0"
__all__ = ["DToPError", "__version__"]
