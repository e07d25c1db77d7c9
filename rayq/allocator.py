"""The allocator set-up lives with the kernels (`rayq.kernels.allocator`, torch-free, so
`rayq bench int8` can use it without importing the core); the core re-exports it."""

from rayq.kernels.allocator import describe, keep_pages

__all__ = ["describe", "keep_pages"]
