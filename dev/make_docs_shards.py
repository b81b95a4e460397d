"""
Builds a small real-text stand-in for ClimbMix from the Python 3.11 documentation sources (English
reStructuredText, Debian package python3.11-doc), laid out like the Hugging Face hub, for CPU demo runs.

Usage:
    python dev/make_docs_shards.py HUB_ROOT [--sources DIR] [--docs-per-shard 1000] [--val-every 4]
    python -m http.server 8765 --bind 127.0.0.1 --directory HUB_ROOT &
    HF_ENDPOINT=http://127.0.0.1:8765 AUTORESEARCH_CACHE_DIR=/tmp/autoresearch-docs-cache \
        uv run prepare.py --num-shards N          # N = the number of training shards this script printed

Every *.rst.txt file (in sorted path order) is split into documents at its section headings (three
levels); a section longer than 4,000 characters is cut at paragraph breaks into pieces of about 2,000
characters, and pieces under 1,000 characters are merged into the document before them. Every
`--val-every`-th source file (0, 4, 8, ...) is held out whole: its documents go to the validation shard
shard_06542.parquet (over 1,000 documents, so the dataloader's 1,000-document buffer holds no repeats);
the other files' documents go, in order, to shard_00000.parquet, shard_00001.parquet, ... with
`--docs-per-shard` documents each (one row group per shard), column `text`. Deterministic: the same
sources give the same bytes. Written to HUB_ROOT/datasets/karpathy/climbmix-400b-shuffle/resolve/main/.
"""

import argparse
import re
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

HUB_PATH = "datasets/karpathy/climbmix-400b-shuffle/resolve/main"
VAL_SHARD = 6542
SOURCES = "/usr/share/doc/python3.11/html/_sources"
MIN_CHARS = 1000      # shorter pieces are merged into the document before them
MAX_CHARS = 4000      # longer sections are cut at paragraph breaks into pieces of about CHUNK_CHARS
CHUNK_CHARS = 2000
UNDERLINE = re.compile(r"""^([=\-~*^"#+`'.:_])\1{2,}\s*$""")


def headings(lines):
    """(line index where the heading starts, underline character) for each RST section heading."""
    found = []
    i = 0
    while i + 1 < len(lines):
        title, under = lines[i], lines[i + 1]
        m = UNDERLINE.match(under)
        if title.strip() and not UNDERLINE.match(title) and m and len(under.rstrip()) >= len(title.rstrip()) \
                and not title.startswith(" "):
            over = i > 0 and lines[i - 1].rstrip() == under.rstrip()  # overlined title: a different level
            found.append((i - 1 if over else i, ("o" if over else "") + m.group(1)))
            i += 2
            continue
        i += 1
    return found


def chunk(piece):
    """A long section cut at blank lines into pieces of at least CHUNK_CHARS characters (the last may be shorter)."""
    if len(piece) <= MAX_CHARS:
        return [piece]
    out, cur = [], []
    for para in re.split(r"\n\s*\n", piece):
        cur.append(para)
        if sum(len(p) + 2 for p in cur) >= CHUNK_CHARS:
            out.append("\n\n".join(cur))
            cur = []
    if cur:
        out.append("\n\n".join(cur))
    return out


def split_file(text):
    """The file cut at its section headings (three levels), long sections cut at paragraph breaks."""
    lines = text.splitlines()
    hs = headings(lines)
    levels = []
    for _, style in hs:
        if style not in levels:
            levels.append(style)
    cuts = sorted({start for start, style in hs if levels.index(style) <= 2} | {0})
    pieces = ["\n".join(lines[a:b]).strip() for a, b in zip(cuts, cuts[1:] + [len(lines)])]
    docs = []
    for p in (c for piece in pieces for c in chunk(piece)):
        if not p:
            continue
        if docs and len(p) < MIN_CHARS:
            docs[-1] += "\n\n" + p
        else:
            docs.append(p)
    if len(docs) > 1 and len(docs[0]) < MIN_CHARS:  # a short title/preamble goes with the first section
        docs[1] = docs[0] + "\n\n" + docs[1]
        docs.pop(0)
    return docs


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("hub_root")
    parser.add_argument("--sources", default=SOURCES)
    parser.add_argument("--docs-per-shard", type=int, default=1000)
    parser.add_argument("--val-every", type=int, default=4, help="every N-th source file is held out for val")
    args = parser.parse_args(argv)

    files = sorted(Path(args.sources).rglob("*.rst.txt"))
    if not files:
        sys.exit(f"error: no *.rst.txt files under {args.sources} (apt-get install python3.11-doc)")
    per_file = [split_file(f.read_text(encoding="utf-8", errors="replace")) for f in files]
    docs = [d for ds in per_file for d in ds]
    val = [d for i, ds in enumerate(per_file) if i % args.val_every == 0 for d in ds]
    train = [d for i, ds in enumerate(per_file) if i % args.val_every != 0 for d in ds]

    out = Path(args.hub_root) / HUB_PATH
    out.mkdir(parents=True, exist_ok=True)
    shards = [train[i:i + args.docs_per_shard] for i in range(0, len(train), args.docs_per_shard)]
    for k, shard in enumerate(shards):
        pq.write_table(pa.table({"text": shard}), out / f"shard_{k:05d}.parquet", row_group_size=1000)
    pq.write_table(pa.table({"text": val}), out / f"shard_{VAL_SHARD:05d}.parquet", row_group_size=1000)

    chars = lambda ds: sum(len(d) for d in ds)
    print(f"{len(files)} files -> {len(docs)} documents ({chars(docs):,} characters)")
    print(f"train: {len(train)} documents, {chars(train):,} characters, {len(shards)} shards "
          f"(shard_00000 .. shard_{len(shards) - 1:05d})")
    print(f"val:   {len(val)} documents, {chars(val):,} characters (shard_{VAL_SHARD:05d})")
    print(f"written to {out}; prepare with --num-shards {len(shards)}")


if __name__ == "__main__":
    main()
