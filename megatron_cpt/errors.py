"""User-facing errors: one line saying what is wrong and what to change; exit code 2."""


class UsageError(Exception):
    """Bad input detected before any work starts. The CLI prints it and exits 2."""

    exit_code = 2


class Interrupted(Exception):
    """A stage stopped by Ctrl-C (SIGINT) after cleaning up its partial outputs; the message
    says what was removed and what was left as it was. The CLI prints it and exits 130
    (128 + SIGINT, the shell's convention for a command ended by Ctrl-C)."""

    exit_code = 130
