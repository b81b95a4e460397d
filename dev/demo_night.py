"""
A night of the loop on this machine, played by a script instead of a coding agent: program.md's commands as written
(with this interpreter for `uv run`, as tests/test_loop.py plays them), a fixed list of 22 ideas in place of the agent's,
every verdict followed, then the morning's confirmation. The run behind docs/judging.md's real run and progress.png.

Usage:
    uv run python dev/demo_night.py --cache /tmp/autoresearch-docs-cache --budget 60 --eval-tokens 65536 --out /tmp/night
    uv run analysis.py --tsv /tmp/night/repo/results.tsv --plot progress.png

--budget and --eval-tokens set AUTORESEARCH_TIME_BUDGET and AUTORESEARCH_EVAL_TOKENS for every run (shorter than
train.py's, the same for all runs, and recorded in results.tsv's time_budget and eval_tokens columns). The cache is a prepared one (dev/make_docs_shards.py, then prepare.py).
Run it on an otherwise idle machine: under a fixed budget a busy machine takes fewer steps.
"""

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers import ROOT, Agent, block, copy_tracked_files, uv_block  # noqa: E402


def constant(name, value):
    """An edit: the module constant `name` (at the top level of train.py) set to `value`."""
    return lambda src: re.subn(rf"^({name} = )[^\s#]+(?: [^\s#]+)?", rf"\g<1>{value}", src, count=1, flags=re.M)


def small(field, value):
    """An edit of the small-machine block: DEPTH, ASPECT_RATIO, HEAD_DIM or DEVICE_BATCH_SIZE, TOTAL_BATCH_SIZE."""
    def apply(src):
        m = re.search(r"^    DEPTH, ASPECT_RATIO, HEAD_DIM = (\d+), (\d+), (\d+)", src, re.M)
        d = dict(zip(("DEPTH", "ASPECT_RATIO", "HEAD_DIM"), m.groups()))
        if field in d:
            d[field] = str(value)
            return re.subn(r"^    DEPTH, ASPECT_RATIO, HEAD_DIM = \d+, \d+, \d+", "    DEPTH, ASPECT_RATIO, HEAD_DIM = "
                           + ", ".join(d.values()), src, count=1, flags=re.M)
        return re.subn(r"^    TOTAL_BATCH_SIZE, DEVICE_BATCH_SIZE = [^\n]+", f"    TOTAL_BATCH_SIZE, DEVICE_BATCH_SIZE = "
                       f"{value}", src, count=1, flags=re.M)
    return apply


def replace(old, new):
    return lambda src: (src.replace(old, new, 1), src.count(old))


IDEAS = [  # (description, edit): what a careful agent might try first on the small CPU model
    ("MATRIX_LR 0.04 -> 0.08", constant("MATRIX_LR", "0.08")),
    ("EMBEDDING_LR 0.6 -> 1.2", constant("EMBEDDING_LR", "1.2")),
    ("UNEMBEDDING_LR 0.004 -> 0.008", constant("UNEMBEDDING_LR", "0.008")),
    ("WARMDOWN_RATIO 0.5 -> 0.3", constant("WARMDOWN_RATIO", "0.3")),
    ("halve the batch: 4096 tokens per step, 2 sequences", small("TOTAL_BATCH_SIZE", "2**12, 2")),
    ("WINDOW_PATTERN SSSL -> L (full context everywhere)", constant("WINDOW_PATTERN", '"L"')),
    ("ADAM_BETAS (0.8, 0.95) -> (0.9, 0.95)", constant("ADAM_BETAS", "(0.9, 0.95)")),
    ("WEIGHT_DECAY 0.2 -> 0.0", constant("WEIGHT_DECAY", "0.0")),
    ("SCALAR_LR 0.5 -> 1.0", constant("SCALAR_LR", "1.0")),
    ("FINAL_LR_FRAC 0.0 -> 0.1", constant("FINAL_LR_FRAC", "0.1")),
    ("depth 2 -> 3 on small machines", small("DEPTH", 3)),
    ("MLP ReLU^2 -> GELU", replace("F.relu(self.c_fc(x)).square()", "F.gelu(self.c_fc(x))")),
    ("logit soft cap 15 -> 30", replace("logits = 15 * torch.tanh(logits / 15)", "logits = 30 * torch.tanh(logits / 30)")),
    ("HEAD_DIM 64 -> 32 on small machines (4 heads)", small("HEAD_DIM", 32)),
    ("MATRIX_LR -> 0.02", constant("MATRIX_LR", "0.02")),
    ("EMBEDDING_LR -> 0.3", constant("EMBEDDING_LR", "0.3")),
    ("WARMUP_RATIO 0.0 -> 0.05", constant("WARMUP_RATIO", "0.05")),
    ("Muon Newton-Schulz steps 5 -> 3", replace("momentum=0.95, ns_steps=5", "momentum=0.95, ns_steps=3")),
    ("x0_lambdas start at 0.0 instead of 0.1", replace("self.x0_lambdas.fill_(0.1)", "self.x0_lambdas.fill_(0.0)")),
    ("width 128 -> 192 on small machines (ASPECT_RATIO 96)", small("ASPECT_RATIO", 96)),
    ("WARMDOWN_RATIO -> 0.7", constant("WARMDOWN_RATIO", "0.7")),
    ("UNEMBEDDING_LR -> 0.002", constant("UNEMBEDDING_LR", "0.002")),
]


