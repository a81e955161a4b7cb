"""The one exception type a student is meant to read.

Anything a student can cause (a missing folder, a bad constant, no network) is raised as
:class:`LessonError` with a message that says what is wrong and what to do. ``lesson.run`` prints
that message as one line and exits; ``--debug`` shows the traceback as well.
"""


class LessonError(Exception):
    """A failure the student can fix. The message says what is wrong and what to do."""


def warn(message: str) -> None:
    """Something the student should know, that does not stop the run."""
    print(f"  Warning: {message}", flush=True)


def brief(exc: BaseException, limit: int = 120) -> str:
    """"TypeName: the first line of its message", cut at a word near ``limit``: a library's failure,
    quoted inside one of our messages."""
    text = (str(exc).strip().splitlines() or [""])[0].strip()
    if len(text) > limit:
        text = text[:limit].rsplit(" ", 1)[0] + " ..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
