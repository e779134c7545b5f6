"""The base of every op module: an ``nn.Module`` that calls one ``invnext.ops`` function."""
from __future__ import annotations

from torch import nn

from invnext.ops._dispatch import OPS_BACKENDS, op_backend


class FusedOp(nn.Module):
    """Calls the ``invnext.ops`` function named by the class attribute ``op``.

    ``ops_backend`` is the module's choice; :func:`invnext.models.switches.set_ops_backend`
    sets it on every such module of a model (invnext's models build their fused parts from these).
    """

    op: str
    ops_backend: str = "auto"

    def __init__(self, backend: str = "auto"):
        super().__init__()
        if backend not in OPS_BACKENDS:
            raise ValueError(f"{type(self).__name__}: backend must be one of {OPS_BACKENDS}, got {backend!r}")
        self.ops_backend = backend

    @property
    def backend(self) -> str:
        """The backend argument this module passes to its op."""
        return op_backend(self.ops_backend, self.op)

    def _settings(self) -> dict:
        return {}

    def extra_repr(self) -> str:
        items = {**self._settings(), "backend": self.ops_backend}
        return ", ".join(f"{k}={v!r}" for k, v in items.items())
