"""Small file helpers: a half-written file must never look like a finished one."""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, flush it to disk, then rename it over ``path``."""
    with staged_file(path) as temporary:
        temporary.write_text(text, encoding="utf-8")


def fsync_file(path: str | Path) -> None:
    """Flush a file's (or a folder's entries') data to disk: a crash after this cannot leave it half-written."""
    handle = os.open(path, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


@contextmanager
def staged_file(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``target`` to write; when the block succeeds, the file is flushed to disk and
    renamed over ``target``. A failed or interrupted write leaves no file that looks like a finished one."""
    target = Path(target)
    temporary = target.with_name(f".{target.name}.{secrets.token_hex(6)}.partial")
    # Created as open() would create it (mode 0o666 less the umask), not mkstemp's 0o600: the file is the user's.
    os.close(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        yield temporary
        fsync_file(temporary)
        os.replace(temporary, target)
        fsync_file(target.parent)  # the rename itself lives in the folder's entries
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def require_free_space(directory: str | Path, needed: int, what: str) -> None:
    """Refuse to start writing ``needed`` bytes into ``directory`` when they cannot fit: a full disk mid-write is
    the worst way to find out."""
    from persian_qlora.errors import PersianQLoRAError

    free = shutil.disk_usage(directory).free
    if free < needed:
        raise PersianQLoRAError(
            f"not enough disk space in {directory}: {what} needs about {needed / 2**30:.2f} GiB and "
            f"{free / 2**30:.2f} GiB are free; free some space or choose another output directory"
        )


@contextmanager
def staged_directory(target: str | Path) -> Iterator[Path]:
    """Yield an empty hidden directory beside ``target``; when the block succeeds, it becomes ``target``.

    An interrupted or failed write leaves no directory that looks like a finished one: the staging directory is
    removed. An existing ``target`` is swapped out, and removed only after the new one is in place.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.partial-{secrets.token_hex(6)}")
    # Made by mkdir (0o777 less the umask), not tempfile.mkdtemp (0o700): a server or another user reads the output.
    staging.mkdir()
    try:
        yield staging
        for path in staging.rglob("*"):  # every file written into it (shards, index, config, card, copies)
            if path.is_file():
                fsync_file(path)
        fsync_file(staging)
        if target.exists():
            retired = target.with_name(f".{target.name}.old-{staging.name.rsplit('-', 1)[-1]}")
            target.rename(retired)
            staging.rename(target)
            fsync_file(target.parent)
            shutil.rmtree(retired)
        else:
            staging.rename(target)
            fsync_file(target.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
