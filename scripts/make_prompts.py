"""
Builds prompts/train.jsonl and prompts/heldout.jsonl: everyday instructions, each
with 1-3 machine-checkable constraints stated in the text and stored in "checks"
(checked by judge.py). Deterministic: same seed, same files.

    python scripts/make_prompts.py

Topics, paragraphs and questions are split between train and heldout before any
prompt is built, so no held-out instruction is about anything seen in training.

The constraints are tuned for a 135M policy sampling ~100 tokens at temperature
0.7: each should be met sometimes but not always, otherwise all K samples of a
prompt get the same score and SPPO has nothing to learn from.
"""

import json
import os
import random

SEED = 2405_00675
N_TRAIN, N_HELDOUT = 320, 330
HELDOUT_FRACTION = 0.25
LENGTH_SHARE = 0.6  # prompts with a length bound
UPPER_BOUNDS, LOWER_BOUNDS = ("max_words", "max_sentences"), ("min_words", "min_sentences")
WORD_BOUNDS = [20, 25, 30, 35, 40]  # for at most and at least alike

# (topic, a plain word that fits it: used for "use the word ..." constraints)
TOPICS = [
    ("the moon", "night"), ("rain", "cloud"), ("bicycles", "wheel"), ("honeybees", "flower"),
    ("lighthouses", "light"), ("morning coffee", "cup"), ("houseplants", "leaf"),
    ("public libraries", "book"), ("learning to swim", "pool"), ("volcanoes", "fire"),
    ("autumn leaves", "tree"), ("a rainy weekend", "window"), ("recycling", "plastic"),
    ("trains", "track"), ("the ocean", "wave"), ("snowflakes", "cold"), ("dogs", "friend"),
    ("cats", "sleep"), ("baking bread", "oven"), ("the night sky", "star"), ("gardening", "soil"),
    ("a busy market", "fruit"), ("thunderstorms", "loud"), ("deserts", "sand"),
    ("old maps", "road"), ("flying kites", "wind"), ("owls", "tree"), ("saving money", "plan"),
    ("drinking enough water", "body"), ("the first day at a new school", "friend"),
    ("mountains", "snow"), ("rivers", "fish"), ("tea", "warm"), ("penguins", "ice"),
    ("music lessons", "song"), ("chess", "move"), ("the sun", "heat"), ("city parks", "grass"),
    ("camping", "tent"), ("writing letters", "paper"), ("a good night's sleep", "dream"),
    ("breakfast", "egg"), ("bridges", "river"), ("butterflies", "color"), ("clocks", "time"),
    ("a family dinner", "table"), ("walking every day", "health"), ("fire safety", "smoke"),
    ("learning a new language", "word"), ("umbrellas", "rain"), ("the wind", "air"),
    ("forests", "tree"), ("birthdays", "cake"), ("museums", "history"), ("telescopes", "sky"),
    ("a small island", "boat"), ("spiders", "web"), ("painting with watercolors", "brush"),
    ("farming", "field"), ("the color blue", "sky"), ("frogs", "pond"), ("mushrooms", "forest"),
    ("sailing", "boat"), ("running shoes", "foot"), ("losing your keys", "door"),
    ("ice cream", "sweet"), ("homemade soup", "hot"), ("rainbows", "color"),
    ("earthquakes", "ground"), ("elephants", "trunk"), ("whales", "song"), ("postcards", "travel"),
    ("doing homework", "time"), ("a snowy morning", "white"), ("picnics", "basket"),
    ("candles", "flame"), ("cheese", "milk"), ("windmills", "wind"), ("caves", "dark"),
    ("ocean tides", "moon"), ("fireflies", "glow"), ("rubber boots", "mud"),
    ("growing tomatoes", "garden"), ("a neighborhood bakery", "bread"),
    ("paper airplanes", "fold"), ("jigsaw puzzles", "piece"), ("hiking", "path"),
    ("thank-you notes", "kind"), ("adopting a pet", "home"), ("compost", "soil"),
    ("the first snow of winter", "cold"), ("street lights", "night"), ("a fishing trip", "lake"),
    ("seashells", "beach"), ("orange juice", "fruit"), ("board games", "dice"),
    ("a cracked phone screen", "glass"), ("washing dishes", "soap"), ("learning to cook", "kitchen"),
    ("lunch breaks", "rest"), ("deep breathing", "calm"), ("shooting stars", "sky"),
    ("snails", "slow"), ("a road trip", "car"), ("keeping a diary", "page"), ("city buses", "seat"),
    ("ants", "work"), ("a summer storm", "rain"), ("apple trees", "seed"), ("good manners", "please"),
    ("knitting", "yarn"), ("a visit to the dentist", "teeth"), ("polar bears", "ice"),
    ("blueberries", "sweet"), ("clouds", "shape"), ("a long walk home", "feet"),
    ("sunflowers", "yellow"), ("lemons", "sour"), ("jazz music", "sound"), ("sand castles", "beach"),
    ("wooden boats", "water"), ("a noisy neighbor", "quiet"), ("growing herbs", "smell"),
    ("the alphabet", "letter"), ("dolphins", "sea"), ("balloons", "air"),
]

