"""Write the GRPO demo's prompts under data/demo/ (deterministic; rerun to regenerate).

- grpo_prompts.jsonl / grpo_prompts_eval.jsonl: the opening of a ship's-log entry in the format of
  ship_log.jsonl (scripts/make_demo_data.py) with the day's weather named, "Ship's log, day N, a calm day.
  Wind:" and "Ship's log, day N, a stormy day. Wind:", for each day of a 200-day voyage; 32 days (64
  prompts) are held out for evaluation, the other 168 (336 prompts) are the training prompts. The model
  completes the wind (" north-east, 21 knots."); the demo recipes (recipes/grpo_*.yaml) reward the log's
  format and a speed that fits the weather (the `knots` column within 6: calm 11 knots or less, stormy 22
  to 34), which the state-tuned demo model writes only now and then, whatever the weather.
Everything generated here is released under CC0.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "data" / "demo"
DAYS = range(1, 201)  # ship_log.jsonl's days
HELD_OUT = 32


# the weather the prompt names -> the `knots` column: the middle of the speeds that fit it (the recipes' numeric
# reward accepts it within 6 knots)
WEATHER = {"a calm day": 5, "a stormy day": 28}


def prompts(day: int) -> list[dict]:
    return [{"prompt": f"Ship's log, day {day}, {w}. Wind:", "knots": k} for w, k in WEATHER.items()]


def write_records(path: Path, records: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    tmp.replace(path)


def main() -> None:
    held = set(random.Random(2).sample(list(DAYS), HELD_OUT))
    write_records(OUT / "grpo_prompts.jsonl", [p for d in DAYS if d not in held for p in prompts(d)])
    write_records(OUT / "grpo_prompts_eval.jsonl", [p for d in sorted(held) for p in prompts(d)])
    for name in ("grpo_prompts.jsonl", "grpo_prompts_eval.jsonl"):
        print(f"{OUT / name}: {sum(1 for _ in open(OUT / name))} prompts")


if __name__ == "__main__":
    main()
