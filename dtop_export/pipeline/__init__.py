"""The artefact chain, for every command that builds more than one thing.

``stages`` (a stage runner that reuses what a previous run built, and the :class:`Reporter` it talks
through), ``artefacts`` (checkpoint -> ONNX -> optimized / INT8 / FP16 -> TensorRT builders; ``bench
--derive``'s chain) and ``demo`` (``dtop-export demo``: data -> train -> whiten -> ONNX -> TensorRT or the
FP16 audit -> parity -> evaluation) and ``trt_selftest`` (``dtop-export trt --self-test``: export -> TensorRT
FP32/FP16 builds -> I/O, parity, inspector and timing-cache checks). The orchestrating layer: may import
the core, ``engines`` and ``training``; nothing but the CLI imports it.
"""
