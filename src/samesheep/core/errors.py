"""The one exception type that means "the user's input is wrong"."""


class SamesheepError(Exception):
    """Bad input or state the user can fix; the CLI prints it as one line and exits 2."""
