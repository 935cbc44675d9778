"""Regenerate the table of docs/rules.md from advisor.constraints and advisor.plan.rules (the text around it stays).

    python scripts/build_rules_doc.py
"""

from pathlib import Path

from advisor.constraints import CONSTRAINTS
from advisor.plan.rules import RULES

PAGE = Path(__file__).resolve().parent.parent / "docs" / "rules.md"
HEADER = "| rule | kind | what it does and why | source |"


def main() -> None:
    text = PAGE.read_text()
    before, _, rest = text.partition(HEADER)
    after = rest.split("\n\n", 1)[1] if "\n\n" in rest else ""
    rows = [HEADER, "|---|---|---|---|"]
    rows += [f"| `{c.name}` | constraint on `{c.key}` | {c.reason} | [link]({c.source}) |" for c in CONSTRAINTS]
    rows += [f"| `{r.name}` | {r.kind} | {r.reason} | [link]({r.source}) |" for r in RULES]
    PAGE.write_text(before + "\n".join(rows) + "\n\n" + after)
    print(f"wrote {len(CONSTRAINTS)} constraints and {len(RULES)} rules to {PAGE}")


if __name__ == "__main__":
    main()
