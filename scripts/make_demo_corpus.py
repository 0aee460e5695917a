#!/usr/bin/env python
"""Generate the `tiny` template's demo corpus (``llmforge/templates/tiny/corpus/``), deterministically.

The corpus is small (a few hundred KB on disk) but exercises every step of ``llmforge data process``:

* English prose from a seeded grammar over hand-written topic vocabularies (no copied text): articles in
  ``articles.jsonl.gz``, HTML pages with navigation/footer boilerplate in ``web/pages.warc.gz`` (warcio),
  notes as ``notes/*.md`` / ``notes/*.txt`` and a small ``forum.jsonl``;
* planted exact duplicates (the same text in two files, the same page under two URLs) and near duplicates
  (syndicated copies with a few words changed);
* PII in otherwise clean documents (e-mails, phone numbers, a public IP, a Luhn-valid card number, an IBAN, an
  SSN) and one leaked AWS key (its document is dropped);
* short French, German and Spanish documents (written for this corpus) that the language filter drops;
* junk the quality filters drop: boilerplate-only pages, keyword spam, repeated lines, lorem ipsum, code, tables;
* bad input the reader must survive: a truncated ``broken/truncated.jsonl.gz``, a line of invalid UTF-8, a
  binary text field, a non-string text field and an empty ``notes/empty.txt``.

Run from the repository root: ``python scripts/make_demo_corpus.py [--out DIR] [--seed N]``.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import random
import shutil
from pathlib import Path

SEED = 20240611
OUT = Path(__file__).resolve().parent.parent / "llmforge" / "templates" / "tiny" / "corpus"

# ---------------------------------------------------------------------------------------------------------
# vocabulary: topic frames written for this corpus

TOPICS: dict[str, dict[str, list[str]]] = {
    "garden": {
        "nouns": [
            "garden",
            "seedling",
            "tomato",
            "bean",
            "shovel",
            "compost heap",
            "greenhouse",
            "hedge",
            "rose",
            "watering can",
            "soil",
            "root",
            "leaf",
            "potato",
            "onion",
        ],
        "people": ["gardeners", "neighbours", "volunteers"],
        "verbs": [
            ("plant", "planted"),
            ("water", "watered"),
            ("prune", "pruned"),
            ("dig", "dug"),
            ("harvest", "harvested"),
            ("weed", "weeded"),
        ],
        "adjs": ["green", "damp", "sunny", "tangled", "fertile", "sheltered", "young", "ripe"],
        "places": ["the vegetable beds", "the back fence", "the allotment", "the potting shed"],
        "facts": [
            "Beans grow faster when the soil has been warmed by a week of sunshine.",
            "A compost heap needs air as much as it needs kitchen scraps and dry leaves.",
            "Tomatoes planted too early often sulk until the nights become warmer.",
            "Most gardeners learn more from one failed season than from three good ones.",
        ],
    },
    "river": {
        "nouns": [
            "river",
            "bank",
            "ferry",
            "current",
            "willow",
            "heron",
            "bridge",
            "boat",
            "stone",
            "mill",
            "reed",
            "otter",
            "weir",
            "meadow",
            "flood",
        ],
        "people": ["boatmen", "anglers", "walkers"],
        "verbs": [
            ("cross", "crossed"),
            ("follow", "followed"),
            ("row", "rowed"),
            ("wade", "waded"),
            ("dredge", "dredged"),
            ("map", "mapped"),
        ],
        "adjs": ["shallow", "muddy", "swift", "quiet", "broad", "winding", "cold", "clear"],
        "places": ["the old ford", "the lower meadows", "the mill race", "the stone quay"],
        "facts": [
            "The river rises quickly after rain in the hills, even when the town stays dry.",
            "Herons stand so still at the water's edge that walkers often pass them without noticing.",
            "The ferry was replaced by a bridge, but the ferryman's cottage still stands by the bank.",
            "Every spring the current moves gravel from the outer bend to the inner one.",
        ],
    },
    "bakery": {
        "nouns": [
            "loaf",
            "oven",
            "dough",
            "crust",
            "flour",
            "baker",
            "starter",
            "tray",
            "bun",
            "pastry",
            "knife",
            "counter",
            "recipe",
            "apron",
            "basket",
        ],
        "people": ["bakers", "customers", "apprentices"],
        "verbs": [
            ("knead", "kneaded"),
            ("bake", "baked"),
            ("shape", "shaped"),
            ("slice", "sliced"),
            ("proof", "proofed"),
            ("weigh", "weighed"),
        ],
        "adjs": ["warm", "golden", "crisp", "soft", "sour", "heavy", "fresh", "floury"],
        "places": ["the back kitchen", "the corner shop", "the market stall", "the village square"],
        "facts": [
            "A sourdough starter has to be fed every day, much like a small and patient pet.",
            "Bread dough needs time more than it needs strength, so the best bakers rarely hurry.",
            "The first batch of the morning usually leaves the oven before the street lamps go out.",
            "Salt slows the yeast down, which is why it is weighed as carefully as the flour.",
        ],
    },
    "astronomy": {
        "nouns": [
            "telescope",
            "planet",
            "comet",
            "star",
            "moon",
            "lens",
            "orbit",
            "eclipse",
            "galaxy",
            "observatory",
            "chart",
            "meteor",
            "horizon",
            "nebula",
            "mirror",
        ],
        "people": ["astronomers", "students", "observers"],
        "verbs": [
            ("observe", "observed"),
            ("measure", "measured"),
            ("record", "recorded"),
            ("track", "tracked"),
            ("focus", "focused"),
            ("photograph", "photographed"),
        ],
        "adjs": ["distant", "faint", "bright", "dark", "frozen", "silent", "ancient", "pale"],
        "places": ["the hilltop dome", "the school roof", "the desert plateau", "the dark field"],
        "facts": [
            "Light from the nearest stars takes years to reach a telescope on the ground.",
            "A clear and moonless night is worth more to an observer than an expensive lens.",
            "Comets brighten as they approach the sun and fade again as they swing away.",
            "Old star charts were drawn by hand, one careful measurement at a time.",
        ],
    },
    "railway": {
        "nouns": [
            "train",
            "station",
            "platform",
            "signal",
            "engine",
            "carriage",
            "timetable",
            "track",
            "tunnel",
            "ticket",
            "guard",
            "junction",
            "viaduct",
            "whistle",
            "sleeper",
        ],
        "people": ["passengers", "engineers", "signalmen"],
        "verbs": [
            ("board", "boarded"),
            ("repair", "repaired"),
            ("inspect", "inspected"),
            ("schedule", "scheduled"),
            ("couple", "coupled"),
            ("extend", "extended"),
        ],
        "adjs": ["late", "narrow", "steep", "crowded", "steady", "rusty", "electric", "early"],
        "places": ["the branch line", "the goods yard", "the northern junction", "the market town"],
        "facts": [
            "The branch line closed for a decade before volunteers reopened it for summer services.",
            "Signals once moved on long steel wires pulled by hand from the signal box.",
            "A timetable is a promise that the whole railway works together to keep.",
            "Steep gradients forced the engineers to build the line around the hill instead of over it.",
        ],
    },
    "bees": {
        "nouns": [
            "hive",
            "bee",
            "queen",
            "honey",
            "frame",
            "swarm",
            "flower",
            "smoker",
            "comb",
            "pollen",
            "veil",
            "colony",
            "nectar",
            "drone",
            "clover",
        ],
        "people": ["beekeepers", "farmers", "children"],
        "verbs": [
            ("inspect", "inspected"),
            ("gather", "gathered"),
            ("calm", "calmed"),
            ("extract", "extracted"),
            ("feed", "fed"),
            ("move", "moved"),
        ],
        "adjs": ["busy", "sticky", "gentle", "humming", "amber", "crowded", "wild", "sweet"],
        "places": ["the clover field", "the orchard edge", "the apiary", "the heather moor"],
        "facts": [
            "A strong colony can hold tens of thousands of bees in the middle of summer.",
            "Bees return to the same flowers while the nectar lasts, which helps the plants as well.",
            "Beekeepers open the hive on warm afternoons when most foragers are out in the fields.",
            "Honey from heather is darker and thicker than honey from clover.",
        ],
    },
    "weather": {
        "nouns": [
            "storm",
            "cloud",
            "wind",
            "barometer",
            "frost",
            "forecast",
            "rain",
            "fog",
            "thunder",
            "season",
            "gust",
            "drizzle",
            "snowfall",
            "sky",
            "breeze",
        ],
        "people": ["forecasters", "sailors", "shepherds"],
        "verbs": [
            ("predict", "predicted"),
            ("watch", "watched"),
            ("report", "reported"),
            ("expect", "expected"),
            ("note", "noted"),
            ("compare", "compared"),
        ],
        "adjs": ["grey", "stormy", "mild", "bitter", "humid", "changing", "heavy", "calm"],
        "places": ["the coastal station", "the upland farms", "the harbour wall", "the valley floor"],
        "facts": [
            "A falling barometer warned sailors of a storm long before the first clouds appeared.",
            "Fog forms in the valley on still nights when the ground cools faster than the air.",
            "Shepherds read the colour of the evening sky to guess the next day's weather.",
            "Snowfall in the hills feeds the rivers for weeks after the spring thaw begins.",
        ],
    },
    "lighthouse": {
        "nouns": [
            "lighthouse",
            "lamp",
            "keeper",
            "beacon",
            "rock",
            "tower",
            "wave",
            "logbook",
            "lens",
            "stairway",
            "cliff",
            "ship",
            "reef",
            "foghorn",
            "gallery",
        ],
        "people": ["keepers", "fishermen", "visitors"],
        "verbs": [
            ("light", "lit"),
            ("polish", "polished"),
            ("climb", "climbed"),
            ("guard", "guarded"),
            ("warn", "warned"),
            ("paint", "painted"),
        ],
        "adjs": ["lonely", "salty", "tall", "whitewashed", "windy", "rocky", "bright", "narrow"],
        "places": ["the northern headland", "the outer reef", "the small island", "the harbour mouth"],
        "facts": [
            "The keepers wound the clockwork every few hours so that the great lens kept turning.",
            "Each lighthouse flashes in its own pattern, so a sailor can tell one from another at night.",
            "The logbook recorded the wind, the weather and every ship that passed the reef.",
            "Salt spray reached the lantern gallery on the worst winter nights.",
        ],
    },
    "pottery": {
        "nouns": [
            "clay",
            "wheel",
            "kiln",
            "glaze",
            "bowl",
            "jug",
            "potter",
            "vase",
            "plate",
            "mug",
            "studio",
            "sponge",
            "handle",
            "rim",
            "tile",
        ],
        "people": ["potters", "students", "collectors"],
        "verbs": [
            ("throw", "threw"),
            ("fire", "fired"),
            ("glaze", "glazed"),
            ("trim", "trimmed"),
            ("wedge", "wedged"),
            ("decorate", "decorated"),
        ],
        "adjs": ["smooth", "earthy", "glossy", "fragile", "heavy", "speckled", "round", "cracked"],
        "places": ["the shared studio", "the kiln shed", "the craft fair", "the river workshop"],
        "facts": [
            "Clay has to be wedged before it goes on the wheel, or trapped air can crack the pot in the kiln.",
            "A glaze that looks dull and grey when applied can come out of the kiln a deep blue.",
            "Potters trim the foot of a bowl when the clay is firm but not yet dry.",
            "A handle attached too late will often separate from the mug during firing.",
        ],
    },
    "chess": {
        "nouns": [
            "board",
            "pawn",
            "bishop",
            "knight",
            "rook",
            "castle",
            "opening",
            "clock",
            "tournament",
            "endgame",
            "move",
            "player",
            "square",
            "club",
            "draw",
        ],
        "people": ["players", "coaches", "spectators"],
        "verbs": [
            ("defend", "defended"),
            ("attack", "attacked"),
            ("study", "studied"),
            ("analyse", "analysed"),
            ("sacrifice", "sacrificed"),
            ("win", "won"),
        ],
        "adjs": ["quiet", "sharp", "patient", "bold", "tense", "careful", "clever", "long"],
        "places": ["the club room", "the town library", "the park tables", "the school hall"],
        "facts": [
            "Beginners often move the same piece several times in the opening and fall behind.",
            "A knight in the centre of the board controls twice as many squares as one in the corner.",
            "Most club games are decided by a single careless move rather than a brilliant one.",
            "Studying finished games teaches patterns that no list of rules can explain.",
        ],
    },
    "cycling": {
        "nouns": [
            "bicycle",
            "saddle",
            "chain",
            "wheel",
            "helmet",
            "route",
            "hill",
            "pump",
            "tyre",
            "lane",
            "map",
            "brake",
            "gear",
            "pannier",
            "puncture",
        ],
        "people": ["cyclists", "commuters", "riders"],
        "verbs": [
            ("ride", "rode"),
            ("climb", "climbed"),
            ("oil", "oiled"),
            ("pump", "pumped"),
            ("plan", "planned"),
            ("lock", "locked"),
        ],
        "adjs": ["steep", "muddy", "fast", "long", "flat", "gravelly", "windy", "scenic"],
        "places": ["the canal path", "the coast road", "the forest trail", "the old railway path"],
        "facts": [
            "A chain that is cleaned and oiled every few weeks lasts far longer than one left to rust.",
            "Riders learn to change gear before a climb rather than halfway up it.",
            "The old railway path is popular because it never rises more than a gentle slope.",
            "A spare inner tube weighs little and saves a long walk home.",
        ],
    },
    "birds": {
        "nouns": [
            "robin",
            "sparrow",
            "owl",
            "nest",
            "feeder",
            "feather",
            "song",
            "wren",
            "swallow",
            "binocular",
            "hedgerow",
            "egg",
            "branch",
            "flock",
            "gull",
        ],
        "people": ["birdwatchers", "ringers", "walkers"],
        "verbs": [
            ("spot", "spotted"),
            ("count", "counted"),
            ("hear", "heard"),
            ("feed", "fed"),
            ("ring", "ringed"),
            ("sketch", "sketched"),
        ],
        "adjs": ["tiny", "shy", "noisy", "speckled", "restless", "migrating", "brown", "early"],
        "places": ["the hedgerows", "the marsh hide", "the churchyard", "the estuary"],
        "facts": [
            "Swallows return to the same barns year after year, often to the very same beam.",
            "A robin will sing through the winter to defend its small patch of garden.",
            "Owls are heard far more often than they are seen, especially in late autumn.",
            "Counting birds in the same place each month shows how the seasons change their numbers.",
        ],
    },
    "tea": {
        "nouns": [
            "teapot",
            "leaf",
            "cup",
            "kettle",
            "plantation",
            "blend",
            "saucer",
            "tin",
            "harvest",
            "estate",
            "infusion",
            "aroma",
            "terrace",
            "picker",
            "strainer",
        ],
        "people": ["tea makers", "growers", "guests"],
        "verbs": [
            ("brew", "brewed"),
            ("pour", "poured"),
            ("steep", "steeped"),
            ("blend", "blended"),
            ("taste", "tasted"),
            ("dry", "dried"),
        ],
        "adjs": ["fragrant", "strong", "delicate", "smoky", "green", "bitter", "hot", "mellow"],
        "places": ["the hill estate", "the tasting room", "the kitchen table", "the high terraces"],
        "facts": [
            "Green tea is usually brewed with water that has cooled a little after boiling.",
            "The youngest leaves at the tip of each shoot give the most delicate flavour.",
            "Leaves left to steep for too long make a cup that is strong but bitter.",
            "A tin with a tight lid keeps tea fresh for months away from light and damp.",
        ],
    },
    "library": {
        "nouns": [
            "library",
            "shelf",
            "book",
            "catalogue",
            "reader",
            "archive",
            "map",
            "newspaper",
            "reading room",
            "manuscript",
            "index",
            "desk",
            "lamp",
            "atlas",
            "pamphlet",
        ],
        "people": ["librarians", "readers", "historians"],
        "verbs": [
            ("borrow", "borrowed"),
            ("catalogue", "catalogued"),
            ("return", "returned"),
            ("search", "searched"),
            ("preserve", "preserved"),
            ("bind", "bound"),
        ],
        "adjs": ["dusty", "quiet", "rare", "leather", "worn", "local", "forgotten", "careful"],
        "places": ["the town archive", "the reading room", "the upper gallery", "the basement stacks"],
        "facts": [
            "The oldest newspapers in the archive are kept in boxes away from sunlight.",
            "A good catalogue lets a reader find a pamphlet that has not been opened for fifty years.",
            "Librarians rebind worn books by hand when the spine finally gives way.",
            "Local maps in the collection show roads and farms that have since disappeared.",
        ],
    },
    "orchard": {
        "nouns": [
            "orchard",
            "apple",
            "pear",
            "ladder",
            "blossom",
            "branch",
            "cider",
            "crate",
            "graft",
            "plum",
            "frost",
            "pruning saw",
            "trunk",
            "wasp",
            "press",
        ],
        "people": ["growers", "pickers", "families"],
        "verbs": [
            ("pick", "picked"),
            ("graft", "grafted"),
            ("press", "pressed"),
            ("store", "stored"),
            ("prune", "pruned"),
            ("sort", "sorted"),
        ],
        "adjs": ["old", "crooked", "fruitful", "late", "sweet", "sour", "russet", "heavy"],
        "places": ["the walled orchard", "the cider barn", "the south slope", "the farm lane"],
        "facts": [
            "Apple trees are pruned in winter, when the branches are bare and the shape is easy to see.",
            "A late frost during blossom time can ruin a whole year's crop in one night.",
            "Old varieties survive because growers graft them onto young rootstock.",
            "Apples stored in a cool barn stay crisp until the end of winter.",
        ],
    },
    "clocks": {
        "nouns": [
            "clock",
            "pendulum",
            "spring",
            "gear",
            "dial",
            "hand",
            "workshop",
            "chime",
            "case",
            "escapement",
            "screwdriver",
            "tower",
            "watch",
            "key",
            "weight",
        ],
        "people": ["clockmakers", "collectors", "apprentices"],
        "verbs": [
            ("wind", "wound"),
            ("oil", "oiled"),
            ("adjust", "adjusted"),
            ("clean", "cleaned"),
            ("restore", "restored"),
            ("assemble", "assembled"),
        ],
        "adjs": ["brass", "ticking", "delicate", "precise", "antique", "slow", "tiny", "polished"],
        "places": ["the tower room", "the narrow workshop", "the town hall", "the glass cabinet"],
        "facts": [
            "A longer pendulum swings more slowly, which is how a clock is made to run on time.",
            "The town clock was wound by hand every week for more than a century.",
            "Old oil turns sticky and can stop a clock more surely than a broken spring.",
            "Clockmakers lay out every part on a clean cloth before they start to reassemble a movement.",
        ],
    },
}

NAMES = [
    "Ada",
    "Ben",
    "Clara",
    "Daniel",
    "Elena",
    "Farid",
    "Grace",
    "Hugo",
    "Ines",
    "Jonas",
    "Kira",
    "Leo",
    "Maya",
    "Nils",
    "Olivia",
    "Priya",
    "Quentin",
    "Rosa",
    "Samuel",
    "Tara",
    "Umar",
    "Vera",
    "Will",
    "Yusuf",
]
SURNAMES = [
    "Archer",
    "Baker",
    "Carter",
    "Dawson",
    "Ellis",
    "Fletcher",
    "Graham",
    "Hughes",
    "Irving",
    "Jensen",
    "Keller",
    "Lowe",
    "Morgan",
    "Novak",
    "Owens",
    "Price",
    "Reid",
    "Shaw",
    "Turner",
    "Walsh",
]
TIMES = [
    "In early spring",
    "Last autumn",
    "On a cold morning in January",
    "During the long summer evenings",
    "Every Saturday",
    "After the harvest",
    "Before sunrise",
    "Late one evening",
    "For many years",
    "In the middle of the week",
    "At the start of the season",
    "Twice a month",
]
ADVS = [
    "slowly",
    "carefully",
    "quietly",
    "patiently",
    "together",
    "every morning",
    "without a word",
    "with great care",
    "once again",
    "at first",
    "in the end",
    "almost every week",
]
EVAL = ["important", "wise", "easier", "useful", "sensible", "worth the effort", "common", "tempting"]
MODALS = ["could", "would", "should", "might", "must", "can"]
CONNECT = ["but", "and", "so", "yet", "while"]
SUB_CONJ = ["before", "after", "while", "when", "until", "because", "although", "as soon as", "once", "since"]
SUB_VERBS = [
    "arrived",
    "settled",
    "dried",
    "cooled",
    "changed",
    "returned",
    "closed",
    "opened",
    "cleared",
    "faded",
    "began",
    "ended",
    "warmed",
    "moved",
    "stopped",
    "appeared",
    "broke",
    "turned",
]
SUB_TAILS = ["", "", "", " again", " at last", " for the day", " that week", " in the night", " too soon"]

GENERAL_VERBS = [
    ("find", "found"),
    ("carry", "carried"),
    ("build", "built"),
    ("keep", "kept"),
    ("bring", "brought"),
    ("check", "checked"),
    ("describe", "described"),
    ("share", "shared"),
    ("choose", "chose"),
    ("leave", "left"),
    ("hold", "held"),
    ("notice", "noticed"),
    ("protect", "protected"),
    ("clean", "cleaned"),
    ("prepare", "prepared"),
    ("test", "tested"),
]

_IRREGULAR = {
    "leaf": "leaves",
    "shelf": "shelves",
    "loaf": "loaves",
    "knife": "knives",
    "person": "people",
    "child": "children",
    "sheep": "sheep",
    "fish": "fish",
    "reading room": "reading rooms",
}


def plural(noun: str) -> str:
    head, _, last = noun.rpartition(" ")
    if last in _IRREGULAR:
        p = _IRREGULAR[last]
    elif last.endswith(("s", "sh", "ch", "x")):
        p = last + "es"
    elif last.endswith("y") and last[-2:-1] not in "aeiou":
        p = last[:-1] + "ies"
    else:
        p = last + "s"
    return f"{head} {p}" if head else p


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


class Prose:
    """A seeded sentence grammar over one main topic (and sometimes a second one)."""

    def __init__(self, rng: random.Random, topic: str, second: str | None = None):
        self.rng = rng
        self.t = TOPICS[topic]
        self.t2 = TOPICS[second] if second else None
        self.used_facts: set[str] = set()

    def _pick(self, key: str) -> str:
        src = self.t2 if self.t2 is not None and self.rng.random() < 0.25 else self.t
        return self.rng.choice(src[key])

    def noun(self) -> str:
        return self._pick("nouns")

    def np(self) -> str:
        n = self.noun()
        r = self.rng.random()
        if r < 0.35:
            return f"the {n}"
        if r < 0.6:
            adj = self._pick("adjs")
            return f"the {adj} {n}"
        if r < 0.8:
            adj = self._pick("adjs")
            return f"{article(adj)} {adj} {n}"
        return f"{self.rng.choice(['their', 'our', 'one', 'every', 'that'])} {n}"

    def verb(self) -> tuple[str, str]:
        if self.rng.random() < 0.7:
            return self._pick("verbs")  # type: ignore[return-value]
        return self.rng.choice(GENERAL_VERBS)

    def person(self) -> str:
        return f"{self.rng.choice(NAMES)} {self.rng.choice(SURNAMES)}"

    def sub(self) -> str:
        """A subordinate clause built from parts, so that no long phrase repeats inside one document."""
        return f"{self.rng.choice(SUB_CONJ)} {self.np()} {self.rng.choice(SUB_VERBS)}{self.rng.choice(SUB_TAILS)}"

    def clause(self) -> str:
        r = self.rng.random()
        if r < 0.35:
            return f"{self.np()} {self.verb()[1]} {self.np()} {self.rng.choice(ADVS)}"
        if r < 0.65:
            return f"the {self._pick('people')} {self.rng.choice(MODALS)} {self.verb()[0]} {self.np()} {self.sub()}"
        return f"the {plural(self.noun())} near {self._pick('places')} {self.verb()[1]} {self.np()}"

    def sentence(self) -> str:
        r = self.rng.random()
        if r < 0.13 and len(self.used_facts) < len(self.t["facts"]):
            fact = self.rng.choice([f for f in self.t["facts"] if f not in self.used_facts])
            self.used_facts.add(fact)
            return fact
        if r < 0.26:
            s = f"{self.rng.choice(TIMES)}, the {self._pick('people')} {self.verb()[1]} {self.np()} at {self._pick('places')}"
        elif r < 0.38:
            q = self.rng.choice(["Many", "Some", "Most", "A few", "Older", "Younger"])
            s = f"{q} {self._pick('people')} {self.verb()[0]} {plural(self.noun())} because {self.clause()}"
        elif r < 0.50:
            s = f"{self.clause()}, {self.rng.choice(CONNECT)} {self.clause()}"
        elif r < 0.60:
            it = self.rng.choice(
                ["It is", "It was", "It seemed", "It can be", "It is often", "It was rarely"]
            )
            s = f"{it} {self.rng.choice(EVAL)} to {self.verb()[0]} {self.np()} {self.sub()}"
        elif r < 0.66:
            w = self.rng.choice(["Why do", "How do", "When do", "Where do", "Why did", "How often do"])
            return f"{w} the {self._pick('people')} {self.verb()[0]} {plural(self.noun())} {self.rng.choice(ADVS)}?"
        elif r < 0.76:
            v = self.verb()[1]
            said = self.rng.choice(
                ["said that", "wrote that", "remembered that", "explained that", "insisted that"]
            )
            span = self.rng.choice(
                [
                    f"for {self.rng.randint(2, 40)} years",
                    f"since {self.rng.randint(1950, 2020)}",
                    "as a child",
                    "every summer",
                    "in the old days",
                ]
            )
            s = f"{self.person()}, who {v} {self.np()} {span}, {said} {self.clause()}"
        elif r < 0.86:
            seen = self.rng.choice(["counted", "recorded", "seen", "listed", "found"])
            prep = self.rng.choice(["near", "around", "beyond", "at", "below"])
            cmp_ = self.rng.choice(["far more than", "fewer than", "twice as many as", "about as many as"])
            when = self.rng.choice(
                ["the year before", "in the previous decade", "a generation earlier", "ever before"]
            )
            s = (
                f"By {self.rng.randint(1850, 2020)}, about {self.rng.randint(3, 900)} {plural(self.noun())} had been "
                f"{seen} {prep} {self._pick('places')}, {cmp_} {when}"
            )
        else:
            s = f"{self.np()} {self.verb()[1]} {self.np()} {self.sub()}"
        s = s[0].upper() + s[1:]
        return s + "."

    def paragraph(self, lo: int = 4, hi: int = 7) -> str:
        return " ".join(self.sentence() for _ in range(self.rng.randint(lo, hi)))

    def title(self) -> str:
        n, p = self.noun(), self._pick("places")
        forms = [
            f"Notes on the {n}",
            f"A season at {p}",
            f"How we {self.verb()[0]} the {n}",
            f"The {self._pick('adjs')} {n} and what it taught us",
            f"Letters from {p}",
        ]
        s = self.rng.choice(forms)
        return s[0].upper() + s[1:]


def article_text(rng: random.Random, words: int) -> tuple[str, str]:
    topic = rng.choice(list(TOPICS))
    second = rng.choice(list(TOPICS)) if rng.random() < 0.4 else None
    g = Prose(rng, topic, second)
    paras: list[str] = []
    while sum(len(p.split()) for p in paras) < words:
        paras.append(g.paragraph())
    return g.title(), "\n\n".join(paras)


# ---------------------------------------------------------------------------------------------------------
# planted material

FRENCH = [
    "Le marché du samedi attire les familles de tout le village depuis des générations.",
    "Les boulangers ouvrent leurs portes avant le lever du soleil pour vendre le pain encore chaud.",
    "Au printemps, les pommiers du verger se couvrent de fleurs blanches et roses.",
    "La rivière traverse la vallée lentement et les pêcheurs attendent patiemment sur la rive.",
    "Ma grand-mère racontait souvent l'histoire du vieux moulin qui tournait jour et nuit.",
    "Les enfants apprennent à jouer aux échecs dans la salle de la bibliothèque municipale.",
    "Le soir, le vent de la mer apporte une odeur de sel jusque dans les rues étroites.",
    "Nous avons planté des tomates et des haricots dans le petit jardin derrière la maison.",
    "Le gardien du phare notait chaque bateau qui passait près des rochers.",
    "Pendant l'hiver, la neige couvre les collines et les routes deviennent difficiles.",
]
GERMAN = [
    "Der Bäcker beginnt seine Arbeit lange bevor die ersten Kunden in den Laden kommen.",
    "Im Herbst sammeln die Kinder Äpfel im alten Obstgarten hinter der Schule.",
    "Der Fluss ist nach dem Regen schnell gestiegen und hat die Wiesen überflutet.",
    "Meine Nachbarin hält seit vielen Jahren Bienen und verkauft den Honig auf dem Markt.",
    "Die Bibliothek der Stadt bewahrt alte Karten und Zeitungen aus dem letzten Jahrhundert.",
    "Am Wochenende fahren viele Familien mit dem Fahrrad am Kanal entlang.",
    "Der Uhrmacher repariert die Turmuhr jedes Frühjahr mit großer Sorgfalt.",
    "Wenn der Nebel im Tal liegt, bleiben die Schafe lieber in der Nähe des Stalls.",
    "Die Schüler beobachten in klaren Nächten die Sterne vom Dach der Schule aus.",
    "Nach dem Essen trinken wir gern eine Tasse Tee und sprechen über den Tag.",
]
SPANISH = [
    "Los pescadores salen del puerto muy temprano, cuando el mar todavía está tranquilo.",
    "En verano, las noches son largas y los vecinos se sientan a conversar en la plaza.",
    "Mi abuelo cuidaba un huerto lleno de tomates, pimientos y cebollas.",
    "La biblioteca del pueblo organiza lecturas para los niños todos los sábados.",
    "El río baja con mucha fuerza después de las tormentas de primavera.",
    "Los panaderos preparan la masa por la noche para que el pan esté listo al amanecer.",
    "Desde la colina se puede ver todo el valle y las montañas al fondo.",
    "Las abejas visitan las flores del campo durante toda la mañana.",
    "El tren pasa por el viejo puente de piedra dos veces al día.",
    "En invierno preparamos sopa caliente y contamos historias junto al fuego.",
]

KEYWORDS_A = [
    "cheap",
    "discount",
    "wooden",
    "leather",
    "vintage",
    "handmade",
    "premium",
    "garden",
    "kitchen",
    "outdoor",
    "luxury",
    "budget",
    "organic",
    "steel",
    "cotton",
    "ceramic",
]
KEYWORDS_B = [
    "boots",
    "chairs",
    "lamps",
    "watches",
    "kettles",
    "blankets",
    "mugs",
    "bicycles",
    "teapots",
    "clocks",
    "hammocks",
    "baskets",
    "candles",
    "rugs",
    "shelves",
    "jackets",
]
KEYWORDS_C = ["sale", "online", "deals", "outlet", "shop", "store", "offers", "prices", "delivery", "reviews"]


def junk_texts(rng: random.Random) -> list[tuple[str, str]]:
    """(id, text) of English junk, each aimed at one quality rule (the comment names the rule)."""
    prose = Prose(rng, "garden")
    lines_no_punct = [
        Prose(rng, t).sentence().rstrip(".?") for t in ("railway", "tea", "birds") for _ in range(6)
    ]
    spam = ", ".join(
        f"{rng.choice(KEYWORDS_A)} {rng.choice(KEYWORDS_B)} {rng.choice(KEYWORDS_C)}" for _ in range(45)
    )
    return [
        # Gopher repetition: the same line over and over
        (
            "junk-repeated-lines",
            "\n".join(["Click here to subscribe to our newsletter and never miss an update."] * 30),
        ),
        # Gopher quality: keyword spam without stop words
        ("junk-keyword-spam", spam),
        # Gopher quality: too short to be a document
        (
            "junk-moved",
            "This page has moved. Please update your bookmarks and visit our new site for the latest news.",
        ),
        # C4: placeholder text
        (
            "junk-lorem",
            prose.paragraph()
            + "\n\nLorem ipsum dolor sit amet, this section is still a placeholder.\n\n"
            + prose.paragraph(),
        ),
        # C4: code (curly brackets)
        (
            "junk-code",
            prose.paragraph()
            + "\n\nPaste this into the page: if (ready) { startSlideshow(); }\n\n"
            + prose.paragraph(),
        ),
        # FineWeb: lines that never end in punctuation
        ("junk-no-punctuation", "\n".join(lines_no_punct)),
    ]


def luhn_complete(prefix: str, length: int, rng: random.Random) -> str:
    body = prefix + "".join(str(rng.randint(0, 9)) for _ in range(length - len(prefix) - 1))
    total = 0
    for i, ch in enumerate(reversed(body)):
        d = int(ch)
        if i % 2 == 0:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return body + str((10 - total % 10) % 10)


def gb_iban(rng: random.Random) -> str:
    bban = "NWBK" + "".join(str(rng.randint(0, 9)) for _ in range(14))
    moved = bban + "GB00"
    digits = "".join(str(int(c, 36)) for c in moved)
    check = 98 - int(digits) % 97
    compact = f"GB{check:02d}{bban}"
    return " ".join(compact[i : i + 4] for i in range(0, len(compact), 4))


def pii_sentences(rng: random.Random) -> list[str]:
    """Sentences that carry one PII item each (redacted by the data stage)."""
    name = rng.choice(NAMES).lower()
    card = luhn_complete("4", 16, rng)
    grouped = " ".join(card[i : i + 4] for i in range(0, 16, 4))
    return [
        f"Questions about the next meeting can be sent to {name}.{rng.choice(SURNAMES).lower()}@example.org at any time.",
        f"The secretary can be reached on +44 20 7946 0{rng.randint(100, 999)} during office hours.",
        f"Members who prefer the phone may call (555) {rng.randint(200, 999)}-{rng.randint(1000, 9999)} after six.",
        f"The booking page was briefly hosted on a server at 93.184.{rng.randint(10, 200)}.{rng.randint(10, 200)} last year.",
        f"One member accidentally posted the card number {grouped} in the group chat and had to cancel it.",
        f"Donations for the roof repair go to the account {gb_iban(rng)} held by the society.",
        f"An old form in the archive still shows the social security number {rng.randint(100, 599)}-{rng.randint(10, 99)}-{rng.randint(1000, 9999)} in full.",
    ]


def near_copy(rng: random.Random, text: str) -> str:
    """A syndicated copy: a handful of words swapped and one sentence added at the end."""
    words = text.split(" ")
    for _ in range(max(3, len(words) // 120)):
        i = rng.randrange(len(words))
        if words[i].isalpha() and words[i].islower():
            words[i] = rng.choice(["old", "new", "small", "large", "local", "famous"])
    return (
        " ".join(words)
        + "\n\nThis article first appeared in the spring newsletter of the local history society."
    )


def html_page(title: str, body: str, rng: random.Random, junk_only: bool = False) -> str:
    nav = "".join(
        f'<li><a href="/{w.lower()}">{w}</a></li>'
        for w in ["Home", "News", "Events", "Shop", "About", "Contact"]
    )
    footer = (
        "<footer><p>© 2024 Riverside Community Pages. All rights reserved.</p><ul>"
        '<li><a href="/privacy">Privacy policy</a></li><li><a href="/terms">Terms of use</a></li>'
        '<li><a href="/sitemap">Sitemap</a></li></ul></footer>'
    )
    related = "".join(
        f'<li><a href="/post/{rng.randint(100, 999)}">{t}</a></li>'
        for t in ["Older posts", "Popular", "Archive"]
    )
    if junk_only:  # nothing but navigation, a gallery and a script: trafilatura keeps only the menu
        main = '<div id="app"></div><script>renderApp(document.getElementById("app"));</script>' + "".join(
            f'<a href="/g/{i}"><img src="/img/{i}.jpg" alt=""></a>' for i in range(rng.randint(4, 12))
        )
    else:
        paras = "".join(f"<p>{p}</p>" for p in body.split("\n\n"))
        main = f'<article><h1>{title}</h1><p class="byline">Posted by the editors</p>{paras}</article>'
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
        f"<script>window.dataLayer = window.dataLayer || [];</script></head><body>"
        f"<header><nav><ul>{nav}</ul></nav></header><main>{main}</main>"
        f"<aside><h3>Related</h3><ul>{related}</ul></aside>{footer}</body></html>"
    )


# ---------------------------------------------------------------------------------------------------------
# writers


def gz_bytes(data: bytes) -> bytes:
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0, compresslevel=9) as f:
        f.write(data)
    return buf.getvalue()


def jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")


def write_warc(path: Path, pages: list[tuple[str, str]]) -> None:
    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter

    with open(path, "wb") as fh:
        writer = WARCWriter(fh, gzip=True)
        for i, (url, html) in enumerate(pages):
            payload = html.encode("utf-8")
            http = StatusAndHeaders(
                "200 OK", [("Content-Type", "text/html; charset=utf-8")], protocol="HTTP/1.1"
            )
            rec = writer.create_warc_record(
                url,
                "response",
                payload=io.BytesIO(payload),
                length=len(payload),
                http_headers=http,
                warc_headers_dict={
                    "WARC-Record-ID": f"<urn:uuid:00000000-0000-4000-8000-{i:012d}>",
                    "WARC-Date": f"2024-05-{1 + i % 28:02d}T12:00:00Z",
                    "WARC-Identified-Payload-Type": "text/html",
                },
            )
            writer.write_record(rec)


def build(out: Path, seed: int) -> dict[str, int]:
    rng = random.Random(seed)
    if out.exists():
        shutil.rmtree(out)
    (out / "web").mkdir(parents=True)
    (out / "notes").mkdir()
    (out / "broken").mkdir()

    # -- articles.jsonl.gz: the bulk of the clean prose ----------------------------------------------------
    articles: list[dict] = []
    for i in range(170):
        title, body = article_text(rng, rng.randint(320, 560))
        articles.append({"id": f"article-{i:03d}", "title": title, "text": f"{title}\n\n{body}"})
    pii_lines = pii_sentences(rng)
    for j, sentence in enumerate(pii_lines):  # PII planted into ordinary articles
        a = articles[10 + 7 * j]
        a["text"] += "\n\n" + sentence
    leaked = articles[80]
    leaked["text"] += (
        "\n\nOur deploy script uses aws_access_key_id = AKIA"
        + "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567") for _ in range(16))
        + " for uploads."
    )
    rows = list(articles)
    for k in range(6):  # near duplicates: syndicated copies
        src = articles[20 + 11 * k]
        rows.append({"id": f"{src['id']}-syndicated", "text": near_copy(rng, src["text"])})
    rows.append({"id": "article-005-repost", "text": articles[5]["text"]})  # exact duplicate, same file
    for lang, sentences in (("fr", FRENCH), ("de", GERMAN), ("es", SPANISH)):
        for k in range(2):
            picked = rng.sample(sentences, 8)
            rows.append({"id": f"{lang}-{k}", "text": " ".join(picked[:4]) + "\n\n" + " ".join(picked[4:])})
    for doc_id, junk in junk_texts(rng):
        rows.append({"id": doc_id, "text": junk})
    rng.shuffle(rows)
    (out / "articles.jsonl.gz").write_bytes(gz_bytes(jsonl(rows)))

    # -- web/pages.warc.gz: HTML with boilerplate, junk pages, a page under two URLs ------------------------
    pages: list[tuple[str, str]] = []
    for i in range(48):
        title, body = article_text(rng, rng.randint(260, 420))
        pages.append((f"https://riverside.example/posts/{i}", html_page(title, body, rng)))
    pages.append(("https://riverside.example/amp/posts/3", pages[3][1]))  # same page, second URL
    pages.append(("https://riverside.example/print/posts/9", pages[9][1]))
    for i in range(8):  # boilerplate-only listing pages
        pages.append((f"https://riverside.example/shop/page/{i}", html_page("Shop", "", rng, junk_only=True)))
    title, body = article_text(rng, 300)
    pages.append(
        ("https://riverside.example/posts/contact", html_page(title, body + "\n\n" + pii_lines[0], rng))
    )
    write_warc(out / "web" / "pages.warc.gz", pages)

    # -- notes: markdown and text files --------------------------------------------------------------------
    for i in range(10):
        title, body = article_text(rng, rng.randint(250, 400))
        if i % 2 == 0:
            (out / "notes" / f"note-{i:02d}.md").write_text(f"# {title}\n\n{body}\n", encoding="utf-8")
        else:
            (out / "notes" / f"note-{i:02d}.txt").write_text(f"{title}\n\n{body}\n", encoding="utf-8")
    (out / "notes" / "reposted-article.txt").write_text(
        articles[42]["text"] + "\n", encoding="utf-8"
    )  # exact dup
    (out / "notes" / "empty.txt").write_text("", encoding="utf-8")

    # -- forum.jsonl: small, with bad lines the reader must skip and count ----------------------------------
    forum = io.BytesIO()
    for i in range(12):
        title, body = article_text(rng, rng.randint(200, 320))
        forum.write(
            json.dumps({"id": f"forum-{i}", "text": body, "author": rng.choice(NAMES)}).encode() + b"\n"
        )
    forum.write(b'{"id": "forum-bad-utf8", "text": "caf\xe9 au lait \xff\xfe broken bytes"}\n')
    forum.write(
        json.dumps(
            {"id": "forum-binary", "text": "".join(chr(rng.randint(0, 31)) for _ in range(400))}
        ).encode()
        + b"\n"
    )
    forum.write(json.dumps({"id": "forum-number", "text": 12345}).encode() + b"\n")
    forum.write(b'{"id": "forum-cut", "text": "this line was cut off in the mid\n')
    forum.write(
        json.dumps({"id": "forum-repost", "text": articles[77]["text"]}).encode() + b"\n"
    )  # exact dup
    (out / "forum.jsonl").write_bytes(forum.getvalue())

    # -- broken/truncated.jsonl.gz: a gzip stream cut in half ----------------------------------------------
    tail_rows = []
    for i in range(8):
        title, body = article_text(rng, rng.randint(250, 350))
        tail_rows.append({"id": f"late-{i}", "text": f"{title}\n\n{body}"})
    data = gz_bytes(jsonl(tail_rows))
    (out / "broken" / "truncated.jsonl.gz").write_bytes(data[: len(data) // 2])

    sizes = {str(p.relative_to(out)): p.stat().st_size for p in sorted(out.rglob("*")) if p.is_file()}
    return sizes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--seed", type=int, default=SEED)
    args = ap.parse_args()
    sizes = build(args.out, args.seed)
    total = sum(sizes.values())
    for name, size in sizes.items():
        print(f"{size:>9,}  {name}")
    print(f"{total:>9,}  total ({args.out})")


if __name__ == "__main__":
    main()
