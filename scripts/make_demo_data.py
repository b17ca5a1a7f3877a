"""Write the bundled demo corpora under data/demo/ (deterministic; rerun to regenerate).

- pretrain.jsonl: Python's own pydoc topics (the text of the Python reference manual that ships
  with CPython, PSF licence) plus generated plain-English sentences, to pretrain the demo model.
- ship_log.jsonl / ship_log_eval.jsonl: a generated domain, ship's log entries in a fixed format,
  that the demo model has never seen; state tuning on it visibly changes what the model writes.
Everything generated here is released under CC0.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "data" / "demo"

WINDS = ["north", "north-east", "east", "south-east", "south", "south-west", "west", "north-west"]
SEAS = ["calm", "slight", "moderate", "rough", "heavy swell"]
SKIES = ["clear", "overcast", "light rain", "fog", "squalls"]
TASKS = ["mended the foresail", "scrubbed the deck", "checked the rigging", "pumped the bilge",
         "tarred the ropes", "repaired the rudder chain", "stowed the cargo", "painted the railing"]
SIGHTS = ["two whales off the port bow", "a school of dolphins", "a merchant ship to the east",
          "land on the horizon", "a lighthouse at dusk", "seabirds following the wake", "nothing but open water"]
NAMES = ["Anna", "Tomas", "Ines", "Oskar", "Mara", "Pieter", "Lena", "Jonas"]
NOUNS = ["sailor", "captain", "cook", "harbour", "ship", "wind", "sea", "island", "map", "lamp", "storm", "sail",
         "river", "garden", "teacher", "book", "house", "road", "village", "market", "friend", "letter"]
VERBS = ["saw", "found", "lost", "remembered", "carried", "painted", "followed", "visited", "opened", "watched"]
ADJS = ["old", "quiet", "bright", "small", "strong", "cold", "green", "distant", "busy", "gentle"]


def ship_log(rng: random.Random) -> str:
    wind = f"Wind: {rng.choice(WINDS)}, {rng.randint(2, 35)} knots."
    sea = f"Sea: {rng.choice(SEAS)}. Sky: {rng.choice(SKIES)}."
    work = f"{rng.choice(NAMES)} and {rng.choice(NAMES)} {rng.choice(TASKS)}."
    seen = f"We sighted {rng.choice(SIGHTS)}."
    pos = f"Position: {rng.randint(10, 60)} N, {rng.randint(1, 40)} W."
    return f"Ship's log, day {rng.randint(1, 200)}. {wind} {sea} {work} {seen} {pos}"


def english(rng: random.Random) -> str:
    def np_() -> str:
        return f"the {rng.choice(ADJS)} {rng.choice(NOUNS)}" if rng.random() < 0.6 else f"the {rng.choice(NOUNS)}"

    forms = [
        # the domain's vocabulary in free prose, never in the log format itself
        lambda: f"The wind blew from the {rng.choice(WINDS)} at {rng.randint(2, 35)} knots and the sea was "
        f"{rng.choice(SEAS)}.",
        lambda: f"On that voyage {rng.choice(NAMES)} {rng.choice(TASKS)}, and later they sighted {rng.choice(SIGHTS)}.",
        lambda: f"The sky was {rng.choice(SKIES)} when the ship reached {rng.randint(10, 60)} degrees north.",
        lambda: f"{np_().capitalize()} {rng.choice(VERBS)} {np_()}.",
        lambda: f"{rng.choice(NAMES)} {rng.choice(VERBS)} {np_()} near {np_()}.",
        lambda: f"In the morning {np_()} was {rng.choice(ADJS)}, and {np_()} {rng.choice(VERBS)} {np_()}.",
        lambda: f"{rng.choice(NAMES)} said that {np_()} {rng.choice(VERBS)} {np_()} on day {rng.randint(1, 30)}.",
    ]
    return " ".join(rng.choice(forms)() for _ in range(rng.randint(3, 7)))


def write_jsonl(path: Path, texts: list[str]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    tmp.replace(path)


def main() -> None:
    import pydoc_data.topics

    OUT.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    docs = [t.strip() for t in pydoc_data.topics.topics.values() if t.strip()]
    docs += [english(rng) for _ in range(4000)]
    rng.shuffle(docs)
    write_jsonl(OUT / "pretrain.jsonl", docs)
    write_jsonl(OUT / "ship_log.jsonl", [ship_log(rng) for _ in range(2000)])
    write_jsonl(OUT / "ship_log_eval.jsonl", [ship_log(rng) for _ in range(64)])
    for name in ("pretrain.jsonl", "ship_log.jsonl", "ship_log_eval.jsonl"):
        print(f"{OUT / name}: {(OUT / name).stat().st_size / 1e3:.0f} kB")


if __name__ == "__main__":
    main()
