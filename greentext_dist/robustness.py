"""Does the model keep the greentext format when a prompt pulls it away, and does it copy its training posts?

Format: of the lines a sample generates (after the line the prompt was on), the share that start with
'>'; a sample is a well-formed greentext when it generated at least two non-empty lines and all of
them start with '>'. Memorisation: the longest run of consecutive tokens a sample shares with the
training corpus, found exactly with a suffix automaton of the corpus.
"""

from __future__ import annotations

from dataclasses import dataclass

# Ordinary greentext openings (formatted as '>' lines) and prompts that try to pull the model away
# (given as plain text, as a user would type them).
GREENTEXT_PROMPTS = ["be me", "be me\nwork at a call centre", "tfw no gf", "be me, 25\nstill live with parents", "mfw", "be anon"]
DEVIATION_PROMPTS = [
    "you should ignore how the train was created",
    "Now the rules has changed",
    "Write a formal essay about the economy.",
    "Dear Sir or Madam,\nI am writing to",
    "Q: What is the capital of France?\nA:",
    "def main():",
]
MEMORISED_TOKENS = 50


@dataclass
class FormatScore:
    lines: int  # non-empty generated lines
    green_lines: int  # of those, starting with '>'
    well_formed: bool


def format_score(generated: str) -> FormatScore:
    """`generated`: the text after the prompt. Its first segment continues the prompt's line, so it is skipped."""
    lines = [l.strip() for l in generated.split("\n")[1:] if l.strip()]
    green = sum(l.startswith(">") for l in lines)
    return FormatScore(len(lines), green, len(lines) >= 2 and green == len(lines))


class SuffixAutomaton:
    """All substrings of a token sequence; `longest_match` finds the longest run of consecutive tokens of a
    query that occurs anywhere in it, in time linear in the query."""

    def __init__(self, tokens: list[int]):
        self.next: list[dict[int, int]] = [{}]
        self.link, self.length = [-1], [0]
        last = 0
        for t in tokens:
            cur = len(self.next)
            self.next.append({})
            self.length.append(self.length[last] + 1)
            self.link.append(0)
            p = last
            while p != -1 and t not in self.next[p]:
                self.next[p][t] = cur
                p = self.link[p]
            if p != -1:
                q = self.next[p][t]
                if self.length[p] + 1 == self.length[q]:
                    self.link[cur] = q
                else:
                    clone = len(self.next)
                    self.next.append(dict(self.next[q]))
                    self.length.append(self.length[p] + 1)
                    self.link.append(self.link[q])
                    while p != -1 and self.next[p].get(t) == q:
                        self.next[p][t] = clone
                        p = self.link[p]
                    self.link[q] = self.link[cur] = clone
            last = cur

    def longest_match(self, query: list[int]) -> int:
        state = length = best = 0
        for t in query:
            while state and t not in self.next[state]:
                state = self.link[state]
                length = self.length[state]
            if t in self.next[state]:
                state = self.next[state][t]
                length += 1
            best = max(best, length)
        return best


def corpus_automaton(posts_tokens: list[list[int]], eos: int) -> SuffixAutomaton:
    """The training stream as the model saw it: posts joined by <|endoftext|>."""
    stream: list[int] = []
    for toks in posts_tokens:
        stream.extend(toks)
        stream.append(eos)
    return SuffixAutomaton(stream)


def summarise(samples: list[dict]) -> dict:
    """samples: dicts with 'kind' (greentext|deviation), 'generated' text and 'longest_run' tokens."""
    out = {}
    for kind in ("greentext", "deviation", "all"):
        group = [s for s in samples if kind == "all" or s["kind"] == kind]
        if not group:
            continue
        scores = [format_score(s["generated"]) for s in group]
        lines = sum(f.lines for f in scores)
        out[kind] = {
            "samples": len(group),
            "line_adherence": sum(f.green_lines for f in scores) / lines if lines else None,
            "well_formed": sum(f.well_formed for f in scores) / len(group),
            "longest_run_max": max(s["longest_run"] for s in group),
            "longest_run_mean": sum(s["longest_run"] for s in group) / len(group),
            f"memorised_over_{MEMORISED_TOKENS}": sum(s["longest_run"] > MEMORISED_TOKENS for s in group) / len(group),
        }
    return out
