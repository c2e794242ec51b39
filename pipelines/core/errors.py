"""Errors that mean "the input is wrong", shown to the user as one line (exit status 1)."""


class SarError(RuntimeError):
    """A stage cannot go on; the message names the file, field or value at fault."""


class DatasetMismatch(SarError):
    """A dataset's manifest does not match the model or run that wants to use it."""
