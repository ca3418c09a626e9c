"""The one base class of errors that a user caused and can fix; the CLI prints them plainly."""


class ScreenerError(Exception):
    """A problem with the user's files or options; its message names the file and what is wrong."""