class Night(Agent):
    """The tests' agent (program.md's blocks, each verdict followed), saying every result as it comes."""

    def __init__(self, repo, env, log):
        super().__init__(repo, env)
        self.log = log

    def say(self, text):
        line = f"{time.strftime('%H:%M:%S')} {text}"
        print(line, flush=True)
        self.log.write(line + "\n")
        self.log.flush()

    def run_and_record(self, description, seed=None):
        result = super().run_and_record(description, seed)
        self.say(f"  [{result['grep'].strip().replace(chr(10), ' ') or 'crash'}] {result['verdict']}")
        return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--cache", required=True, help="a prepared cache (AUTORESEARCH_CACHE_DIR)")
    parser.add_argument("--budget", default="60", help="AUTORESEARCH_TIME_BUDGET for every run, seconds")
    parser.add_argument("--eval-tokens", help="AUTORESEARCH_EVAL_TOKENS for every run (default: train.py's)")
    parser.add_argument("--out", required=True, help="a new directory: the repository copy and the log go there")
    parser.add_argument("--tag", default="demo1")
    args = parser.parse_args()
    out = Path(args.out)
    repo = out / "repo"
    repo.mkdir(parents=True)
    copy_tracked_files(repo)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AUTORESEARCH_", "GIT_"))}
    env.update(AUTORESEARCH_CACHE_DIR=args.cache, AUTORESEARCH_TIME_BUDGET=args.budget, CUDA_VISIBLE_DEVICES="",
               GIT_CONFIG_NOSYSTEM="1", GIT_CONFIG_GLOBAL=os.devnull)
    if args.eval_tokens:
        env["AUTORESEARCH_EVAL_TOKENS"] = args.eval_tokens
    head = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short=7", "HEAD"], capture_output=True, text=True).stdout
    for cmd in (["init", "-b", "main"], ["config", "user.name", "demo night"], ["config", "user.email",
                "demo@example.invalid"], ["add", "-A"], ["commit", "-m", f"autoresearch at {head.strip()}"]):
        subprocess.run(["git", *cmd], cwd=repo, env=env, check=True, capture_output=True)
    with open(out / "night.log", "w") as log:
        night = Night(repo, env, log)
        night.sh(block("git checkout -b"), tag=args.tag)
        night.sh(block("printf 'commit"))
        night.say(f"baseline (budget {args.budget} s, cache {args.cache})")
        night.say(f"  => {night.experiment('baseline')[-1]['verdict']}")
        for description, apply in IDEAS:
            src, n = apply((repo / "train.py").read_text())
            if not n:
                night.say(f"skipped (the edit no longer applies): {description}")
                continue
            (repo / "train.py").write_text(src)
            night.sh(block("git commit -m"), description=description)
            night.say(description)
            verdict = night.experiment(description)[-1]["verdict"]
            if verdict.startswith(("discard", "crash")):
                night.reset()
            elif not verdict.startswith("keep"):
                night.say(f"stopped: {verdict}")
                return 1
        night.say("confirmation")
        said = night.confirm()
        for line in said[:-1]:
            night.say(f"  {line}")
        night.say(f"  => {said[-1]}")
        night.sh(block("git checkout autoresearch/<tag>"), tag=args.tag)
        night.say(night.sh(uv_block("uv run analysis.py\n")).stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
