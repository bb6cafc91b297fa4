"""TensorRT (10.x and 11.x) and TensorRT for RTX behind the engine interface, one module per job.

``install`` (which flavour is importable and what differs between them, is there a GPU, versions, the logger),
``targets`` (named compute capabilities for GPU-less TensorRT-RTX builds), ``profiles`` (min/opt/max shapes and
how a runner picks one), ``sidecar`` (the ``.plan.json`` next to every engine), ``network`` (parser errors, the
layer -> ONNX node map, the parsed network's precision against the FP32 islands, weak-typing pins),
``builder`` (ONNX -> ``.plan``: strongly typed FP16 via cast islands, weak typing for 10.0–10.11, timing
cache, one plan per target), ``trtexec`` (the equivalent command line), ``runner``
(:class:`~dtop_export.engines.tensorrt.runner.TensorRTEngine`, with TensorRT-RTX's runtime cache) and ``lint``
(the real ONNX parser where a flavour can run, and the CPU-side rules of what it would reject). Importing any
of them never imports ``tensorrt`` or ``tensorrt_rtx``: that happens inside the functions, behind one-line
errors when it is missing.
"""
