"""Rewrite README.md's "Recipe reference" table from the config models (run after changing a recipe key).

    python scripts/update_recipe_reference.py [README.md]
"""

from __future__ import annotations

import sys
from pathlib import Path

from peft_rwkv7.train.recipe import recipe_reference
from peft_rwkv7.train.schema import with_reference


def main() -> None:
    path = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parents[1] / "README.md")
    old = path.read_text(encoding="utf-8")
    new = with_reference(old, recipe_reference(markdown=True))
    path.write_text(new, encoding="utf-8")
    print(f"{path}: {'updated' if new != old else 'already up to date'}")


if __name__ == "__main__":
    main()