# Made-up paragraphs for summarize / main-point tasks (original text).
PARAGRAPHS = [
    ("The town of Millbrook opened its first community garden last spring. Volunteers cleared an "
     "empty lot behind the post office and built twelve raised beds. By August the garden was "
     "producing more tomatoes than the members could eat, so they started leaving baskets of "
     "vegetables outside the library for anyone to take.", "garden"),
    ("Nadia had practiced the violin for three years before she played in public. On the night of "
     "the school concert her hands shook so much that she nearly dropped the bow. After the first "
     "few notes, though, she forgot the audience and simply listened to the music. When she "
     "finished, her little brother cheered louder than anyone.", "music"),
    ("A small bakery on Elm Street began baking with flour from a nearby mill. The owner says the "
     "bread costs a little more, but customers like knowing where their food comes from. The mill, "
     "which had nearly closed, now runs five days a week and has hired two new workers.", "bread"),
    ("Researchers at a lake station counted the frogs along the shore every evening for a month. "
     "They found far more frogs on warm, damp nights than on dry ones. The team plans to repeat "
     "the count next year to see whether the numbers change as the summers get hotter.", "frogs"),
    ("Every Saturday, Mr. Okafor repairs broken bicycles in his garage for free. Children from the "
     "neighborhood bring flat tires, loose chains and squeaky brakes. He teaches each child to fix "
     "part of the problem so that next time they can do it themselves.", "bicycle"),
    ("The city council voted to turn one lane of Harbor Road into a path for walkers and cyclists. "
     "Shop owners worried that fewer cars would mean fewer customers. Six months later, most shops "
     "on the road report that sales have stayed the same or gone up.", "road"),
    ("When the power went out during the storm, the Lee family lit candles and played cards at the "
     "kitchen table. Without phones or television, they talked for hours. The lights came back "
     "around midnight, but nobody wanted to stop the game.", "storm"),
    ("A tiny museum in a mountain village displays nothing but old keys. Some are as long as a "
     "hand, and others are smaller than a fingernail. Visitors guess which door each key once "
     "opened, and the guide tells the true story afterward.", "key"),
    ("Sam wanted to run a race before his fortieth birthday. He started by walking twenty minutes "
     "a day, then slowly added short runs. Eight months later he finished a ten kilometer race, "
     "slower than most runners but smiling the whole way.", "race"),
    ("The school library replaced its old study tables with long benches and soft lamps. The "
     "librarian noticed that students now stay longer and speak more quietly. She thinks the warm "
     "light makes the room feel calmer, especially on dark winter afternoons.", "light"),
    ("A fishing boat found a sea turtle tangled in an old net. The crew cut the net away carefully "
     "and waited until the turtle swam off. They later reported the spot so that a cleanup team "
     "could remove other nets from the area.", "turtle"),
    ("Ella writes one postcard every week to her grandmother, who lives across the country. At "
     "first she wrote about the weather, but soon she began drawing small pictures of her day. Her "
     "grandmother keeps every card in a shoebox and reads them again on Sundays.", "card"),
    ("In the imaginary country of Velmora, every child plants a tree on their tenth birthday. Over "
     "many years, the bare hills outside the capital have turned into a thick forest. People walk "
     "there on weekends, and each family likes to visit its own trees.", "tree"),
    ("The night bus from the airport used to be nearly empty. After the bus company added free "
     "Wi-Fi and a quiet section, the number of riders doubled. Travelers say they like resting "
     "without worrying about a taxi fare.", "bus"),
    ("A group of students built a simple weather station on the roof of their school. It measures "
     "wind, rain and temperature every ten minutes. The students share the readings online, and a "
     "local farmer now checks them before deciding when to plant.", "weather"),
    ("Priya's first attempt at making soup was a disaster because she added salt three times. Her "
     "roommate suggested tasting the soup before adding anything. Now Priya keeps a small spoon "
     "next to the stove and tastes as she cooks.", "soup"),
    ("The old clock tower in the town square stopped working years ago. A retired teacher spent a "
     "whole summer cleaning its gears and replacing a broken spring. When the bells rang again at "
     "noon, people in the square clapped.", "clock"),
    ("A cafe started a shelf where customers can leave a book and take another. Within a month the "
     "shelf was overflowing, so the owner added a second one. Regulars now arrive early to see "
     "what new stories have appeared.", "book"),
    ("Marco was afraid of the deep end of the pool until his coach taught him to float on his "
     "back. Once he learned that the water would hold him up, his fear faded. He now helps younger "
     "children practice floating on Saturday mornings.", "water"),
    ("The village of Stonebridge holds a lantern walk on the longest night of the year. Families "
     "make paper lanterns at home and carry them along the river path. At the end of the walk, "
     "everyone shares hot cider by a bonfire.", "lantern"),
    ("A beekeeper noticed that her hives were quieter than usual one spring. She found that a "
     "nearby field of clover had been mowed. She planted wildflowers around her yard, and by "
     "summer the bees were busy again.", "bees"),
    ("Two friends started a podcast about forgotten board games. Each episode they teach a game "
     "that was popular a hundred years ago and play it on air. Listeners send photos of homemade "
     "boards and invent new rules.", "game"),
    ("A hospital started letting trained dogs visit patients on Friday afternoons. Nurses noticed "
     "that many patients smiled more and asked for the dogs by name. Some patients said the visits "
     "were the best part of their week.", "dogs"),
    ("After a heavy snowfall, the neighbors on Birch Lane shoveled each other's paths instead of "
     "only their own. An older resident who could not shovel brought out a large pot of cocoa. By "
     "evening the whole street had clear paths and warm hands.", "snow"),
]

