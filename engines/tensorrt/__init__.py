"""TensorRT (10.x and 11.x) behind the engine interface, one module per job.

``install`` (is TensorRT importable, is there a GPU, versions, the logger), ``profiles`` (min/opt/max shapes
and how a runner picks one), ``sidecar`` (the ``.plan.json`` next to every engine), ``builder`` (ONNX ->
``.plan``: strongly typed FP16 via cast islands, weak typing for 10.0–10.11, timing cache), ``trtexec`` (the
equivalent command line), ``runner`` (:class:`~dtop_export.engines.tensorrt.runner.TensorRTEngine`) and
``lint`` (what TensorRT's ONNX parser would reject, checked on a CPU). Importing any of them never imports
``tensorrt``: that happens inside the functions, behind one-line errors when it is missing.
"""
