"""Retrieval: the Revisited Oxford/Paris protocol and everything around it.

``metrics`` (the revisitop protocol alone: AP, mAP, mP@k, Easy/Medium/Hard, ranking with distractors; numpy
only), ``datasets`` (revisitop-layout sets, distractor descriptors), ``sample_data`` (the embedded sample set
built from scikit-image's photos), ``extract`` (descriptors of images through any engine, multi-scale),
``evaluate`` (one engine on one data set), ``flips`` (the positive/negative pairs an engine's similarity error
flipped, and whether they were near-ties), ``search`` (faiss indexes, numpy fallback) and ``visualize`` (the
retrieval picture). Takes engines, never imports a runtime; may import ``preprocess`` and ``contract``.
"""
