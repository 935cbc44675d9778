"""Regenerate the rules table of docs/rules.md from advisor.plan.rules.RULES (the text above it stays).

    python scripts/build_rules_doc.py
"""

from pathlib import Path

from advisor.plan.rules import RULES

PAGE = Path(__file__).resolve().parent.parent / "docs" / "rules.md"
HEADER = "| rule | kind | what it does and why | source |"


def main() -> None:
    text = PAGE.read_text()
    before, _, rest = text.partition(HEADER)
    after = rest.split("\n\n", 1)[1] if "\n\n" in rest else ""
    rows = [HEADER, "|---|---|---|---|"] + [f"| `{r.name}` | {r.kind} | {r.reason} | [link]({r.source}) |" for r in RULES]
    PAGE.write_text(before + "\n".join(rows) + "\n\n" + after)
    print(f"wrote {len(RULES)} rules to {PAGE}")


if __name__ == "__main__":
    main()
