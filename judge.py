"""
The keep/discard rule, written once. analysis.py judges every run of a night with it (a night is an array of one);
dev/benchmark_decisions.py simulates thousands of nights through the same functions at once (every array has the
nights as its first axis). docs/judging.md has the statistics and the benchmark behind the constants.

- The baseline runs under BASELINE_SEEDS. sigma, the seed-to-seed spread of one run, is pooled over every commit that
  ran under two or more seeds, with its degrees of freedom; the noise floor is sqrt(2) * sigma, how far changing only
  the seed moves val_bpb between two runs. Each bar is a normal quantile turned into the Student-t quantile of the
  same tail probability at the dof measured so far.
- The best (the commit the branch is at after the last keep) is compared by its estimated true value, not by the
  mean of its own runs (a commit kept on a lucky run would carry that luck): a normal (mu, v) carried through the
  night (step), in which a kept commit is its parent minus the effect its runs suggest and a discarded commit's runs
  inform its parent, under a prior over effects learned through the night.
- A candidate's z = (mu - its mean) / sqrt(sigma^2 / n + v); or seed for seed, when it and the best start from the
  baseline's initial weights, once that run spread has PAIRED_MIN_DOF and gives the tighter test.
- One run: z >= KEEP_ONE keeps (once sigma has ONE_RUN_KEEP_DOF dof), z <= DISCARD_ONE discards, anything between
  is rerun under SEEDS[1]. Two runs: z >= KEEP_TWO keeps, anything less discards.
"""

from dataclasses import dataclass, field, replace

import numpy as np
from scipy.special import ndtr, stdtrit  # the normal cdf and Student's t quantile; scipy.stats imports slower

BASELINE_SEEDS = (42, 43, 44, 45)  # the baseline runs under each before any idea is judged (3 dof of noise)
SEEDS = (42, 43)                   # a candidate's first run, and its one rerun when the verdict asks for it
# The bars, as normal quantiles, and the prior over effects. Tuned for true progress per run with
# dev/benchmark_decisions.py --seed 1; its default draws (--seed 0) report them.
KEEP_ONE = 1.8          # z that keeps after one run
DISCARD_ONE = 1.3       # z at or below which one run discards
KEEP_TWO = 1.6          # z that keeps after two runs
ONE_RUN_KEEP_DOF = 5    # dof of sigma before anything is kept on one run: the baseline's 3 and two reruns
PAIRED_MIN_DOF = 2      # dof of the seed-for-seed run spread before a comparison may use it
EFFECTS = np.arange(-40, 41) / 2  # the effects the prior lives on: -20 to +20 sigma, by 0.5
PRIOR_ZERO = 0.3        # the share of ideas the prior expects to do nothing, before the night teaches it
PRIOR_WIDTH = 3.0       # the width, in sigma, of the normal the other ideas' effects are drawn from...
PRIOR_FLAT = 0.6        # ...mixed with this share of a flat prior over EFFECTS, for the rare large effect
PRIOR_WEIGHT = 10       # the default prior counts as this many experiments; the night's own take over from it
WIDE, WIDE_SHARE = 1e4, 1e-3  # and a normal of sd WIDE sigma with this share, for effects far past EFFECTS (a run
                              # that diverged): they are explained by their effect and move no estimate

_normal = np.exp(-0.5 * (EFFECTS / PRIOR_WIDTH) ** 2)
DEFAULT_PRIOR = np.append((1 - WIDE_SHARE) * (PRIOR_ZERO * (EFFECTS == 0) + (1 - PRIOR_ZERO) * (
    (1 - PRIOR_FLAT) * _normal / _normal.sum() + PRIOR_FLAT / len(EFFECTS))), WIDE_SHARE)  # the last: the wide one


def bar(z, dof):
    """The normal quantile `z` as a t quantile at `dof`: the same tail probability, the noise treated as measured."""
    return stdtrit(np.maximum(dof, 1), ndtr(z))


