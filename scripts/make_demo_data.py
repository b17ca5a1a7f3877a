"""Write the bundled demo corpora under data/demo/ (deterministic; rerun to regenerate).

- pretrain.jsonl: Python's own pydoc topics (the text of the Python reference manual that ships
  with CPython, PSF licence) plus generated plain-English sentences, to pretrain the demo model.
- ship_log.jsonl / ship_log_eval.jsonl: a generated domain, ship's log entries in a fixed format,
  that the demo model has never seen; state tuning on it visibly changes what the model writes.
- ship_log_prefs.jsonl / ship_log_prefs_eval.jsonl: preference pairs {prompt, chosen, rejected} for
  the demo's preference recipes (DPO, ORPO): asked for the day's log, the chosen answer is a log entry
  in the fixed format; the rejected one is the same facts in free prose (off-format), a terse
  lower-case note (off-format) or unrelated English (wrong domain), a third each.
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
LAND = ["garden", "teacher", "book", "house", "road", "village", "market", "friend", "letter", "lamp", "river"]
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


PROMPTS = ["Write the ship's log for day {d}.", "Log today's watch, day {d}.", "Day {d} at sea: write the log entry.",
           "What goes in the ship's log for day {d}?", "Keep the log: it is day {d} of the voyage."]


def log_facts(rng: random.Random) -> dict:
    return {"day": rng.randint(1, 200), "wind": rng.choice(WINDS), "knots": rng.randint(2, 35), "sea": rng.choice(SEAS),
            "sky": rng.choice(SKIES), "crew": tuple(rng.sample(NAMES, 2)), "task": rng.choice(TASKS),
            "sight": rng.choice(SIGHTS), "lat": rng.randint(10, 60), "lon": rng.randint(1, 40)}


def log_entry(f: dict) -> str:
    """The preferred answer: the ship's log format of ship_log.jsonl."""
    return (f"Ship's log, day {f['day']}. Wind: {f['wind']}, {f['knots']} knots. Sea: {f['sea']}. Sky: {f['sky']}. "
            f"{f['crew'][0]} and {f['crew'][1]} {f['task']}. We sighted {f['sight']}. "
            f"Position: {f['lat']} N, {f['lon']} W.")


def rejected_answer(f: dict, rng: random.Random, form: int) -> str:
    """A dispreferred answer: 0 the same facts in prose, 1 a terse lower-case note, 2 unrelated English."""
    if form == 0:
        return (f"The wind blew from the {f['wind']} at {f['knots']} knots and the sea was {f['sea']}. "
                f"On that voyage {f['crew'][0]} {f['task']}, and later they sighted {f['sight']}.")
    if form == 1:
        return (f"day {f['day']} - {f['wind']} wind {f['knots']} kn, {f['sea']}, {f['sky']} - "
                f"{f['crew'][0].lower()} {f['task']}")
    return unrelated(rng)


def unrelated(rng: random.Random) -> str:
    """Two or three plain English sentences with nothing of the sea in them (the wrong domain)."""
    def np_() -> str:
        return f"the {rng.choice(ADJS)} {rng.choice(LAND)}" if rng.random() < 0.6 else f"the {rng.choice(LAND)}"

    forms = [
        lambda: f"{np_().capitalize()} {rng.choice(VERBS)} {np_()}.",
        lambda: f"{rng.choice(NAMES)} {rng.choice(VERBS)} {np_()} near {np_()}.",
        lambda: f"In the morning {np_()} was {rng.choice(ADJS)}, and {np_()} {rng.choice(VERBS)} {np_()}.",
    ]
    return " ".join(rng.choice(forms)() for _ in range(rng.randint(2, 3)))


def preference_pairs(rng: random.Random, n: int) -> list[dict]:
    pairs = []
    for i in range(n):
        f = log_facts(rng)
        prompt = rng.choice(PROMPTS).format(d=f["day"])
        pairs.append({"prompt": prompt, "chosen": log_entry(f), "rejected": rejected_answer(f, rng, i % 3)})
    return pairs


def write_records(path: Path, records: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    tmp.replace(path)


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
    prefs = random.Random(1)  # a stream of its own: the files above stay as they were
    write_records(OUT / "ship_log_prefs.jsonl", preference_pairs(prefs, 600))
    write_records(OUT / "ship_log_prefs_eval.jsonl", preference_pairs(prefs, 60))
    for name in ("pretrain.jsonl", "ship_log.jsonl", "ship_log_eval.jsonl", "ship_log_prefs.jsonl",
                 "ship_log_prefs_eval.jsonl"):
        print(f"{OUT / name}: {(OUT / name).stat().st_size / 1e3:.0f} kB")


if __name__ == "__main__":
    main()
