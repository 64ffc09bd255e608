"""Errors a user can act on. The CLI prints them without a traceback."""

from __future__ import annotations


class AngiotuneError(Exception):
    """Base class: a problem with the user's input or environment, not a bug."""


class DataError(AngiotuneError):
    """Bad input data, located by file, row and field where they are known."""

    def __init__(self, message: str, *, file: str | None = None, row: int | None = None,
                 field: str | None = None) -> None:
        self.message = message
        self.file = file
        self.row = row
        self.field = field
        super().__init__(str(self))

    def __str__(self) -> str:
        parts = (("file", self.file), ("row", self.row), ("field", self.field))
        where = [f"{label} {value}" for label, value in parts if value is not None]
        return f"{', '.join(where)}: {self.message}" if where else self.message

    def __reduce__(self):  # keep file/row/field when crossing Ray process boundaries
        return _rebuild_data_error, (self.message, self.file, self.row, self.field)


def _rebuild_data_error(message, file, row, field) -> DataError:
    return DataError(message, file=file, row=row, field=field)


class ConfigError(AngiotuneError, ValueError):
    """Settings that do not validate (a search space, a taxonomy, a settings object made in
    code); names the key. A ValueError too, as a bad argument value is one."""
