"""User-facing errors: one line saying what is wrong and what to change; exit code 2."""


class UsageError(Exception):
    """Bad input detected before any work starts. The CLI prints it and exits 2."""

    exit_code = 2
