"""The one exception type of moecompress: its message says what was wrong and what is allowed."""


class MoecompressError(Exception):
    """A user-facing error. The CLI prints `error: <message>` on one line and exits with status 2."""
