"""Reading weight files a user points at, without ever running code from them.

`.safetensors` through safetensors; `.pt`/`.pth`/`.bin` through `torch.load(weights_only=True)`,
which refuses any pickle that builds more than tensors and plain containers. The result must be a
flat mapping of names to tensors (a `state_dict` wrapper and DDP's `module.` prefix are undone).
"""

from __future__ import annotations

from pathlib import Path

import torch

from .errors import UserError
from .checkpoint import write_file_atomically

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


def read_tensors(path: str | Path, field: str) -> dict[str, torch.Tensor]:
    """The tensors of a weights file, on the CPU; anything else in it is a `UserError` naming `field`."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(field, f"file not found: {path}", "pass an existing .safetensors or .pth file")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError) as e:
            raise UserError(field, f"{path} is not a readable safetensors file: {e}",
                            "pass a file written by safetensors.torch.save_file") from None
    if path.suffix not in TORCH_SUFFIXES:
        raise UserError(field, f"{path.name} is neither .safetensors nor one of {', '.join(TORCH_SUFFIXES)}",
                        "pass a .safetensors file or a torch state dict (.pth)")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - whatever the file holds, it is the user's file that is wrong
        raise UserError(field, f"{path} cannot be loaded as weights only ({_reason(e)})",
                        "save the state dict alone, or use safetensors") from None
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict) or not data:
        raise UserError(field, f"{path} does not hold a state dict (name -> tensor)",
                        "save it with torch.save(model.state_dict(), path)")
    bad = [k for k, v in data.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise UserError(field, f"{path} holds non-tensor entries, e.g. {bad[0]!r}",
                        "save only the weights: torch.save(model.state_dict(), path)")
    if all(k.startswith("module.") for k in data):
        data = {k[len("module."):]: v for k, v in data.items()}
    return data


def _reason(error: Exception) -> str:
    """The informative line of torch's weights-only refusal (e.g. the global it would not load)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for line in lines:
        if line.startswith("WeightsUnpickler error"):
            # Keep what it refused, not torch's advice to allowlist it.
            return line.split(" was not an allowed global")[0].replace("WeightsUnpickler error: ", "")
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def canonicalize_safetensors(path: str | Path) -> None:
    """Rewrite a safetensors file with its header in a fixed order (`canonical_safetensors`)."""
    path = Path(path)
    raw = path.read_bytes()
    write_file_atomically(path, lambda tmp: tmp.write_bytes(canonical_safetensors(raw)))


def canonical_safetensors(raw: bytes) -> bytes:
    """A safetensors file's bytes with the header in a fixed order, so equal tensors give equal bytes.

    safetensors keeps `__metadata__` in a hash map whose order changes from one process to the
    next; we sort it and list tensors by their data offsets (the data itself is not moved).
    """
    import json
    import struct

    (size,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + size])
    meta = header.pop("__metadata__", None)
    ordered: dict = {}
    if meta is not None:
        ordered["__metadata__"] = dict(sorted(meta.items()))
    ordered.update(sorted(header.items(), key=lambda kv: (kv[1]["data_offsets"][0], kv[0])))
    text = json.dumps(ordered, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)  # safetensors pads the header to 8 bytes
    return struct.pack("<Q", len(text)) + text + raw[8 + size:]