def t_interval(p, dof):
    """The two-sided `p` interval's half width in standard errors at `dof`."""
    return stdtrit(np.maximum(dof, 1), 0.5 + p / 2)


@dataclass
class Runs:
    """A commit's runs, per night: their mean y and count n, the sum of squares around the mean, the runs under
    SEEDS (NaN where it has none) and whether it started from the baseline's initial weights."""
    y: np.ndarray
    n: np.ndarray
    ss: np.ndarray
    pair: np.ndarray
    same_init: np.ndarray

    @classmethod
    def of(cls, values, same_init=False):
        """One night's Runs from {seed: val_bpb}."""
        v = np.array(list(values.values()), float)
        return cls(np.array([v.mean()]), np.array([len(v)]), np.array([((v - v.mean()) ** 2).sum()]),
                   np.array([[values.get(s, np.nan) for s in SEEDS]]), np.array([same_init]))


@dataclass
class Night:
    """The judge's state before the next commit, per night: the best's estimated value (mu, v); sigma's sum of
    squares and dof; the prior over EFFECTS and what the night has seen; and, while every kept commit starts from
    the baseline's initial weights (on), the best's value under SEEDS (m, c) and the sums of the seed-for-seed
    differences (seed 42 minus 43) of the commits that ran under both."""
    mu: np.ndarray
    v: np.ndarray
    ss: np.ndarray
    dof: np.ndarray
    prior: np.ndarray
    seen: np.ndarray
    experiments: int
    on: np.ndarray
    m: np.ndarray
    c: np.ndarray
    d: np.ndarray  # (nights, 3): count, sum and sum of squares of the seed-for-seed differences

    @property
    def sigma(self):
        return np.sqrt(self.ss / self.dof)

    @property
    def floor(self):
        return np.sqrt(2) * self.sigma

    @property
    def tau2(self):
        """One run's spread around its seed's value, squared: the seed-for-seed differences' variance / 2 (the
        initial weights' part cancels in them); sigma^2 until measured; never below a millionth of sigma^2 (edits that
        change nothing, on a deterministic CPU, would leave c singular)."""
        n, s, sq = self.d.T
        s2 = self.ss / self.dof
        var = np.where(n >= 2, (sq - s * s / np.maximum(n, 1)) / np.maximum(n - 1, 1) / 2, s2)
        return np.maximum(var, 1e-6 * s2)

    @property
    def paired_dof(self):
        return self.d[:, 0] - 1


def start(runs, pair):
    """The night after its baseline: runs (nights, k) its val_bpb under k >= 2 seeds; pair (nights, 2) its runs under
    SEEDS, NaN where it has none (then nothing is compared seed for seed)."""
    nights, k = runs.shape
    mean = runs.mean(1)
    ss = ((runs - mean[:, None]) ** 2).sum(1)
    on = ~np.isnan(pair).any(1)
    diff = np.where(on, pair[:, 0] - pair[:, 1], 0.0)
    return Night(mu=mean, v=ss / (k - 1) / k, ss=ss, dof=np.full(nights, k - 1.0),
                 prior=np.tile(DEFAULT_PRIOR, (nights, 1)), seen=np.zeros((nights, len(DEFAULT_PRIOR))), experiments=0,
                 on=on, m=np.where(on[:, None], pair, 0.0), c=np.eye(2) * (ss / (k - 1))[:, None, None],
                 d=np.stack([on * 1.0, diff, diff ** 2], 1))


@dataclass
class Comparison:
    """A candidate against the best, per night: diff (> 0: the candidate is better), its standard error, the dof of
    that error, z, whether it was seed for seed, and the best's value it was compared with (and its sd)."""
    diff: np.ndarray
    se: np.ndarray
    dof: np.ndarray
    z: np.ndarray
    paired: np.ndarray
    shown: np.ndarray
    shown_sd: np.ndarray


