"""Small deterministic MIND-format dataset with a planted topic structure, for tests and demos.

Structure a model should recover:
  * each topic has its own category, 3 subcategories and vocabulary; titles and abstracts are
    mostly that vocabulary (plus a few words shared by all topics, so text is not trivially clean);
  * user u prefers topic u % n_topics; about 85% of a history is that topic;
  * each impression shows IMPRESSION_SIZE unseen items, a third from the preferred topic; preferred
    items are clicked with probability 0.5, others 0.05, and every impression has at least one click.
Item i belongs to topic i % n_topics. Every 20th item has no abstract (as ~5% of real MIND news).
Impressions go round-robin over users with strictly increasing times (about 5 minutes apart from
11/9/2019 0:00 UTC), so every user has impressions early and late and a time split works.
With dev_rounds > 0 the last rounds go to a dev folder, as MIND ships train and dev (its own split).
Same arguments -> same bytes (stdlib random.Random, whose stream Python keeps stable).
"""
from __future__ import annotations

import os
import random
from pathlib import Path

from offline.datasets.base import Dataset
from offline.datasets.mind import format_mind_time, load_mind

TOPICS: dict[str, tuple[str, ...]] = {
    "sports": ("match", "goal", "coach", "league", "season", "striker", "playoff", "stadium",
               "tournament", "referee", "championship", "quarterback", "injury", "transfer", "score"),
    "finance": ("stocks", "market", "investors", "earnings", "inflation", "bank", "bonds", "rates",
                "dividend", "shares", "economy", "profit", "trading", "revenue", "fund"),
    "health": ("doctors", "vaccine", "hospital", "diet", "sleep", "patients", "virus", "therapy",
               "nutrition", "fitness", "symptoms", "clinic", "heart", "study", "medicine"),
    "travel": ("flights", "hotel", "beach", "passport", "island", "cruise", "airport", "resort",
               "tourists", "itinerary", "luggage", "destination", "museum", "road", "trip"),
    "tech": ("smartphone", "software", "chip", "startup", "robot", "cloud", "battery", "app",
             "laptop", "algorithm", "privacy", "network", "gadget", "update", "code"),
    "food": ("recipe", "chef", "kitchen", "pasta", "dessert", "restaurant", "flavor", "bakery",
             "grill", "spices", "breakfast", "vegan", "cheese", "soup", "menu"),
    "music": ("album", "concert", "guitar", "singer", "band", "tour", "lyrics", "festival",
              "chart", "drummer", "melody", "studio", "vinyl", "rapper", "orchestra"),
    "weather": ("storm", "forecast", "snow", "hurricane", "rain", "temperatures", "flood",
                "wind", "heatwave", "drought", "frost", "tornado", "clouds", "humidity", "thunder"),
}
SHARED_WORDS = ("new", "report", "today", "week", "update", "people", "big", "says", "year", "first")
IMPRESSION_SIZE = 12
HISTORY_LEN = (5, 15)
HISTORY_ON_TOPIC = 0.85
CLICK_ON_TOPIC, CLICK_OFF_TOPIC = 0.5, 0.05
START_TS = 1573257600          # 11/9/2019 0:00:00 UTC
IMPRESSION_GAP_S = 300


def topic_names(n_topics: int) -> list[str]:
    """The first n_topics names of TOPICS, then topic8, topic9, ... (with made-up vocabularies)."""
    names = list(TOPICS)[:n_topics]
    return names + [f"topic{t}" for t in range(len(names), n_topics)]


def _vocabulary(topic: str) -> tuple[str, ...]:
    return TOPICS.get(topic) or tuple(f"{topic}word{j}" for j in range(15))


def _sentence(rng: random.Random, vocab: tuple[str, ...], n_words: int, shared_frac: float) -> str:
    words = [rng.choice(SHARED_WORDS) if rng.random() < shared_frac else rng.choice(vocab)
             for _ in range(n_words)]
    return " ".join(words).capitalize()


