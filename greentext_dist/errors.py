"""User-facing errors: one line that names the problem and the fix, never a traceback."""


class UserError(Exception):
    def __init__(self, problem: str, fix: str):
        super().__init__(f"{problem}. Fix: {fix}.")
        self.problem, self.fix = problem, fix
