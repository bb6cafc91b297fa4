"""dtop-export: train DToP image-retrieval models and ship them as ONNX / TensorRT descriptors.

The layout follows the data flow (DESIGN.md § Layout):

* ``model/`` — DToP per paper section (config, backbone, DPE, ELM, the model); imports torch/timm only.
* ``contract`` — the engine interface and the deployment metadata (write, read, -> ``PreprocessConfig``).
* ``preprocess`` — the one path from an image file to a model input, and ``list_images``.
* ``checkpoint``, ``fold`` — safe checkpoints; folding BN, weight standardisation and whitening for export;
  ``digest`` their sha256 (remembered, startable before torch is imported).
* ``export``, ``fp16/``, ``optimize``, ``quantize`` — the artefact makers (ONNX, FP16, ORT-optimized, INT8);
  ``onnx_graph`` holds their graph helpers, ``logs`` their quieting.
* ``retrieval/`` — the revisitop protocol, data sets, extraction, evaluation, faiss search, the picture.
* ``parity``, ``bench/`` — the comparison layer (one ``Contract`` table) and the benchmark harness.
* ``pipeline/`` — the artefact chain and the demo, used by ``demo``, ``bench --derive`` and later commands.
* ``engines`` (folder ``engines/``) and ``training`` (folder ``training/``) install under this package.
* ``cli/`` — one module per command; parses and prints only. Nothing else imports it.

Heavy imports (torch, timm, onnx) are deliberately not made here so that ``import dtop_export`` and
``dtop-export --help`` stay instant; import from the submodules instead.
"""

from dtop_export.errors import DToPError

__version__ = "0.1.0"
__all__ = ["DToPError", "__version__"]
