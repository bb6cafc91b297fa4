"""Training subpackage: landmark datasets, group-size sampling, losses, the loop and whitening.

Imports ``dtop_export`` (model, checkpoint) but never ``engines``.
"""
