"""Edge artefacts: the DToP model as an ExecuTorch program (``.pte``) delegated to XNNPACK, fp32 or INT8.

* :mod:`~dtop_export.edge.xnnpack_form`: the deploy-folded model (whitening and L2 norms folded as in the ONNX)
  rewritten, exactly up to float rounding, into operators XNNPACK runs: the position embedding resampled once for
  the program's grid, LayerNorm/GroupNorm/L2 norms as matmuls and element-wise ops, attention as two batched
  matmuls; plus the graph pass that moves the last few glue operators into the delegate.
* :mod:`~dtop_export.edge.pte`: ``torch.export`` at one fixed size, optional INT8 (PT2E, XNNPACK quantizer,
  calibrated through the one preprocessing path), lowering with the XNNPACK partitioner, the deployment contract
  stored inside the program (a constant method, ``dtop_metadata``), the delegation report (what runs outside
  XNNPACK), atomic write.

The runtime side (loading a ``.pte``, its contract, the engine) is :mod:`dtop_export.engines.executorch`. torch,
executorch and torchao are imported inside the functions that need them.
"""
