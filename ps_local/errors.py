"""Errors a user can fix: the CLI prints their message as one line and exits non-zero."""


class UserError(Exception):
    """Bad input (a path, an option, a prompt); the message says what to change."""

    exit_code = 2
