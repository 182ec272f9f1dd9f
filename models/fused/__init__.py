"""Fast paths for ECA blocks, applied to a plain model by one explicit call: :func:`fuse_eca`."""
from .fuse import IMPLS, fuse_eca

__all__ = ["IMPLS", "fuse_eca"]
