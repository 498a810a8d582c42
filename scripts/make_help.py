"""Print the Makefile's targets with their `## help text` (what `make help` shows)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

TARGET = re.compile(r"^([A-Za-z0-9_.-]+):[^#=]*##\s*(.+)$")


def targets(makefile: Path) -> list[tuple[str, str]]:
    found = []
    for line in makefile.read_text().splitlines():
        match = TARGET.match(line)
        if match:
            found.append((match.group(1), match.group(2).strip()))
    return found


def main(argv: list[str]) -> int:
    rows = targets(Path(argv[0] if argv else "Makefile"))
    width = max(len(name) for name, _ in rows)
    print("mmekit — make <target>\n")
    for name, text in rows:
        print(f"  {name.ljust(width)}  {text}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