QUESTIONS = [
    ("Why do leaves change color in the fall?", "green"), ("How do birds find their way south in winter?", "south"),
    ("What makes bread rise?", "yeast"), ("Why do people need sleep?", "brain"),
    ("How does a refrigerator keep food cold?", "cold"), ("Why is the sea salty?", "salt"),
    ("What is the difference between weather and climate?", "weather"), ("How do plants drink water?", "roots"),
    ("Why do cats like sitting in boxes?", "safe"), ("What should you pack for a day at the beach?", "sun"),
    ("How can someone make friends after moving to a new city?", "club"),
    ("What is a good way to start learning to draw?", "pencil"), ("Why do people yawn?", "tired"),
    ("How do bees make honey?", "nectar"), ("What is a healthy snack for the afternoon?", "fruit"),
    ("Why does ice float on water?", "ice"), ("How can you stay calm before a test?", "breathe"),
    ("What makes a good neighbor?", "help"), ("Why do we see lightning before we hear thunder?", "light"),
    ("How does a compass work?", "north"), ("How do you keep a plant alive indoors?", "light"),
    ("Why do onions make people cry?", "eyes"), ("How do you fold a simple paper boat?", "fold"),
    ("What are stars made of?", "gas"), ("Why do dogs wag their tails?", "happy"),
    ("How can a family use less electricity at home?", "lights"), ("Why is exercise good for the mind?", "mood"),
    ("What happens to rain after it hits the ground?", "river"),
    ("How can I remember new words in a foreign language?", "practice"),
    ("Why do some animals sleep through the winter?", "food"), ("What is a fun thing to do on a rainy day?", "game"),
    ("Why do we have seasons?", "sun"), ("How do you write a polite email to a teacher?", "thank"),
    ("What makes a story exciting?", "hero"), ("Why do bananas turn brown?", "air"),
    ("How can someone be kinder to strangers?", "smile"), ("What is the moon made of?", "rock"),
    ("Why should we brush our teeth twice a day?", "teeth"), ("How do fish breathe underwater?", "gills"),
    ("What makes popcorn pop?", "heat"), ("How can you tell if an egg is fresh?", "water"),
    ("Why are sunsets often red or orange?", "light"), ("What should a beginner know about running?", "shoes"),
    ("How do volcanoes make new islands?", "lava"),
]