def _paired_terms(night, runs):
    """The best's value under the seeds the candidate ran (of SEEDS) and its variance; the mask of those seeds."""
    mask = ~np.isnan(runs.pair)
    k = np.maximum(mask.sum(1), 1)
    shown = (np.where(mask, night.m, 0.0)).sum(1) / k
    var = np.einsum("ni,nij,nj->n", mask * 1.0, night.c, mask * 1.0) / k ** 2
    return shown, var, mask


def compare(night, runs):
    """The candidate's runs against the best: unpaired, or seed for seed where it starts from the baseline's initial
    weights, ran under SEEDS only, the run spread has PAIRED_MIN_DOF and that gives the smaller 95% bar."""
    se = np.sqrt(night.ss / night.dof / runs.n + night.v)
    shown, var, mask = _paired_terms(night, runs)
    se_p = np.sqrt(var + night.tau2 / runs.n)
    p_dof = night.paired_dof
    paired = (runs.same_init & night.on & (p_dof >= PAIRED_MIN_DOF) & (mask.sum(1) == runs.n)
              & (se_p * t_interval(0.9, p_dof) < se * t_interval(0.9, night.dof)))
    diff = np.where(paired, shown, night.mu) - runs.y
    se = np.where(paired, se_p, se)
    return Comparison(diff=diff, se=se, dof=np.where(paired, p_dof, night.dof), z=diff / se, paired=paired,
                      shown=np.where(paired, shown, night.mu), shown_sd=np.sqrt(np.where(paired, var, night.v)))


def decide(night, runs, cmp):
    """keep, discard or rerun, per night: one run keeps at z >= KEEP_ONE (once sigma has ONE_RUN_KEEP_DOF dof),
    discards at z <= DISCARD_ONE and is rerun in between; two runs or more keep at z >= KEEP_TWO."""
    one = runs.n == 1
    keep_one = (cmp.z >= bar(KEEP_ONE, cmp.dof)) & (night.dof >= ONE_RUN_KEEP_DOF)
    one_run = np.where(keep_one, "keep", np.where(cmp.z <= bar(DISCARD_ONE, cmp.dof), "discard", "rerun"))
    return np.where(one, one_run, np.where(cmp.z >= bar(KEEP_TWO, cmp.dof), "keep", "discard"))


def _posterior(prior, log_lik):
    w = prior * np.exp(log_lik - log_lik.max(1, keepdims=True))
    return w / w.sum(1, keepdims=True)


def step(night, runs, kept):
    """The night after a commit's runs: if kept, the best is now that commit, its value its parent's minus the effect
    g the runs suggest; if not, the runs (the parent plus g) sharpen the parent's value. Both over the posterior of
    g (on EFFECTS, and the wide normal), moment-matched back to a normal. The seed-for-seed estimate takes the same
    step as a Kalman update per g; a kept commit from other initial weights ends it."""
    s2, k = night.ss / night.dof, kept[:, None]
    g = EFFECTS[None, :] * np.sqrt(s2)[:, None]
    t, w2 = s2 / runs.n + night.v, WIDE ** 2 * s2  # the variance of (mu - y) given g; of the wide g
    d = night.mu - runs.y
    w = _posterior(night.prior, np.column_stack([-0.5 * (d[:, None] - g) ** 2 / t[:, None],
                                                 -0.5 * d ** 2 / (t + w2) - 0.5 * np.log1p(w2 / t)]))
    precision = 1 / night.v + runs.n / s2
    a, b = (night.mu / night.v + runs.y * runs.n / s2) / precision, runs.n / s2 / precision  # parent = a + b g
    g_wide, var_wide = w2 / (w2 + t) * d, w2 * t / (w2 + t)  # the wide g's posterior
    new = a[:, None] + (b[:, None] - k) * np.column_stack([g, g_wide])
    mu = (w * new).sum(1)
    v = 1 / precision + (w * (new - mu[:, None]) ** 2).sum(1) + w[:, -1] * (b - kept) ** 2 * var_wide

    mask = ~np.isnan(runs.pair)
    follow = night.on & runs.same_init & mask.any(1)
    m, c = _paired_step(night, runs, g, kept, mask)
    both = follow & mask.all(1)
    diff = np.where(both, runs.pair[:, 0] - runs.pair[:, 1], 0.0)
    seen = night.seen + w
    experiments = night.experiments + 1
    two = runs.n >= 2
    return replace(night, mu=mu, v=v, ss=night.ss + np.where(two, runs.ss, 0),
                   dof=night.dof + np.where(two, runs.n - 1, 0), seen=seen, experiments=experiments,
                   prior=(PRIOR_WEIGHT * DEFAULT_PRIOR + seen) / (PRIOR_WEIGHT + experiments),
                   on=night.on & (runs.same_init | ~kept), m=np.where(follow[:, None], m, night.m),
                   c=np.where(follow[:, None, None], c, night.c),
                   d=night.d + both[:, None] * np.stack([np.ones_like(diff), diff, diff ** 2], 1))


