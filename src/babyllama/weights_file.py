"""Files on disk: a safetensors file written with the mode the user's umask gives a new file, as every other
file gets, and the SHA-256 of any file read in blocks.

safetensors' save_file creates its file 0600 whatever the umask, so weights in a checkpoint or an export
shared with a team (umask 0022, shared storage) could be read by their owner only.

torch is imported for type hints only: the data tools hash their inputs with file_sha256 and run without it.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path) -> None:
    """save_file(tensors, path) with metadata {"format": "pt"} (what transformers and peft expect), then the
    file's mode made 0o666 & ~umask. The umask is read by creating the file first (os.umask would change it
    for every thread of the process while it is read). OSError where path cannot be written."""
    from safetensors.torch import save_file

    path = Path(path)
    path.unlink(missing_ok=True)  # an earlier file keeps its own mode when opened, not the umask's
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        mode = os.fstat(fd).st_mode & 0o777
    finally:
        os.close(fd)
    save_file(tensors, str(path), metadata={"format": "pt"})
    os.chmod(path, mode)


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes, hex; read in blocks of 16 MiB, so memory stays flat whatever its size.
    OSError where path cannot be read."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
    return h.hexdigest()
