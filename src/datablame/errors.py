"""One exception type for problems the *user* can fix (bad file, stale index, ...).

The CLI turns it into one readable line and exit code 2; anything else is a bug and
keeps its traceback.
"""


class UserError(Exception):
    """Bad input: the message is shown to the user as is, without a traceback."""


def check_at_least(option: str, value: int, least: int) -> None:
    """The one wording for a numeric option out of range, in every command."""
    if value < least:
        raise UserError(f"{option} must be at least {least} (got {value})")
