"""Checkpoints without pickle: safetensors for every tensor, JSON for everything else, written atomically.

One checkpoint is a folder ``<root>/step_<8 digits>/``::

    model.safetensors   the model's weights (frozen teacher excluded; the Stage-2 target included),
                        with the model config in its metadata (``invnext.loading.load_encoder`` reads it)
    optim.safetensors   every optimizer state tensor, named ``state/<parameter name>/<key>``
    rng.safetensors     per rank: ``rank<r>/torch`` (CPU generator), ``rank<r>/cuda`` (its device's), ``rank<r>/numpy``
    state.json          step, data position, schedule, counters, config, the optimizer index
                        (param groups with parameter names; per state entry a tensor name or a plain
                        value) and the non-tensor RNG states (Python's ``random``, numpy's position)

Writing: everything goes into ``<root>/.tmp-step_<n>-<pid>/``, each file is fsync'd, the folder is
renamed to ``step_<n>`` (atomic on one filesystem), then ``<root>/latest`` (a one-line text file
naming the folder) is replaced atomically through a temp file. So a kill at any moment leaves
either the previous checkpoint or the new one as ``latest``, never a half-written one; leftover
``.tmp-*`` folders are ignored by readers and removed by the next write (only those of dead
processes: the pid in the name keeps a live writer's folder safe) or :func:`clean_partial`. A
write that fails (a full disk) removes its own temp folder before raising :class:`CheckpointWriteError`.
After a write only the newest ``keep_last`` complete checkpoints are kept.

Loading never unpickles: ``safetensors.torch.load_file`` and ``json.load`` only. A damaged file
raises :class:`CheckpointError` naming it; :func:`read_latest` then falls back to the newest
checkpoint that reads. :class:`OutputLock` keeps a second run out of a stage folder in use.
"""
from __future__ import annotations

import errno
import json
import math
import os
import random
import shutil
import socket
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from invnext.checkpoint_layout import (  # the folder layout, below the trainer: evaluation reads it too
    MODEL_FILE,
    STATE_FILE,
    complete_checkpoints,
    is_complete,
    latest_checkpoint,
    resolve_weights,
    step_dir_name,
)

__all__ = [
    "MODEL_FILE",
    "OPTIM_FILE",
    "RNG_FILE",
    "STATE_FILE",
    "CheckpointError",
    "CheckpointWriteError",
    "CheckpointWriter",
    "OutputLock",
    "OutputLockedError",
    "clean_partial",
    "complete_checkpoints",
    "copy_atomic",
    "flatten_optimizer_state",
    "latest_checkpoint",
    "load_named_optimizer_state",
    "named_optimizer_state",
    "read_checkpoint",
    "read_latest",
    "resolve_weights",
    "restore_rng_state",
    "rng_state",
    "step_dir_name",
    "unflatten_optimizer_state",
]

OPTIM_FILE = "optim.safetensors"
RNG_FILE = "rng.safetensors"
LATEST = "latest"
_TMP = ".tmp-"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read (its message names the file)."""


class CheckpointWriteError(OSError):
    """Writing a checkpoint failed (e.g. a full disk); its partial write was removed."""


class OutputLockedError(RuntimeError):
    """Another live process holds the output folder's lock."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _writer_pid(name: str) -> int | None:
    """The process id a temp entry's name ends with (``.tmp-step_00000004-1234``), None for older names."""
    tail = name.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() and name.count("-") >= 2 else None


def clean_partial(root: str | os.PathLike, *, keep_live: bool = False) -> list[Path]:
    """Remove the temp folders a killed write left under ``root``; returns what was removed.

    ``keep_live=True`` keeps the temp entries of other processes that are still alive (a writer
    never deletes another's in-progress write, even without the output lock).
    """
    r = Path(root)
    removed = []
    if r.is_dir():
        for p in r.iterdir():
            if not p.name.startswith(_TMP):
                continue
            pid = _writer_pid(p.name)
            if keep_live and pid is not None and pid != os.getpid() and _pid_alive(pid):
                continue
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=1, sort_keys=True, allow_nan=False))
    _fsync_file(path)


def _save_tensors(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> None:
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, os.fspath(path), metadata=dict(metadata or {}) or None)
    _fsync_file(path)


# --------------------------------------------------------------------------- optimizer state


