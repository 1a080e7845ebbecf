"""User-facing errors: one line that names the problem and the fix, never a traceback."""

import argparse


class UserError(Exception):
    def __init__(self, problem: str, fix: str):
        super().__init__(f"{problem}. Fix: {fix}" + ("" if fix.endswith(("?", ".", "!")) else "."))
        self.problem, self.fix = problem, fix


def first_line(e: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (its type name if empty), for a one-line UserError."""
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:limit]


class OneLineParser(argparse.ArgumentParser):
    """argparse for our commands: a bad command line is one UserError line (not a usage dump), a mistyped flag gets
    the closest real one, and no flag is taken by a prefix of its name (--max-step is not --max-steps)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def error(self, message: str):
        import difflib
        import re

        if (m := re.match(r"unrecognized arguments: (-\S+)", message)) and (close := difflib.get_close_matches(
                m.group(1).split("=")[0], [o for a in self._actions for o in a.option_strings if o.startswith("--")], n=1)):
            raise UserError(f"unknown flag {m.group(1)}", f"did you mean {close[0]}? (see `{self.prog} --help`)")
        if (m := re.match(r"argument (\S+): invalid choice: '(.*)' \(choose from (.*)\)$", message)) and (close := difflib.get_close_matches(
                m.group(2), re.findall(r"'([^']*)'", m.group(3)), n=1)):
            raise UserError(f"{m.group(1).split('/')[0]} {m.group(2)} is not one of {m.group(3)}", f"did you mean {close[0]}?")
        raise UserError(f"bad command line: {message}", f"see `{self.prog} --help`")

    def parse_or_exit(self, argv: list[str] | None = None) -> argparse.Namespace:
        """parse_args, with a bad command line printed as its one line and exit code 2."""
        try:
            return self.parse_args(argv)
        except UserError as e:
            from greentext_dist.ui import fail

            fail(str(e))
            raise SystemExit(2) from None