def generate_mind(out_dir: Path, n_topics: int = 4, items_per_topic: int = 50, n_users: int = 200,
                  impressions_per_user: int = 5, seed: int = 0, dev_rounds: int = 0) -> Path:
    """Write out_dir/news.tsv and out_dir/behaviors.tsv (MIND format); returns out_dir.

    With dev_rounds > 0, write MIND's two-split layout instead: out_dir/train/ and out_dir/dev/, each
    with news.tsv (all news, as MIND ships) and behaviors.tsv; dev holds the last dev_rounds rounds of
    impressions, train the rest. The rows are the same either way, only the impression ids restart
    at 1 in each behaviors.tsv (as in MIND)."""
    if n_topics < 2 or items_per_topic < IMPRESSION_SIZE or n_users < 1 or impressions_per_user < 1:
        raise ValueError("need n_topics >= 2, items_per_topic >= "
                         f"{IMPRESSION_SIZE}, n_users >= 1, impressions_per_user >= 1")
    if not 0 <= dev_rounds < impressions_per_user:
        raise ValueError("need 0 <= dev_rounds < impressions_per_user (train keeps at least one round)")
    rng = random.Random(seed)
    out_dir = Path(out_dir)
    topics = topic_names(n_topics)

    by_topic: list[list[str]] = [[] for _ in topics]
    news_lines: list[str] = []
    for i in range(n_topics * items_per_topic):
        t = i % n_topics
        news_id = f"N{i + 1}"
        by_topic[t].append(news_id)
        vocab = _vocabulary(topics[t])
        title = _sentence(rng, vocab, rng.randint(5, 9), 0.2)
        abstract = "" if i % 20 == 19 else _sentence(rng, vocab, rng.randint(12, 20), 0.25) + "."
        sub = f"{topics[t]}_{rng.randrange(3)}"
        news_lines.append("\t".join([news_id, topics[t], sub, title, abstract,
                                     f"https://example.com/news/{news_id}", "[]", "[]"]))

    others_of = [[n for t, ids in enumerate(by_topic) if t != pref for n in ids] for pref in range(n_topics)]
    histories: list[list[str]] = []
    for u in range(n_users):
        pref = u % n_topics
        others = others_of[pref]
        length = rng.randint(*HISTORY_LEN)
        n_on = sum(rng.random() < HISTORY_ON_TOPIC for _ in range(length))
        history = rng.sample(by_topic[pref], min(n_on, len(by_topic[pref]) - IMPRESSION_SIZE // 3))
        history += rng.sample(others, min(length - n_on, len(others) - (IMPRESSION_SIZE - IMPRESSION_SIZE // 3)))
        rng.shuffle(history)
        histories.append(history)

    behavior_rows: list[str] = []   # behaviors.tsv lines without their impression id
    ts = START_TS
    for _ in range(impressions_per_user):
        for u in range(n_users):
            pref = u % n_topics
            seen = set(histories[u])
            n_on = IMPRESSION_SIZE // 3
            on = _sample_unseen(rng, by_topic[pref], n_on, seen)
            shown = on + _sample_unseen(rng, others_of[pref], IMPRESSION_SIZE - n_on, seen)
            rng.shuffle(shown)
            clicked = [rng.random() < (CLICK_ON_TOPIC if n in on else CLICK_OFF_TOPIC) for n in shown]
            if not any(clicked):
                clicked[shown.index(on[0])] = True
            ts += IMPRESSION_GAP_S - 60 + rng.randrange(120)
            tokens = " ".join(f"{n}-{int(c)}" for n, c in zip(shown, clicked))
            behavior_rows.append("\t".join([f"U{u + 1}", format_mind_time(ts), " ".join(histories[u]), tokens]))

    if not dev_rounds:
        _write_split(out_dir, news_lines, behavior_rows)
        return out_dir
    cut = len(behavior_rows) - dev_rounds * n_users
    _write_split(out_dir / "train", news_lines, behavior_rows[:cut])
    _write_split(out_dir / "dev", news_lines, behavior_rows[cut:])
    return out_dir


def _sample_unseen(rng: random.Random, pool: list[str], k: int, seen: set[str]) -> list[str]:
    """k distinct ids of pool not in seen, without scanning the pool (the history caps in
    generate_mind leave at least k unseen in every pool)."""
    drawn = rng.sample(pool, min(len(pool), k + len(seen)))
    return [n for n in drawn if n not in seen][:k]


def _write_split(folder: Path, news_lines: list[str], behavior_rows: list[str]) -> None:
    """One MIND split folder; impression ids count from 1 in each."""
    folder.mkdir(parents=True, exist_ok=True)
    _write(folder / "news.tsv", news_lines)
    _write(folder / "behaviors.tsv", [f"{j}\t{row}" for j, row in enumerate(behavior_rows, start=1)])


def _write(file: Path, lines: list[str]) -> None:
    """Write via a temp file + rename so an interrupted run never leaves a half file behind."""
    tmp = file.with_suffix(file.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(tmp, file)


def load_synthetic(path: Path) -> Dataset:
    """Load `path` as MIND (one folder, or train/ + dev/ as generate_mind(dev_rounds=...) writes);
    when neither layout is complete there, generate the default single-folder dataset first."""
    path = Path(path)
    if not (_complete(path) or _complete(path / "train", path / "dev")):
        generate_mind(path)
    dataset = load_mind(path)
    dataset.name = "synthetic"
    return dataset


def _complete(*folders: Path) -> bool:
    return all((folder / name).exists() for folder in folders for name in ("news.tsv", "behaviors.tsv"))
