"""
Builds a stand-in for TinyStories (karpathy/tinystories-gpt4-clean), for CPU nights on a machine that cannot reach
the Hugging Face hub: one parquet file, tinystories_gpt4_clean.parquet, with the real file's shape (short stories for
small children in a `text` column, one story a row, pre-shuffled), laid out like the hub so that prepare.py fetches it
as it fetches the real one.

Usage:
    python dev/make_tinystories_standin.py HUB_ROOT [--stories 250000] [--seed 0]
    python -m http.server 8765 --bind 127.0.0.1 --directory HUB_ROOT &
    HF_ENDPOINT=http://127.0.0.1:8765 AUTORESEARCH_CACHE_DIR=/tmp/autoresearch-ts-cache \
        uv run prepare.py --dataset tinystories

It is a stand-in, not the real data. The stories come from a small probabilistic grammar (a child with a name, a
friend, a place, an object and a feeling, and one of a few plots: something lost and found, a new friend, sharing, a
fear overcome, bad weather, a helping hand), so they repeat their words and sentence shapes far more than GPT-4's
stories do: about 330 distinct words, plus 8,000 made-up names (drawn Zipf-like, 30% of the names; without that long
tail the 4,096-token tokenizer finds only 874 tokens to learn and prepare.py stops), 50 to 100 words a story (72 on
average; the real file's average is about 170, from a much larger vocabulary). Its val_bpb is therefore much lower
than the real file's would be, and only comparable with runs on this same file. The name, pronoun and object of a
story are chosen once and reused in it, so a model gains from looking back over the story. Every story is drawn
independently, in file order, from one seeded generator: the same --seed gives the same bytes; rows 0-19,999 (held
out and validation in prepare.py's split) are as random as the rest.

250,000 stories (about 90 MB of text, 20 M tokens) are far more than a CPU night reads: a 60-second run on 2 cores
trains on under 1 M tokens, so no run sees a story twice; prepare.py's tokenizer learns from all 230,000 training rows.
"""

import argparse
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

HUB_PATH = "datasets/karpathy/tinystories-gpt4-clean/resolve/main"
FILENAME = "tinystories_gpt4_clean.parquet"

GIRLS = "Lily Mia Sue Anna Lucy Emma Zoe Ella Amy Sara Kim Rose Molly Daisy Jane Ruby".split()
BOYS = "Tim Ben Max Sam Tom Jack Leo Finn Jake Bob Joe Timmy Billy Dan Ned Toby".split()
ANIMALS = [("cat", "she"), ("dog", "he"), ("bunny", "she"), ("bird", "he"), ("frog", "he"), ("duck", "she"),
           ("bear", "he"), ("mouse", "she"), ("fox", "he"), ("puppy", "he"), ("kitten", "she")]
PLACES = ["the park", "the garden", "the forest", "the beach", "the farm", "the pond", "the hill", "the yard",
          "the little town", "the big field", "the zoo", "the market", "the school", "the lake"]
OBJECTS = ["ball", "kite", "toy car", "red hat", "doll", "blue box", "teddy bear", "shiny stone", "book", "cup",
           "drum", "boat", "sock", "balloon", "truck", "spoon", "star", "crayon", "flower", "shell"]
ADJECTIVES = ["big", "small", "happy", "kind", "brave", "shy", "silly", "little", "funny", "gentle", "curious"]
GOOD = ["happy", "glad", "proud", "excited", "calm", "thankful"]
BAD = ["sad", "scared", "angry", "worried", "upset", "lonely"]
FOODS = ["cake", "apples", "cookies", "soup", "bread", "candy", "pie", "milk"]
WEATHER = [("rain", "it started to rain"), ("wind", "a strong wind came"), ("storm", "a big storm came"),
           ("snow", "it began to snow")]
HELPERS = ["mom", "dad", "grandma", "grandpa", "the teacher", "a kind old man", "a wise owl", "big sister"]


SYLLABLES = ("ba be bi bo bu da de di do du fa fe fi fo ga go ka ke ki ko la le li lo lu ma me mi mo mu na ne ni no "
             "pa pe pi po ra re ri ro ru sa se si so ta te ti to va vi wa wi ya yo za zi").split()
ENDINGS = ["", "", "", "n", "l", "m", "r", "s", "x", "th", "ck", "lly", "nna", "bby"]
RARE = []  # the made-up names, drawn by main() from the seeded generator


def rare_names(rng, n=8000):
    """n made-up names, 2 or 3 syllables: the long tail of names that a model can only copy from earlier in the
    story (GPT-4's stories use thousands of names; with 32 here the tokenizer would find too little to learn)."""
    names = set()
    while len(names) < n:
        names.add("".join(pick(rng, SYLLABLES) for _ in range(2 + (rng.random() < 0.3))).capitalize()
                  + pick(rng, ENDINGS))
    names = sorted(names)  # then in a random order: which ones are common is drawn too
    rng.shuffle(names)
    return names


def pick(rng, items):
    return items[rng.randrange(len(items))]


def pick_name(rng, common):
    """A common name, or one of the made-up names (the first ones far more often: Zipf-like)."""
    if rng.random() < 0.7:
        return pick(rng, common)
    return RARE[min(int(rng.paretovariate(0.5)) - 1, len(RARE) - 1)]