# task templates; "nolist": a list format would make no sense (poems, stories)
TOPIC_TASKS = [
    ("Write a short poem about {t}.", True), ("Describe {t} in simple words.", False),
    ("Tell a very short story about {t}.", True), ("Explain {t} to a seven-year-old.", False),
    ("Share a few interesting facts about {t}.", False), ("Write a short note to a friend about {t}.", True),
    ("Give some practical tips related to {t}.", False), ("Why might someone find {t} interesting? Answer briefly.", False),
    ("Write a short diary entry about {t}.", True), ("Write a friendly social media post about {t}.", True),
    ("Compare {t} to something from everyday life.", False), ("Summarize what you know about {t} in plain language.", False),
    ("Write a short, cheerful description of {t}.", True), ("What is the most surprising thing about {t}? Keep it short.", False),
]
PARAGRAPH_TASKS = [
    ("Summarize this paragraph.", False), ("What is the main point of the text below?", False),
    ("What lesson could someone take from this short text?", False),
    ("Rewrite this paragraph so a young child could understand it.", True),
    ("Explain in your own words what happened in this text.", False),
]
QUESTION_TASKS = [
    ("{q}", False), ("Answer this question: {q}", False), ("A curious child asks: \"{q}\" Reply to them.", True),
    ("Briefly answer: {q}", False), ("My friend wants to know: {q}", False),
]
JSON_KEYS = [("name", "description"), ("topic", "fact"), ("title", "summary"), ("answer", "reason"),
             ("place", "feeling")]

SIMPLE_WORDS = ["river", "friend", "morning", "light", "bright", "garden", "window", "quiet", "simple",
                "happy", "green", "music", "journey", "smile", "gentle", "little", "home"]
# very frequent words: avoiding them, or using one 2-3 times, is met only sometimes
COMMON_WORDS = ["the", "is", "and", "of", "to", "it", "in"]
START_WORDS = ["Yes", "Sure", "Today", "Imagine", "Well", "Once", "Here", "Hello", "In", "The", "Dear", "First"]
END_PHRASES = ["That is all.", "Thanks for reading.", "Have a nice day!", "The end.", "Stay curious!",
               "I hope this helps."]


# -----------------------------------------------------------------------------
# constraint makers: (rng, key_word) -> (sentence for the prompt, list of checks)

# Length bounds come in mirrored pairs (at most / at least N words, sentences) with the same
# thresholds, placed around the policy's sampled lengths (median ~30 words, at most ~60 in
# 64 new tokens), so each is met about as often as its mirror and neither direction pays.

