"""Backbones timm lacks, registered with timm on import.

From the repository root ``import models``; installed, ``import tokenreduce.models``
(setup.cfg maps this folder there). Wrappers with optional dependencies are
imported by their own module name, not from here.
"""
from . import vim  # noqa: F401  (registers vim_tiny/small/base_patch16_224)