def hero(rng):
    """(name, he/she, his/her, noun phrase for the first line)."""
    if rng.random() < 0.75:
        girl = rng.random() < 0.5
        name = pick_name(rng, GIRLS if girl else BOYS)
        kind = "girl" if girl else "boy"
        return name, "she" if girl else "he", "her" if girl else "his", f"a {pick(rng, ADJECTIVES)} {kind}"
    animal, pronoun = pick(rng, ANIMALS)
    name = pick_name(rng, GIRLS if pronoun == "she" else BOYS)
    return name, pronoun, "her" if pronoun == "she" else "his", f"a {pick(rng, ADJECTIVES)} {animal}"


def opening(rng, name, thing, place):
    return pick(rng, [
        f"Once upon a time, there was {thing} named {name}.",
        f"Once upon a time, in {place}, there lived {thing} named {name}.",
        f"One day, {thing} named {name} went to {place}.",
        f"There was once {thing} called {name}.",
    ])


def story(rng):
    name, he, his, thing = hero(rng)
    He = he.capitalize()
    place, obj, food = pick(rng, PLACES), pick(rng, OBJECTS), pick(rng, FOODS)
    friend, f_he, f_his, f_thing = hero(rng)
    while friend == name:
        friend, f_he, f_his, f_thing = hero(rng)
    good, bad, helper = pick(rng, GOOD), pick(rng, BAD), pick(rng, HELPERS)
    s = [opening(rng, name, thing, place)]
    if rng.random() < 0.7:
        s.append(pick(rng, [f"{He} loved to play with {his} {obj}.", f"{name} had a {obj} that {he} loved very much.",
                            f"Every day, {name} liked to play in {place}.", f"{He} liked to eat {food}."]))
    plot = rng.randrange(6)
    if plot == 0:  # lost and found
        s += [f"One day, {name} could not find {his} {obj}.", f"{He} looked everywhere, but it was gone.",
              f"{name} felt very {bad}."]
        if rng.random() < 0.6:
            s.append(f"{He} asked {helper} for help.")
            s.append(f"\"Let us look in {place},\" said {helper}.")
        spot = pick(rng, ["tree", "bed", "rock", "chair", "bush"])
        s += ["They looked and looked.", f"At last, {name} saw the {obj} under a {spot}.",
              f"{name} was so {good}!", f"{He} hugged {his} {obj} and smiled."]
    elif plot == 1:  # a new friend
        s += [f"One day, {name} met {f_thing} named {friend}.", f"{friend} was {pick(rng, ['new', 'alone', 'shy'])}.",
              f"\"Do you want to play with me?\" asked {name}.", f"{friend} said, \"Yes, please!\"",
              f"They played with the {obj} all day in {place}."]
        if rng.random() < 0.5:
            s.append(f"They shared some {food} and laughed.")
        s.append(f"From that day on, {name} and {friend} were best friends.")
    elif plot == 2:  # sharing
        s += [f"One day, {friend} wanted to play with {name}'s {obj}.", f"\"No, it is mine!\" said {name}.",
              f"{friend} felt {bad} and went away.", f"{name} played alone, but it was not fun.",
              f"{He} thought about {friend}.",
              f"Then {name} ran to {friend} and said, \"I am sorry. Let us play together.\"",
              f"{friend} smiled, and they played with the {obj} together.", f"{name} learned that sharing is fun."]
    elif plot == 3:  # a fear overcome
        fear = pick(rng, ["the dark", "the big dog", "the tall slide", "the water", "the loud thunder"])
        s += [f"{name} was {pick(rng, ['scared', 'afraid'])} of {fear}.", f"{He} did not want to go near it.",
              f"{helper.capitalize()} said, \"Be brave, {name}. I am here with you.\"",
              f"{name} took a deep breath.", f"{He} was brave and tried.", "It was not so bad after all!",
              f"{name} felt {good} and was not {bad} anymore."]
    elif plot == 4:  # bad weather
        weather, came = pick(rng, WEATHER)
        s += [f"One day, {name} and {friend} were playing in {place}.", f"Then {came}.",
              f"They were {bad} and wanted to go home.", f"{name} had an idea.",
              f"\"Let us hide under the {pick(rng, ['big tree', 'bridge', 'red roof', 'old boat'])}!\" said {name}.",
              f"They waited until the {weather} stopped.", f"When the sun came out, they went home, {good} and safe."]
    else:  # a helping hand
        s += [f"One day, {name} saw {f_thing} named {friend} in {place}.", f"{friend} was {bad}.",
              f"{f_his.capitalize()} {obj} was stuck up in a tree.", f"\"I will help you,\" said {name}.",
              f"{name} {pick(rng, ['climbed the tree', 'got a long stick', 'asked ' + helper + ' for help'])}.",
              f"Soon, the {obj} was back with {friend}.", f"\"Thank you, {name}!\" said {friend}.",
              f"{name} felt {good} to help a friend."]
    if rng.random() < 0.4:
        s.append(pick(rng, ["The end.", f"That night, {name} slept well and dreamed of {place}.",
                            f"Later, {helper} gave {him(he)} some {food}.",
                            "It was a good day."]))
    return " ".join(s)


def him(he):
    return "her" if he == "she" else "him"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("hub_root", type=Path)
    parser.add_argument("--stories", type=int, default=250_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    RARE[:] = rare_names(rng)
    out = args.hub_root / HUB_PATH / FILENAME
    out.parent.mkdir(parents=True, exist_ok=True)
    schema = pa.schema([("text", pa.string())])
    with pq.ParquetWriter(out, schema) as writer:
        for start in range(0, args.stories, 10_000):  # 10,000 rows to a row group
            texts = [story(rng) for _ in range(min(10_000, args.stories - start))]
            writer.write_table(pa.table({"text": texts}, schema=schema))
    print(f"{out}: {args.stories:,} stories, {out.stat().st_size / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