def c_max_words(rng, key):
    n = rng.choice(WORD_BOUNDS)
    t = rng.choice(["Answer in at most {n} words.", "Keep it to {n} words or fewer.",
                    "Use no more than {n} words.", "Your reply must be at most {n} words long."])
    return t.format(n=n), [{"type": "max_words", "n": n}]


def c_word_range(rng, key):
    a = rng.choice([15, 20, 25])
    b = a + rng.choice([15, 20])
    return f"Use between {a} and {b} words.", [{"type": "min_words", "n": a}, {"type": "max_words", "n": b}]


def c_min_words(rng, key):
    n = rng.choice(WORD_BOUNDS)
    t = rng.choice(["Write at least {n} words.", "Your answer should be at least {n} words long."])
    return t.format(n=n), [{"type": "min_words", "n": n}]


SENTENCES = {1: "one sentence", 2: "two sentences", 3: "three sentences", 4: "four sentences"}


def c_max_sentences(rng, key):
    n = rng.choice([1, 2, 3])
    t = rng.choice(["Answer in at most {w}.", "Use no more than {w}.", "Keep it to {w} or fewer."])
    if n == 1:
        t = rng.choice(["Answer in a single sentence.", "Reply with just one sentence."])
    return t.format(w=SENTENCES[n]), [{"type": "max_sentences", "n": n}]


def c_min_sentences(rng, key):
    n = rng.choice([2, 3, 4])
    t = rng.choice(["Write at least {w}.", "Use {w} or more.", "Your answer needs at least {w}."])
    return t.format(w=SENTENCES[n]), [{"type": "min_sentences", "n": n}]


def c_include_word(rng, key):
    w = key if rng.random() < 0.5 else rng.choice(SIMPLE_WORDS)
    t = rng.choice(["Use the word '{w}' somewhere in your answer.", "Make sure to include the word '{w}'.",
                    "Mention the word '{w}' at least once.", "Your answer must contain the word '{w}'."])
    return t.format(w=w), [{"type": "include_word", "word": w}]


def c_include_keywords(rng, key):
    # two words to work in: a gain here needs content, a short answer rarely has both
    w = rng.choice([x for x in SIMPLE_WORDS if x != key])
    t = rng.choice(["Use both words '{a}' and '{b}'.", "Mention '{a}' and also '{b}'.",
                    "Your answer must contain the words '{a}' and '{b}'."])
    return t.format(a=key, b=w), [{"type": "include_keywords", "keywords": [key, w]}]


def c_word_frequency(rng, key):
    # the mirror of exclude_word: the same very common words, wanted at least n times
    w, n = rng.choice(COMMON_WORDS), rng.choice([2, 3])
    t = rng.choice(["Use the word '{w}' at least {n} times.", "The word '{w}' must appear {n} or more times."])
    return t.format(w=w, n=n), [{"type": "word_frequency", "word": w, "n": n}]


def c_exclude_word(rng, key):
    w = rng.choice(COMMON_WORDS)
    t = rng.choice(["Do not use the word '{w}'.", "Avoid the word '{w}' completely.", "Never use the word '{w}'."])
    return t.format(w=w), [{"type": "exclude_word", "word": w}]


def c_starts_with(rng, key):
    w = rng.choice(START_WORDS)
    t = rng.choice(["Start your answer with the word '{w}'.", "Begin your reply with '{w}'.",
                    "The first word of your answer must be '{w}'."])
    return t.format(w=w), [{"type": "starts_with", "phrase": w}]


def c_ends_with(rng, key):
    p = rng.choice(END_PHRASES)
    t = rng.choice(["End your answer with the exact phrase '{p}'", "Finish with the words '{p}'",
                    "Your last words must be '{p}'"])
    return t.format(p=p), [{"type": "ends_with", "phrase": p}]


