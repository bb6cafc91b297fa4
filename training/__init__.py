"""``dtop_export.training``: training DToP checkpoints.

``config`` (the recipe as dataclasses + YAML, ``configs/``; ``config_build`` types plain values into them),
``datasets`` (SfM-120k, GLDv2, GLDv1, NC-clean, folder and revisitop readers; ``lists`` their list files, ``scan``
the folder walk and image-size scan), ``transforms`` (crop, flip, illumination, the shared normalisation),
``sampler`` (group-size batches), ``tuples`` (contrastive tuples, hard-negative mining), ``losses``,
``optim``, ``state`` (the resumable state file), ``stop`` (signals and Ctrl-C, on every process), ``loop`` (the
Trainer: set-up, resume, checkpoints; ``build`` its model, data and sampler, ``epoch`` its epochs and steps (AMP,
accumulation, stopping), ``ddp`` the process group, ``run_logs`` its CSV and TensorBoard logs), ``embed`` /
``validate`` (descriptors and mAP of the in-memory model), ``whitening`` (Lw / PCA), ``sample`` (the embedded
training set) and ``progress``.

May import the core (``model``, ``checkpoint``, ``preprocess``, ``contract``, ``retrieval``); never
``dtop_export.engines`` or the CLI. This folder installs as ``dtop_export.training``.
"""
