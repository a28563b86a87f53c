"""Small file helpers: a half-written file must never look like a finished one."""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, flush it to disk, then rename it over ``path``."""
    with staged_file(path) as temporary:
        temporary.write_text(text, encoding="utf-8")


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
        with open(temporary, "rb") as written:
            os.fsync(written.fileno())
        os.replace(temporary, target)
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
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        yield staging
        if target.exists():
            retired = target.with_name(f".{target.name}.old-{staging.name.rsplit('-', 1)[-1]}")
            target.rename(retired)
            staging.rename(target)
            shutil.rmtree(retired)
        else:
            staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
