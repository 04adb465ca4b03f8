"""Files written so that a reader, or a run killed halfway, sees the old file or the new one, never a part.

Every writer goes through a hidden temporary file in the target's folder (a rename is atomic only
within one file system), named uniquely so that two processes writing the same target do not share it."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def _temporary(target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)  # `-o new/dir/out.jsonl`: the folder may not exist yet
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    # mkstemp makes the file private (0600); the file it becomes keeps the target's mode, or gets the one
    # a plain open() would give, so that a shipped adapter or a catalogue's tags stay readable by others.
    os.fchmod(fd, target.stat().st_mode & 0o777 if target.exists() else 0o666 & ~_umask())
    os.close(fd)
    return Path(name)


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it: set it straight back
    os.umask(mask)
    return mask


def write_text(path: str | Path, text: str, durable: bool = False) -> Path:
    """Write `text` (UTF-8) to `path`. `durable`: flushed to disk before the rename, for files a resumed
    run trusts as finished (a Ray shard's part), so that a power cut cannot leave an empty one behind."""
    path = Path(path)
    tmp = _temporary(path)
    try:
        with open(tmp, "w", encoding="utf-8") as out:
            out.write(text)
            if durable:
                out.flush()
                os.fsync(out.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def copy_file(source: str | Path, target: str | Path) -> Path:
    """Copy `source` to `target`."""
    target = Path(target)
    tmp = _temporary(target)
    try:
        shutil.copyfile(source, tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target
