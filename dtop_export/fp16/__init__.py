"""FP16, in one place: ``convert`` (the FP16 ONNX with FP32 islands as ``Cast`` nodes, what a strongly typed
TensorRT build parses), ``emulate`` (that graph's arithmetic on a CPU: FP16 storage, FP32 accumulation; range
instrumentation of the float32 graph) and ``audit`` (``dtop-export check --fp16-audit``: emulated FP16 against
FP32 through :func:`dtop_export.parity.compare` and the FP16 contract, plus the nodes that must stay FP32).

``convert`` and ``emulate`` import only onnx (and ONNX Runtime's converter); the TensorRT builder uses
``convert``. ``audit`` runs engines and the parity layer: no engine may import it.
"""