def _paired_step(night, runs, g, kept, mask):
    """The best's value under SEEDS after the commit's runs there (mask), each a run spread sqrt(tau2) around its
    seed's value plus the effect g: a Kalman step for each g on EFFECTS, and for the wide normal one with g
    integrated out, mixed over g's posterior and matched back to a normal."""
    c, m, obs, k = night.c, night.m, mask * 1.0, kept[:, None, None]
    both = obs[:, :, None] * obs[:, None, :]
    s = both * (c + night.tau2[:, None, None] * np.eye(2)) + np.eye(2) * (1 - obs)[:, None, :]
    s_inv = np.linalg.inv(s) * both  # over the seeds it ran under; nothing for the others
    gain = c @ s_inv
    r = (np.nan_to_num(runs.pair) - m) * obs  # the runs against the best's value, before the effect
    innovation = r[:, None, :] + g[..., None] * obs[:, None, :]
    log_lik = -0.5 * np.einsum("ngi,nij,ngj->ng", innovation, s_inv, innovation)
    new = m[:, None, :] + np.einsum("nij,ngj->ngi", gain, innovation) - k * g[..., None]
    # the wide g: its precision from these runs (p), its posterior (g_w, var_w), and the runs' likelihood
    w2 = WIDE ** 2 * night.ss / night.dof
    p, q = np.einsum("ni,nij,nj->n", obs, s_inv, obs), np.einsum("ni,nij,nj->n", obs, s_inv, r)
    var_w = w2 / (1 + w2 * p)
    g_w = -q * var_w
    log_lik_w = -0.5 * (np.einsum("ni,nij,nj->n", r, s_inv, r) - q ** 2 * var_w) - 0.5 * np.log1p(w2 * p)
    u = np.einsum("nij,nj->ni", gain, obs) - kept[:, None]  # how the new value moves with g
    new = np.concatenate([new, (m + np.einsum("nij,nj->ni", gain, r) + u * g_w[:, None])[:, None, :]], 1)
    w = _posterior(night.prior, np.column_stack([log_lik, log_lik_w]))
    mean = (w[..., None] * new).sum(1)
    dev = new - mean[:, None, :]
    cov = c - gain @ c + (w[:, -1] * var_w)[:, None, None] * u[:, :, None] * u[:, None, :]
    return mean, cov + np.einsum("ng,ngi,ngj->nij", w, dev, dev)


# -----------------------------------------------------------------------------
# A verdict, as analysis.py gives it


@dataclass
class Verdict:
    """What to do after a run: verdict is keep, discard, rerun, crash, refused or confirm; status what the commit's
    rows say in results.tsv (keep, discard, pending while a rerun is owed, crash); line the one line the agent reads,
    starting with what to do; seed the seed to run next, if any; evidence the lines `analysis.py judge` adds."""
    verdict: str
    status: str
    line: str
    seed: int = None
    evidence: list = field(default_factory=list)
    best: str = None
    diff: float = None
    z: float = None
    floor: float = None
    paired: bool = False
