"""One exception type for problems the *user* can fix (bad file, stale index, ...).

The CLI turns it into one readable line and exit code 2; anything else is a bug and
keeps its traceback.
"""


class UserError(Exception):
    """Bad input: the message is shown to the user as is, without a traceback."""
