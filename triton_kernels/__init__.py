"""Triton kernels of pydiffmed, one module per op (group_norm, ...), each with a `<op>_launch` function.

Importing this package does not import triton; the op modules do. Without a GPU they run only under the
interpreter, which must be switched on (TRITON_INTERPRET=1) before the first module is imported.
"""