def _jsonable(value: Any, where: str) -> Any:
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"checkpoint: {where} is not finite ({value})")
        return value
    if isinstance(value, (tuple, list)):
        return [_jsonable(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return _jsonable(value.item(), where)
    raise TypeError(f"checkpoint: {where} of type {type(value).__name__} cannot be stored as JSON")


def flatten_optimizer_state(osd: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A name-keyed optimizer state dict -> ``(tensors, JSON index)``.

    ``osd`` is what ``torch.distributed.checkpoint.state_dict.get_optimizer_state_dict`` returns:
    ``{"state": {param_name: {key: tensor | value}}, "param_groups": [{..., "params": [param_name]}]}``.
    """
    tensors: dict[str, torch.Tensor] = {}
    index: dict[str, Any] = {"state": {}, "param_groups": []}
    for name, entry in osd.get("state", {}).items():
        slot = {}
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tname = f"state/{name}/{key}"
                tensors[tname] = value
                slot[key] = {"tensor": tname}
            else:
                slot[key] = {"value": _jsonable(value, f"optimizer state {name}.{key}")}
        index["state"][str(name)] = slot
    for i, group in enumerate(osd.get("param_groups", [])):
        index["param_groups"].append({k: _jsonable(v, f"param_groups[{i}].{k}") for k, v in group.items()})
    return tensors, index


def unflatten_optimizer_state(tensors: Mapping[str, torch.Tensor], index: Mapping[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`flatten_optimizer_state` (lists of numbers in groups become tuples, e.g. betas)."""
    state = {}
    for name, slot in index["state"].items():
        entry = {}
        for key, ref in slot.items():
            if "tensor" in ref:
                if ref["tensor"] not in tensors:
                    raise ValueError(f"checkpoint: optimizer tensor {ref['tensor']!r} is missing from {OPTIM_FILE}")
                entry[key] = tensors[ref["tensor"]]
            else:
                entry[key] = ref["value"]
        state[name] = entry
    groups = []
    for group in index["param_groups"]:
        g = {}
        for k, v in group.items():
            g[k] = tuple(v) if k != "params" and isinstance(v, list) and all(isinstance(x, (int, float)) for x in v) else v
        groups.append(g)
    return {"state": state, "param_groups": groups}


def named_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``optimizer.state_dict()`` with parameter names (as in ``model.named_parameters()``) instead of indices.

    The same layout ``torch.distributed.checkpoint.state_dict.get_optimizer_state_dict`` returns,
    which the FSDP path uses; both give the same files.
    """
    names = {id(p): n for n, p in model.named_parameters()}
    sd = optimizer.state_dict()
    index_name: dict[int, str] = {}
    for g_sd, group in zip(sd["param_groups"], optimizer.param_groups):
        for i, p in zip(g_sd["params"], group["params"]):
            if id(p) not in names:
                raise ValueError("named_optimizer_state: the optimizer holds a parameter that is not in the model")
            index_name[i] = names[id(p)]
    return {
        "state": {index_name[i]: v for i, v in sd["state"].items()},
        "param_groups": [{**g, "params": [index_name[i] for i in g["params"]]} for g in sd["param_groups"]],
    }


def load_named_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, osd: Mapping[str, Any]) -> None:
    """The inverse of :func:`named_optimizer_state`: load a name-keyed state into ``optimizer``."""
    names = {id(p): n for n, p in model.named_parameters()}
    index: dict[str, int] = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            index[names[id(p)]] = len(index)
    groups = []
    for g in osd["param_groups"]:
        unknown = [n for n in g["params"] if n not in index]
        if unknown:
            raise ValueError(f"checkpoint: the optimizer state names parameters this model does not train: {unknown[:5]}")
        groups.append({**g, "params": [index[n] for n in g["params"]]})
    optimizer.load_state_dict({"state": {index[n]: v for n, v in osd["state"].items()}, "param_groups": groups})


# --------------------------------------------------------------------------- RNG


def rng_state(rank: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """This process's RNG states: tensors (torch CPU, CUDA device, numpy key) and JSON (Python, numpy position)."""
    tensors = {f"rank{rank}/torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors[f"rank{rank}/cuda"] = torch.cuda.get_rng_state()
    kind, key, pos, has_gauss, cached = np.random.get_state()
    tensors[f"rank{rank}/numpy"] = torch.from_numpy(np.asarray(key, dtype=np.int64))
    py_version, py_state, py_gauss = random.getstate()
    meta = {"python": [py_version, list(py_state), py_gauss], "numpy": [kind, int(pos), int(has_gauss), float(cached)]}
    return tensors, meta


def restore_rng_state(rank: int, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> bool:
    """Restore what :func:`rng_state` saved for ``rank``; False if the checkpoint holds none for it."""
    if f"rank{rank}/torch" not in tensors:
        return False
    torch.set_rng_state(tensors[f"rank{rank}/torch"].to(torch.uint8))
    if f"rank{rank}/cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors[f"rank{rank}/cuda"].to(torch.uint8))
    kind, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, tensors[f"rank{rank}/numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
    version, state, gauss = meta["python"]
    random.setstate((version, tuple(state), gauss))
    return True


# --------------------------------------------------------------------------- writing and reading


class CheckpointWriter:
    """Writes checkpoints under ``root`` (module docstring). ``crash_hook(stage_name)`` is a test seam."""

    def __init__(self, root: str | os.PathLike, keep_last: int, crash_hook: Callable[[str], None] | None = None):
        if keep_last < 1:
            raise ValueError(f"CheckpointWriter: keep_last must be >= 1, got {keep_last}")
        self.root = Path(root)
        self.keep_last = keep_last
        self.crash_hook = crash_hook or (lambda where: None)

    def temp_dir(self, step: int) -> Path:
        return self.root / f"{_TMP}{step_dir_name(step)}-{os.getpid()}"

    def begin(self, step: int) -> Path:
        """Create (empty) the temp folder of ``step`` (removing those left by killed writes)."""
        self.root.mkdir(parents=True, exist_ok=True)
        clean_partial(self.root, keep_live=True)
        tmp = self.temp_dir(step)
        tmp.mkdir()
        return tmp

    def commit(
        self,
        tmp: Path,
        step: int,
        model_state: Mapping[str, torch.Tensor],
        optim_state: Mapping[str, Any],
        state: Mapping[str, Any],
        rng_tensors: Mapping[str, torch.Tensor],
        rng_meta: Mapping[str, Any],
        model_metadata: Mapping[str, str] | None = None,
    ) -> Path:
        """Write the files into ``tmp``, rename it to ``step_<n>``, point ``latest`` at it, prune old ones.

        ``rng_tensors`` / ``rng_meta``: every rank's :func:`rng_state` (tensor names carry the rank;
        ``rng_meta`` maps ``"rank<r>"`` to that rank's JSON part).
        A failure (not a kill) removes ``tmp`` and the pointer's temp file before raising.
        """
        pointer_tmp = self.root / f"{_TMP}latest-{os.getpid()}"
        try:
            return self._commit(
                tmp, step, model_state, optim_state, state, rng_tensors, rng_meta, model_metadata, pointer_tmp
            )
        except Exception as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            pointer_tmp.unlink(missing_ok=True)
            if isinstance(exc, (OSError, SafetensorError)):  # safetensors reports a full disk as its own error
                raise CheckpointWriteError(
                    f"writing checkpoint {step_dir_name(step)} under {self.root} failed: {exc}; its partial write "
                    f"{tmp.name} was removed (free disk space, then --resume)"
                ) from exc
            raise

    def _commit(
        self, tmp, step, model_state, optim_state, state, rng_tensors, rng_meta, model_metadata, pointer_tmp
    ) -> Path:
        _save_tensors(tmp / MODEL_FILE, model_state, model_metadata)
        self.crash_hook("after_model")
        opt_tensors, opt_index = flatten_optimizer_state(optim_state)
        _save_tensors(tmp / OPTIM_FILE, opt_tensors)
        _save_tensors(tmp / RNG_FILE, rng_tensors)
        _write_json(tmp / STATE_FILE, {**state, "step": step, "optimizer": opt_index, "rng": dict(rng_meta)})
        self.crash_hook("before_rename")
        final = self.root / step_dir_name(step)
        if final.exists():  # the same step written again (a resumed run that had saved it): replace it
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(self.root)
        pointer_tmp.write_text(final.name + "\n")
        _fsync_file(pointer_tmp)
        os.replace(pointer_tmp, self.root / LATEST)
        _fsync_dir(self.root)
        self.prune()
        return final

    def prune(self) -> None:
        done = complete_checkpoints(self.root)
        for old in done[: max(0, len(done) - self.keep_last)]:
            shutil.rmtree(old, ignore_errors=True)


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A checkpoint folder's contents: ``model`` (tensors), ``model_metadata``, ``optim`` (name-keyed
    optimizer state dict), ``rng`` (tensors), ``state`` (the JSON)."""
    p = Path(path)
    if not is_complete(p):
        raise FileNotFoundError(f"{p} is not a complete checkpoint (needs {MODEL_FILE} and {STATE_FILE})")
    where = p / STATE_FILE
    try:
        state = json.loads(where.read_text())
        if not isinstance(state, dict) or not isinstance(state.get("optimizer"), dict):
            raise ValueError("not a checkpoint state (no 'optimizer' index)")
        where = p / MODEL_FILE
        with safe_open(os.fspath(where), framework="pt") as f:
            metadata = f.metadata() or {}
        model = load_file(os.fspath(where))
        where = p / OPTIM_FILE
        optim = unflatten_optimizer_state(load_file(os.fspath(where)), state["optimizer"])
        where = p / RNG_FILE
        rng = load_file(os.fspath(where)) if where.is_file() else {}
    except (SafetensorError, OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(
            f"checkpoint file {where} is damaged or unreadable: {type(exc).__name__}: {exc}"
        ) from None
    return {"model": model, "model_metadata": metadata, "optim": optim, "rng": rng, "state": state}


def read_latest(root: str | os.PathLike, log: Callable[[str], None] = print) -> tuple[Path, dict[str, Any]] | None:
    """``(folder, contents)`` of the newest checkpoint under ``root`` that reads, None when there is none.

    A damaged newer one is skipped with a message through ``log`` naming its bad file (a
    crash or a bad disk must not block ``--resume``). Raises :class:`CheckpointError` listing
    every file when no complete checkpoint reads.
    """
    damaged = []
    for folder in reversed(complete_checkpoints(root)):
        try:
            data = read_checkpoint(folder)
        except CheckpointError as exc:
            damaged.append(str(exc))
            log(f"{exc}; falling back to the previous complete checkpoint")
            continue
        return folder, data
    if damaged:
        raise CheckpointError(f"no checkpoint under {root} can be read: " + "; ".join(damaged))
    return None


class OutputLock:
    """An exclusive lock on an output folder, held from :meth:`acquire` to :meth:`release`.

    ``<folder>/.lock`` is ``flock``ed (the kernel drops the lock when its process dies, even by
    kill -9, so a dead run's lock is never in the way) and holds ``pid host`` for the message.
    Where ``flock`` is not supported (some network filesystems) the recorded pid decides: a lock
    of a live process on this host blocks, one of a dead process is taken over.
    """

    NAME = ".lock"

    def __init__(self, folder: str | os.PathLike):
        self.path = Path(folder) / self.NAME
        self._fd: int | None = None

    def _holder(self) -> str:
        try:
            return self.path.read_text().strip() or "unknown"
        except OSError:
            return "unknown"

    def _locked_error(self) -> OutputLockedError:
        return OutputLockedError(
            f"{self.path.parent} is in use by another run (pid and host: {self._holder()}); wait for it to finish "
            f"or choose another --out (if no such process is alive, delete {self.path})"
        )

    def acquire(self) -> OutputLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise self._locked_error() from None
        except (ImportError, OSError) as exc:
            unsupported = (errno.ENOLCK, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EINVAL)
            if isinstance(exc, OSError) and exc.errno not in unsupported:
                os.close(fd)
                raise
            holder = self._holder().split()
            host = socket.gethostname()
            if len(holder) == 2 and holder[0].isdigit() and holder[1] == host and int(holder[0]) != os.getpid() \
                    and _pid_alive(int(holder[0])):
                os.close(fd)
                raise self._locked_error() from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)  # an empty lock file: nobody holds it
        except OSError:
            pass
        os.close(self._fd)  # closing drops the flock
        self._fd = None

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def copy_atomic(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Copy ``src`` to ``dst`` through a temp file and a rename (readers never see a partial file)."""
    d = Path(dst)
    tmp = d.with_name(f"{_TMP}{d.name}-{os.getpid()}")
    shutil.copyfile(src, tmp)
    _fsync_file(tmp)
    os.replace(tmp, d)
    return d
