"""Files written so that a reader, or a run killed halfway, sees the old file or the new one, never a part.

Every writer goes through a hidden temporary file in the target's folder (a rename is atomic only
within one file system), named uniquely so that two processes writing the same target (Ray workers
converting one adapter) do not share it, and removed when the write fails."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def replacing(target: str | Path) -> Iterator[Path]:
    """A temporary path to write the new `target` to; it replaces `target` when the block ends without an
    error. The file keeps the target's mode, or gets the one a plain open() would give (mkstemp's is a
    private 0600), so that a shipped adapter or a catalogue's tags stay readable by others."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)  # `-o new/dir/out.jsonl`: the folder may not exist yet
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, target.stat().st_mode & 0o777 if target.exists() else 0o666 & ~_umask())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _umask() -> int:
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0)  # elsewhere the only way to read it is to set it: set it straight back
    os.umask(mask)
    return mask


def write_text(path: str | Path, text: str, durable: bool = False) -> Path:
    """Write `text` (UTF-8) to `path`. `durable`: flushed to disk before the rename, for files a resumed
    run trusts as finished (a Ray shard's part), so that a power cut cannot leave an empty one behind."""
    with replacing(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as out:
            out.write(text)
            if durable:
                out.flush()
                os.fsync(out.fileno())
    return Path(path)


def copy_file(source: str | Path, target: str | Path) -> Path:
    """Copy `source` to `target`."""
    with replacing(target) as tmp:
        shutil.copyfile(source, tmp)
    return Path(target)
