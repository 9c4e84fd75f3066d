"""The configuration table of the README, generated from `service.settings.Settings` (one source of truth).

    python scripts/settings_table.py            # print the table
    python scripts/settings_table.py --write    # replace it in README.md between its markers

`tests/unit/test_readme.py` fails when the README's table differs from this output.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from service.settings import Settings

START, END = "<!-- settings:start -->", "<!-- settings:end -->"
README = Path(__file__).resolve().parents[1] / "README.md"


SIZES = {"calibration_shape", "resize_scale"}  # (H, W) pairs, written HxW as the environment takes them


def _default(name: str, value: object) -> str:
    if value is None or value == ():
        return "unset"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        separator = "x" if name in SIZES else ","
        return separator.join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
    return str(value)


def table() -> str:
    lines = ["| variable | default | meaning |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        description = (field.description or "").replace("|", "\\|").replace("\n", " ")
        lines.append(f"| `SEGSERVE_{name.upper()}` | `{_default(name, field.default)}` | {description} |")
    return "\n".join(lines)


def replaced(text: str) -> str:
    head, _, rest = text.partition(START)
    _, _, tail = rest.partition(END)
    if not rest:
        raise SystemExit(f"README.md has no {START} marker")
    return f"{head}{START}\n{table()}\n{END}{tail}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    if args.write:
        README.write_text(replaced(README.read_text()))
    else:
        print(table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
