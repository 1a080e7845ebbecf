"""User-facing errors: one line that names the problem and the fix, never a traceback."""


class UserError(Exception):
    def __init__(self, problem: str, fix: str):
        super().__init__(f"{problem}. Fix: {fix}.")
        self.problem, self.fix = problem, fix


def first_line(e: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (its type name if empty), for a one-line UserError."""
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:limit]
