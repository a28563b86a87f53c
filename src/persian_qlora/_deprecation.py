"""Old argument names kept for one release after a rename, so that code written against them keeps running."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])

# The release after which renamed arguments lose their old names.
REMOVED_AFTER = "0.2"


def warn_renamed(old: str, new: str, where: str, *, stacklevel: int = 3) -> None:
    """Say that ``old`` is deprecated in ``where`` in favour of ``new`` (a FutureWarning: shown to users by default,
    unlike a DeprecationWarning raised from library code)."""
    warnings.warn(
        f"{where}: {old} is deprecated and will be removed after persian-qlora {REMOVED_AFTER}; use {new}",
        FutureWarning,
        stacklevel=stacklevel,
    )


def renamed_arguments(**new_name_of: str) -> Callable[[F], F]:
    """Accept each old keyword (``old="new"``) as a deprecated alias of the new one, with a FutureWarning."""

    def decorate(func: F) -> F:
        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            for old, new in new_name_of.items():
                if old not in kwargs:
                    continue
                if new in kwargs:
                    raise TypeError(f"{func.__name__}() got both {old}= (deprecated) and {new}=; pass {new}= alone")
                warn_renamed(f"{old}=", f"{new}=", f"{func.__name__}()")
                kwargs[new] = kwargs.pop(old)
            return func(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate
