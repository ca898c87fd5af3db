"""Errors the CLI reports as one line (``ps-local: error: ...``) and a non-zero exit status."""


class PsLocalError(Exception):
    """A failure ps-local can explain in one line; the message says what happened."""

    exit_code = 1


class UserError(PsLocalError):
    """Bad input (a path, an option, a prompt); the message says what to change."""

    exit_code = 2


class ModelError(PsLocalError):
    """The model or llama.cpp failed while sampling (a full cache, non-finite logits, ...)."""
