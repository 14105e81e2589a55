"""The demo corpus: a dozen short notes about an invented archipelago.

The facts are made up on purpose, so a correct answer can only come from the retrieved passages,
never from what the generator memorised.
"""
from __future__ import annotations

from pathlib import Path

NOTES = {
    "islands.md": "# The Veloria Archipelago\nThe Veloria Archipelago has five inhabited islands. The largest is "
                  "Corvane, home to the capital city of Merrowgate. The smallest inhabited island, Lisk, has a "
                  "population of about four hundred people who mostly farm kelp.",
    "merrowgate.md": "# Merrowgate\nMerrowgate, the capital of Veloria, was founded in 1612 by the cartographer "
                     "Odile Marchetti. The city is known for its copper-roofed lighthouse, which was rebuilt in 1890 "
                     "after a storm destroyed the original wooden tower.",
    "bank.md": "# Veloria Savings Bank\nThe Veloria Savings Bank was founded by the merchant Tobias Renn in 1784. "
               "Its headquarters stand on Harbour Street in Merrowgate. The bank issues the archipelago's currency, "
               "the velor, which is divided into one hundred grains.",
    "festival.md": "# The Lantern Tide Festival\nEvery year on the first full moon of October, islanders float "
                   "paper lanterns from the beaches of Corvane. The festival honours the sailors lost in the storm of "
                   "1889. The largest lantern, called the Mother Light, is carried by the youngest fisher of Lisk.",
    "railway.md": "# The Corvane Railway\nA narrow-gauge railway connects Merrowgate to the mining town of Ashby on "
                  "the north coast of Corvane. It opened in 1902 and its steam engine, the Grey Heron, still runs "
                  "on Sundays. The journey takes ninety minutes.",
    "mining.md": "# Copper in Ashby\nAshby grew around a copper mine opened in 1871 by the Halloran family. The "
                 "copper from Ashby roofed the Merrowgate lighthouse. The mine closed in 1958 and is now a museum.",
    "language.md": "# The Velorian language\nMost islanders speak Velorian, a language related to old coastal "
                   "dialects. The word 'sennet' means harbour, and 'orlo' means lantern. Velorian is taught in all "
                   "island schools alongside English.",
    "wildlife.md": "# Wildlife\nThe Veloria puffin nests only on the cliffs of Lisk. Grey seals gather on the "
                   "sandbanks between Corvane and the island of Tessel every spring. Tessel is also home to a colony "
                   "of rare blue-footed gulls.",
    "university.md": "# The University of Merrowgate\nThe University of Merrowgate was established in 1921. Its "
                     "most famous department studies tidal energy, led by Professor Amara Quint, who designed the "
                     "tidal turbines that power Tessel.",
    "food.md": "# Cuisine\nThe national dish of Veloria is kelp bread served with smoked mackerel. Lisk exports "
               "dried kelp to the other islands, and Tessel is known for its salted plum jam.",
    "government.md": "# Government\nVeloria is governed by the Tide Council, a body of fifteen elected members "
                     "that meets in the old customs house of Merrowgate. The council's current speaker is Helena "
                     "Brask, elected in 2021.",
    "ferry.md": "# Ferries\nFerries run between all five inhabited islands. The longest crossing, from Merrowgate to "
                "the outer island of Pell, takes four hours. Pell is known for its basalt sea stacks.",
}

QUESTIONS = [
    "Who founded the Veloria Savings Bank?",
    "Where did the copper for the Merrowgate lighthouse come from?",
    "Which island is the only nesting place of the Veloria puffin?",
    "Who designed the tidal turbines that power Tessel?",
]


def write_demo_corpus(folder: str | Path) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in NOTES.items():
        (folder / name).write_text(text + "\n", encoding="utf-8")
    return folder
