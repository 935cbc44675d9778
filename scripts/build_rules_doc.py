"""Regenerate the table of docs/rules.md from advisor.constraints and advisor.plan.rules (the text around it stays).

python scripts/build_rules_doc.py
"""

from pathlib import Path

from advisor.constraints import every_constraint
from advisor.plan.rules import every_rule


PAGE = Path(__file__).resolve().parent.parent / "docs" / "rules.md"
HEADER = "| rule | kind | what it does and why | source |"


def main() -> None:
    text = PAGE.read_text()
    before, _, rest = text.partition(HEADER)
    after = rest.split("\n\n", 1)[1] if "\n\n" in rest else ""
    constraints, rules = every_constraint(), every_rule()
    rows = [HEADER, "|---|---|---|---|"]
    rows += [f"| `{c.name}` | constraint on `{c.key}` | {c.reason} | [link]({c.source}) |" for c in constraints]
    rows += [f"| `{r.name}` | {r.kind} | {r.reason} | [link]({r.source}) |" for r in rules]
    PAGE.write_text(before + "\n".join(rows) + "\n\n" + after)
    print(f"wrote {len(constraints)} constraints and {len(rules)} rules to {PAGE}")


if __name__ == "__main__":
    main()
