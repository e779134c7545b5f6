"""invnext's Triton kernels, importable as ``invnext_kernels``.

The folder is ``kernels/`` in the repository; ``setup.py`` installs it as the top-level
package ``invnext_kernels`` (the bare name ``kernels`` belongs to another PyPI project).
Nothing here is imported by ``import invnext``: ``invnext.ops`` loads a kernel module the
first time an op runs with ``backend="triton"`` (or ``"auto"`` on a CUDA tensor).
"""
