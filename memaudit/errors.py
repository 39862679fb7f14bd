"""The one exception type a user can cause; the CLI turns it into a single error line."""


class MemauditError(Exception):
    """Bad input or an unusable model/data file. The message is shown to the user as is."""
