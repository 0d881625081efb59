"""Atomic writes and safetensors checkpoints (never pickle).

Every file dcube writes goes to a temporary file in the same directory and is then
renamed into place, so an interrupted run never leaves a half-written file behind.

With several processes (:mod:`dcube.utils.dist`) every rank calls the same writers at the same
points; process 0 alone writes, between two barriers: after the first, every rank has made its
decisions from the files as they were (e.g. "is there a checkpoint?"); after the second, every
rank sees the new file. In one process the barriers do nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file


def safe_name(text: str, fallback: str = "file") -> str:
    """The one place a name from the data (class name, input file name) becomes part of a file name:
    letters, digits and ``._+-`` only, at most 80 characters, so no label can steer where a file goes
    (``../../x`` becomes ``x``)."""
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", str(text)).strip("._")[:80] or fallback


def atomic_write(path: str | Path, write) -> Path:
    from dcube.utils import dist

    path = Path(path)
    if dist.world_size() > 1:
        dist.barrier()
        try:
            if dist.is_main():
                _atomic_write(path, write)
        finally:
            dist.barrier()
        return path
    return _atomic_write(path, write)


def _atomic_write(path: Path, write) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    return atomic_write(path, write)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(data)

    return atomic_write(path, write)


def write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_jsonable) + "\n")


def read_json(path: str | Path) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"missing file: {path}") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict | None = None) -> Path:
    """Save tensors as safetensors, atomically; `meta` (JSON-able) goes into the header."""
    flat = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    header = {"dcube": json.dumps(meta or {}, default=_jsonable)}
    return atomic_write(path, lambda tmp: save_file(flat, tmp, metadata=header))


def load_tensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Load a safetensors file written by :func:`save_tensors` -> (tensors, meta)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"missing checkpoint: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("dcube", "{}"))
        return load_file(str(path)), meta
    except Exception as exc:  # safetensors raises its own error types
        raise ValueError(f"{path}: not a readable safetensors checkpoint ({exc})") from exc


_NP_DTYPES = {"F16": "float16", "F32": "float32", "BF16": None, "F64": "float64", "I64": "int64", "I32": "int32",
              "U8": "uint8", "BOOL": "bool"}


def disk_tensors(path: str | Path) -> tuple[dict, dict]:
    """A safetensors file's tensors as :class:`dcube.utils.rows.DiskRows` (rows are read from disk when
    indexed; nothing is held in RAM) -> (tensors, meta). Hand-written because safetensors' loaders copy or
    map the whole tensor: the format is an 8-byte header length, a JSON header with each tensor's dtype,
    shape and byte range, then the raw little-endian data."""
    from dcube.utils.rows import DiskRows

    path = Path(path)
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    meta = json.loads((header.pop("__metadata__", None) or {}).get("dcube", "{}"))
    out = {}
    for name, spec in header.items():
        dtype = _NP_DTYPES.get(spec["dtype"])
        if dtype is None:
            raise ValueError(f"{path}: tensor {name!r} has dtype {spec['dtype']}, which cannot be read by rows")
        start, end = spec["data_offsets"]
        shape = tuple(spec["shape"])
        if end == start or not shape or len(shape) < 1:
            out[name] = torch.empty(shape, dtype=getattr(torch, dtype))
            continue
        out[name] = DiskRows(path, shape, dtype, offset=8 + n + start)
    return out, meta


def save_checkpoint(path: str | Path, modules: dict[str, torch.nn.Module | torch.optim.Optimizer | Any],
                    meta: dict | None = None) -> Path:
    """Save several modules' state dicts (prefixed by name) in one safetensors file.

    Optimiser states are flattened: tensors go to the file, the rest to the metadata.
    """
    tensors: dict[str, torch.Tensor] = {}
    extra: dict[str, Any] = {}
    for name, obj in modules.items():
        if isinstance(obj, torch.optim.Optimizer):
            sd = obj.state_dict()
            extra[name] = {"param_groups": sd["param_groups"], "state_keys": {}}
            for pid, st in sd["state"].items():
                keys = {}
                for k, v in st.items():
                    if torch.is_tensor(v):
                        tensors[f"{name}.state.{pid}.{k}"] = v
                        keys[k] = "tensor"
                    else:
                        keys[k] = v
                extra[name]["state_keys"][str(pid)] = keys
        else:
            for k, v in obj.state_dict().items():
                tensors[f"{name}.{k}"] = v
    return save_tensors(path, tensors, {**(meta or {}), "_optim": extra})


def load_checkpoint(path: str | Path, modules: dict[str, Any]) -> dict:
    """Restore what :func:`save_checkpoint` wrote into `modules`; returns the metadata."""
    tensors, meta = load_tensors(path)
    optim = meta.pop("_optim", {})
    for name, obj in modules.items():
        if isinstance(obj, torch.optim.Optimizer):
            info = optim.get(name)
            if info is None:
                raise ValueError(f"{path}: no optimiser state {name!r}")
            state = {}
            for pid, keys in info["state_keys"].items():
                state[int(pid)] = {
                    k: (tensors[f"{name}.state.{pid}.{k}"] if v == "tensor" else v) for k, v in keys.items()
                }
            obj.load_state_dict({"state": state, "param_groups": info["param_groups"]})
        else:
            prefix = f"{name}."
            sd = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            if not sd:
                raise ValueError(f"{path}: no weights for {name!r}")
            obj.load_state_dict(sd)
    return meta


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def sha256_tensor(t) -> str:
    """sha256 of a tensor's bytes; an on-disk split (dcube.data.store) is hashed chunk by chunk, to the same
    digest its in-RAM tensor would have."""
    if isinstance(t, torch.Tensor):
        return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()
    h = hashlib.sha256()
    for a in range(0, len(t), 4096):
        h.update(t[a:a + 4096].contiguous().numpy().tobytes())
    return h.hexdigest()
