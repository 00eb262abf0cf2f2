"""Opt-in cache of solved tensors, so an interrupted or repeated merge does not solve again.

Set `MERGEKIT_WUDI_CACHE=DIR` (an environment variable, not a YAML parameter: the path is
a local operational choice that has no place in a merge recipe shared on a model card,
and it changes no result). Every solved tensor is then stored as
`DIR/<method>/<key>.safetensors`, where the key is the SHA-256 of:

- the method name, the tensor name, the package, torch and entry-format versions, and
  the device type the solve ran on;
- the dtype, shape and bytes (SHA-256) of every input tensor, base first, then the
  models in the order mergekit hands them over (the order of the YAML `models:` list);
- the parameters the solved tensor depends on (the caller picks them: for mergekit-wudi
  `weight`, `lambda`, `input_major` and the solver config's fields, never `fallback`).

The entry holds the final tensor, in the dtype the solve returned. A hit returns it
bit for bit; a rerun that changes only the fallback (or anything else that is not in
the key) solves nothing again, and a change of any input byte or keyed parameter misses.
Entries are written to a temporary file and renamed with `os.replace`, so a merge killed
mid-write leaves no half-written entry; an entry that cannot be read, or that does not
match its key, is ignored with a warning and solved again. A cache that cannot be
written (disk full, read-only) only costs a warning.

Pure torch + safetensors: nothing here imports mergekit.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file

logger = logging.getLogger(__name__)

CACHE_ENV = "MERGEKIT_WUDI_CACHE"
_FORMAT = 1
_TENSOR_KEY = "solved"


def tensor_digest(tensor: torch.Tensor) -> str:
    """SHA-256 of a tensor's bytes in row-major order (copied to the CPU if needed)."""
    data = tensor.detach().contiguous().cpu()
    digest = hashlib.sha256()
    if data.numel():
        digest.update(memoryview(data.reshape(-1).view(torch.uint8).numpy()))
    return digest.hexdigest()


class SolveCache:
    """A directory of solved tensors, keyed by everything the solve depends on."""

    def __init__(self, root: os.PathLike):
        self.root = Path(root)

    @classmethod
    def from_environment(cls) -> Optional[SolveCache]:
        """The cache named by MERGEKIT_WUDI_CACHE, or None when it is unset or empty."""
        root = os.environ.get(CACHE_ENV, "").strip()
        return cls(root) if root else None

    @staticmethod
    def key_material(
        method: str, name: str, inputs: Sequence[torch.Tensor], parameters: Mapping[str, Any]
    ) -> str:
        """The canonical JSON text that the key hashes (also stored in the entry)."""
        from mergekit_wudi import __version__

        devices = sorted({tensor.device.type for tensor in inputs})
        material = {
            "format": _FORMAT,
            "mergekit_wudi": __version__,
            "torch": torch.__version__,
            "method": method,
            "tensor": name,
            "device": devices,
            "inputs": [
                {"dtype": str(tensor.dtype), "shape": list(tensor.shape), "sha256": tensor_digest(tensor)}
                for tensor in inputs
            ],
            "parameters": dict(parameters),
        }
        return json.dumps(material, sort_keys=True, default=repr)

    def path(self, method: str, material: str) -> Path:
        return self.root / method / (hashlib.sha256(material.encode()).hexdigest() + ".safetensors")

    def solve(
        self,
        method: str,
        name: str,
        inputs: Sequence[torch.Tensor],
        parameters: Mapping[str, Any],
        solve: Callable[[], torch.Tensor],
    ) -> torch.Tensor:
        """solve()'s result, from the cache when an entry for the same key exists."""
        material = self.key_material(method, name, inputs, parameters)
        path = self.path(method, material)
        cached = self._load(path, material, name, device=inputs[0].device)
        if cached is not None:
            logger.info("%s: %s from the solve cache (%s)", method, name, path.name)
            return cached
        result = solve()
        self._store(path, material, name, result)
        logger.info("%s: %s solved; cached as %s", method, name, path.name)
        return result

    def _load(self, path: Path, material: str, name: str, device: torch.device) -> Optional[torch.Tensor]:
        if not path.exists():
            return None
        try:
            with safe_open(str(path), framework="pt") as entry:
                stored = (entry.metadata() or {}).get("key")
                if stored != material:
                    raise ValueError("its key does not match")
                tensor = entry.get_tensor(_TENSOR_KEY)
        except Exception as error:  # a corrupt or foreign file: solve again, overwrite it
            logger.warning("solve cache: ignoring entry %s for %s (%s); solving again", path, name, error)
            return None
        return tensor.to(device)

    def _store(self, path: Path, material: str, name: str, tensor: torch.Tensor) -> None:
        temporary = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".safetensors")
            os.close(handle)
            save_file(
                {_TENSOR_KEY: tensor.detach().contiguous().cpu()},
                temporary,
                metadata={"key": material, "tensor": name},
            )
            os.replace(temporary, path)  # atomic: readers see the old entry or the whole new one
            temporary = None
        except OSError as error:
            logger.warning("solve cache: could not write %s for %s (%s); continuing without it", path, name, error)
        finally:
            if temporary is not None and os.path.exists(temporary):
                os.unlink(temporary)