def c_question_end(rng, key):
    t = rng.choice(["End your answer with a question for the reader.", "Finish by asking the reader a question.",
                    "The last sentence must be a question."])
    return t, [{"type": "question_mark_end"}]


def c_lowercase(rng, key):
    t = rng.choice(["Write everything in lowercase letters, with no capital letters at all.",
                    "Use only lowercase letters.", "Do not use any capital letters."])
    return t, [{"type": "all_lowercase"}]


def c_no_commas(rng, key):
    t = rng.choice(["Do not use any commas.", "Avoid commas entirely.", "Write without a single comma."])
    return t, [{"type": "no_commas"}]


def c_bullets(rng, key):
    n = rng.choice([2, 3])
    t = rng.choice(["Format your answer as exactly {n} bullet points, each line starting with '- '.",
                    "Give exactly {n} bullet points (lines starting with '- ') and nothing else.",
                    "Answer with {n} bullet points that start with '- '."])
    return t.format(n=n), [{"type": "bullet_count", "n": n}]


def c_numbered(rng, key):
    n = rng.choice([2, 3, 4])
    return (f"Give exactly {n} numbered points, written as 1., 2. and so on.",
            [{"type": "numbered_list", "n": n}])


def c_include_number(rng, key):
    return "Include at least one number written in digits.", [{"type": "include_number"}]


def c_no_digits(rng, key):
    return "Do not use any digits; write numbers out as words.", [{"type": "no_digits"}]


# Each prompt gets at most one length bound, in its own slot; its side alternates so every set
# has as many "at most" as "at least" bounds (word_range is both). name -> (maker, weight, side)
LENGTH = {
    "max_words": (c_max_words, 8, "short"),
    "min_words": (c_min_words, 8, "long"),
    "max_sentences": (c_max_sentences, 4, "short"),
    "min_sentences": (c_min_sentences, 4, "long"),
    "word_range": (c_word_range, 3, "both"),
}
# The other constraints: name -> (maker, weight, is_list). Weights follow how often SmolLM2-135M
# meets each and how it leans with length (see README, "Balance"): kinds a short answer meets
# more easily (exclude_word, no_commas, ends_with, ...) are matched by kinds that need more
# said (word_frequency, include_keywords, include_number). all_uppercase, wrapped_in_quotes,
# number_of_paragraphs and max_chars exist as checks but are left out here.
CONSTRAINTS = {
    "starts_with": (c_starts_with, 12, False),
    "include_word": (c_include_word, 12, False),
    "include_keywords": (c_include_keywords, 8, False),
    "word_frequency": (c_word_frequency, 8, False),
    "exclude_word": (c_exclude_word, 5, False),
    "include_number": (c_include_number, 5, False),
    "no_commas": (c_no_commas, 4, False),
    "ends_with": (c_ends_with, 4, False),
    "question_end": (c_question_end, 2, False),
    "lowercase": (c_lowercase, 1, False),
    "no_digits": (c_no_digits, 2, False),
    "bullets": (c_bullets, 3, True),
    "numbered": (c_numbered, 3, True),
}
LISTS = [k for k, v in CONSTRAINTS.items() if v[2]]
# pairs that contradict each other (or read oddly) in one prompt
CONFLICTS = [
    *[(a, b) for a in LISTS for b in LISTS if a < b],
    *[(x, "max_sentences") for x in LISTS], *[(x, "min_sentences") for x in LISTS],
    ("include_word", "include_keywords"), ("include_word", "word_frequency"),
    ("include_keywords", "word_frequency"), ("exclude_word", "word_frequency"),
    ("ends_with", "question_end"), ("include_number", "no_digits"), ("numbered", "no_digits"),
    ("lowercase", "starts_with"), ("lowercase", "ends_with"),
]
CONFLICT_SET = {frozenset(p) for p in CONFLICTS}


