"""The library's exceptions: one base class, subclasses that carry the facts a user needs to find the problem."""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "InvalidRecordError",
    "MissingExtraError",
    "NonFiniteError",
    "PersianQLoRAError",
    "TemplateError",
]


class PersianQLoRAError(Exception):
    """Base class of every error persian-qlora raises on purpose."""


class ConfigError(PersianQLoRAError, ValueError):
    """A setting is invalid, or contradicts another; raised before anything is loaded or trained."""


class TemplateError(PersianQLoRAError):
    """The tokenizer's chat template is missing or is not Gemma's turn format."""


class MissingExtraError(PersianQLoRAError, ImportError):
    """An optional part of persian-qlora was asked for, and the packages of its extra are not installed."""

    def __init__(self, what: str, extra: str, missing: str) -> None:
        self.extra = extra
        super().__init__(f"{what} needs the {missing!r} package: pip install 'persian-qlora[{extra}]'")


class InvalidRecordError(PersianQLoRAError, ValueError):
    """A conversation record is malformed. ``where`` names the file and line (or record index) it came from.

    ``reason`` is a short, stable label (e.g. ``"unknown role"``) used to count skipped records; ``message_index``
    is the 0-based position of the offending message, when one message is at fault; ``field`` names the record's
    field at fault in formats whose turns come from named fields (e.g. Alpaca's ``output``).
    """

    def __init__(
        self, where: str, reason: str, detail: str, message_index: int | None = None, field: str | None = None
    ) -> None:
        self.where = where
        self.reason = reason
        self.detail = detail
        self.message_index = message_index
        self.field = field
        place = where if field is None else f"{where}, field {field!r}"
        place = place if message_index is None else f"{place}, message {message_index}"
        super().__init__(f"{place}: {detail}")


class NonFiniteError(PersianQLoRAError, FloatingPointError):
    """Training produced a NaN or infinite loss or gradient norm and was stopped before the optimizer step."""

    def __init__(self, step: int, what: str, value: float, last_checkpoint: str | None) -> None:
        self.step, self.what, self.value, self.last_checkpoint = step, what, value, last_checkpoint
        kept = f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint was saved yet"
        super().__init__(
            f"training stopped at optimizer step {step}: the {what} is {value}. No update was applied and {kept}. "
            "Usual causes: fp16 compute on Gemma (use bf16 or fp32), a learning rate that is too high (lower it, "
            "or add warmup), or a batch with no trained tokens (check the data with `persian-qlora prepare`)"
        )