def pick_constraints(rng, key, nolist, side):
    """1-3 constraints; with probability LENGTH_SHARE one of them is a length bound on `side`
    ("short": at most, "long": at least) or a word range."""
    n = rng.choices([1, 2, 3], weights=[30, 50, 20])[0]
    names = []
    if rng.random() < LENGTH_SHARE:
        pool = [k for k, v in LENGTH.items() if v[2] in (side, "both")]
        names.append(rng.choices(pool, weights=[LENGTH[k][1] for k in pool])[0])
    while len(names) < n:
        pool = [k for k in CONSTRAINTS if k not in names and not (nolist and k in LISTS)
                and all(frozenset((k, o)) not in CONFLICT_SET for o in names)]
        names.append(rng.choices(pool, weights=[CONSTRAINTS[k][1] for k in pool])[0])
    rng.shuffle(names)
    texts, checks = [], []
    for name in names:
        t, c = {**LENGTH, **CONSTRAINTS}[name][0](rng, key)
        texts.append(t)
        checks.extend(c)
    return texts, checks


def make_row(rng, topics, paragraphs, questions, side):
    # JSON replies are few: an answer cut at --max-new-tokens is never valid JSON, so length hurts them
    family = rng.choices(["topic", "question", "paragraph", "json"], weights=[60, 24, 14, 2])[0]
    if family == "json":
        t, key = rng.choice(topics)
        k1, k2 = rng.choice(JSON_KEYS)
        prompt = (f"Reply with only a JSON object with the keys \"{k1}\" and \"{k2}\" "
                  f"that describes {t}. Do not write anything outside the JSON.")
        return prompt, [{"type": "valid_json"}, {"type": "json_keys", "keys": [k1, k2]}]
    if family == "topic":
        t, key = rng.choice(topics)
        task, nolist = rng.choice(TOPIC_TASKS)
        texts, checks = pick_constraints(rng, key, nolist, side)
        return task.format(t=t) + " " + " ".join(texts), checks
    if family == "question":
        q, key = rng.choice(questions)
        task, nolist = rng.choice(QUESTION_TASKS)
        texts, checks = pick_constraints(rng, key, nolist, side)
        return task.format(q=q) + " " + " ".join(texts), checks
    para, key = rng.choice(paragraphs)
    task, nolist = rng.choice(PARAGRAPH_TASKS)
    texts, checks = pick_constraints(rng, key, nolist, side)
    return f"{task}\n\n{para}\n\n" + " ".join(texts), checks


def split(items, rng):
    items = list(items)
    rng.shuffle(items)
    k = round(len(items) * HELDOUT_FRACTION)
    return items[k:], items[:k]  # train, heldout


def build(seed=SEED):
    """Returns {"train": rows, "heldout": rows}."""
    rng = random.Random(seed)
    pools = [split(TOPICS, rng), split(PARAGRAPHS, rng), split(QUESTIONS, rng)]
    out = {}
    for s, (name, n) in enumerate([("train", N_TRAIN), ("heldout", N_HELDOUT)]):
        topics, paragraphs, questions = (p[s] for p in pools)
        rows, seen = [], set()
        bounds = {"short": 0, "long": 0}  # upper and lower length bounds so far in this set
        while len(rows) < n:
            side = min(bounds, key=lambda k: (bounds[k], rng.random()))  # the side behind, ties at random
            prompt, checks = make_row(rng, topics, paragraphs, questions, side)
            if prompt in seen or len(checks) > 3:  # word_range is one sentence but two checks
                continue
            seen.add(prompt)
            bounds["short"] += sum(c["type"] in UPPER_BOUNDS for c in checks)
            bounds["long"] += sum(c["type"] in LOWER_BOUNDS for c in checks)
            rows.append({"id": f"{name}-{len(rows):04d}", "prompt": prompt, "checks": checks})
        out[name] = rows
    return out


def main():
    here = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "prompts")
    for name, rows in build().items():
        with open(os.path.join(here, f"{name}.jsonl"), "w") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        print(f"wrote {len(rows)} rows to prompts/{name}.jsonl")


if __name__ == "__main__":
    main()
