"""Studies: intervention sets (listed, or a full or fractional 2^k factorial) × init seeds × train seeds.

A study is a config in `conf/sweep/` that selects the study sweeper (`hydra/sweeper=study`); its
settings, `hydra.sweeper.*`, follow `StudyConf`. This module only expands a study into trials; running
them is `harness/study/run.py`. It is imported by the Hydra plugin scan, so it stays free of heavy imports.
"""

import itertools
from dataclasses import dataclass, field, fields

from interventions import BASELINE, REGISTRY

MAX_FACTORS = 10  # 2^10 combinations; the exhaustive generator search stays well under a second
FACTOR_LETTERS = "ABCDEFGHJK"  # I is skipped: it names the identity in a defining relation
ROMAN = {3: "III", 4: "IV", 5: "V", 6: "VI", 7: "VII", 8: "VIII", 9: "IX", 10: "X"}
ALIASING = {
    3: "main effects are aliased with two-factor interactions",
    4: "main effects are clear of two-factor interactions; two-factor interactions are aliased with each other",
}


@dataclass
class FactorialConf:
    factors: list[str] = field(default_factory=list)
    resolution: int | None = None  # None: the full 2^k; else the smallest fraction of at least this resolution


@dataclass
class RepeatConf:
    """One seed cell run `runs` times in all: exact repeats measure the run-to-run noise of the kernels."""

    seed: int = 42
    train_seed: int | None = None
    arm: str = BASELINE
    runs: int = 3


@dataclass
class StudyConf:
    _target_: str = "hydra_plugins.harness_study_sweeper.study_sweeper.StudySweeper"
    description: str = ""
    arms: list[str] = field(default_factory=list)  # intervention sets: "baseline", "no_dropout", "qkv_bias+no_dropout"
    factorial: FactorialConf | None = None  # its combinations are added to `arms`
    seeds: list[int] = field(default_factory=lambda: [42])  # init seeds
    train_seeds: list[int | None] = field(default_factory=lambda: [None])  # re-seed after init; null = none
    repeats: list[RepeatConf] = field(default_factory=list)
    overrides: list[str] = field(default_factory=list)  # applied to every trial, before the command line's
    max_batch_size: int | None = None  # trials handed to the launcher at once; None = all
    progress_interval: float = 15.0  # seconds between looks at the tracking store for the progress line
    # A sequential study (harness/study/sequential.py) runs in rounds and decides after each one.
    sequential: bool = False
    max_seeds: int | None = None  # the most init seeds an arm runs; None: as many as `seeds` lists
    first_seeds: int = 1  # init seeds of round 1; every later round adds one
    alpha: float = 0.05  # study-wide error rate of the better/worse decisions
    min_effect: float = 0.0  # test-loss difference that matters; 0: no arm is closed as "no meaningful effect"
    spending: str = "obrien_fleming"  # Lan-DeMets alpha spending: obrien_fleming or pocock
    budget_trials: int | None = None  # trials the study may run in all (every round, every execution)
    budget_gpu_hours: float | None = None  # GPU-hours it may spend in all: train_seconds x world_size
    analyze: bool = True  # a fixed study ends by running its analysis (python -m analysis study=NAME)
    report_dir: str | None = None  # where that analysis writes its report; None: <project>/reports/<study>


@dataclass(frozen=True)
class TrialSpec:
    arm: tuple[str, ...]  # intervention names as the study writes them; () is the baseline
    seed: int
    train_seed: int | None
    repeat: int = 0  # 0 for a cell's first run, 1, 2, … for its exact repeats

    @property
    def intervention(self) -> str:
        """The MLflow `intervention` tag: stacks expanded, sorted, joined by `+`."""
        return "+".join(sorted({n for name in self.arm for n in REGISTRY[name].expanded()})) or BASELINE

    @property
    def name(self) -> str:
        train = "" if self.train_seed is None else f"-t{self.train_seed}"
        return f"{self.intervention}-s{self.seed}{train}" + (f"#{self.repeat}" if self.repeat else "")

    def overrides(self) -> list[str]:
        seeds = [f"seed={self.seed}", f"train_seed={'null' if self.train_seed is None else self.train_seed}"]
        if not self.arm:
            return seeds
        return [f"+intervention={self.arm[0] if len(self.arm) == 1 else '[' + ','.join(self.arm) + ']'}", *seeds]


@dataclass(frozen=True)
class FactorialDesign:
    """A two-level design over `factors`: every combination, or the fraction fixed by `generators`.

    Factors are bits (factor i is bit i). Each generator is a word of the defining relation: a generated
    factor together with the base factors whose product (parity) sets its level.
    """

    factors: tuple[str, ...]
    generators: tuple[int, ...] = ()

    @property
    def defining_relation(self) -> list[int]:
        words = set()
        for size in range(1, len(self.generators) + 1):
            for chosen in itertools.combinations(self.generators, size):
                product = 0
                for word in chosen:
                    product ^= word
                words.add(product)
        return sorted(words, key=lambda w: (w.bit_count(), w))

    @property
    def resolution(self) -> int | None:
        """The length of the shortest word of the defining relation; None for the full factorial."""
        words = self.defining_relation
        return words[0].bit_count() if words else None

    def combinations(self) -> list[tuple[str, ...]]:
        """The applied factors of each run, in standard order: the baseline (nothing applied) first."""
        base = len(self.factors) - len(self.generators)
        runs = []
        for levels in range(2**base):
            for position, word in enumerate(self.generators):
                base_part = word & ((1 << base) - 1)
                levels |= ((levels & base_part).bit_count() % 2) << (base + position)
            runs.append(tuple(f for i, f in enumerate(self.factors) if levels >> i & 1))
        return runs

    def describe(self) -> str:
        k, p = len(self.factors), len(self.generators)
        letters = ", ".join(f"{FACTOR_LETTERS[i]}={f}" for i, f in enumerate(self.factors))
        if not p:
            return f"full 2^{k} factorial, {2**k} combinations ({letters})"
        resolution = self.resolution
        words = ["".join(FACTOR_LETTERS[i] for i in range(k) if w >> i & 1) for w in self.defining_relation]
        relation = " = ".join(["I", *words])
        aliasing = ALIASING.get(resolution, "main effects and two-factor interactions are clear of each other")
        return (
            f"2^({k}-{p}) fractional factorial, resolution {ROMAN.get(resolution, resolution)}: "
            f"{2 ** (k - p)} of {2**k} combinations ({letters}); defining relation {relation}; {aliasing}"
        )


def factorial_design(factors: list[str], resolution: int | None = None) -> FactorialDesign:
    """The full 2^k design, or the smallest fraction of at least `resolution` (minimum aberration among those).

    Searches every set of generators, so the design is the best one, not the first found in a table.
    """
    k = len(factors)
    if not 2 <= k <= MAX_FACTORS:
        raise ValueError(f"a factorial needs 2 to {MAX_FACTORS} factors, got {k}")
    if resolution is not None and resolution < 3:
        raise ValueError(f"factorial resolution {resolution}: below III, main effects are aliased with each other")
    if resolution is None or resolution > k:
        return FactorialDesign(tuple(factors))
    for fraction in range(k - 1, 0, -1):  # the smallest design first
        base = k - fraction
        # A generated factor's word is it plus ≥ resolution − 1 base factors; shorter words cannot qualify.
        candidates = [
            sum(1 << b for b in bits)
            for size in range(resolution - 1, base + 1)
            for bits in itertools.combinations(range(base), size)
        ]
        best = None
        for chosen in itertools.combinations(candidates, fraction):
            design = FactorialDesign(tuple(factors), tuple(w | 1 << (base + i) for i, w in enumerate(chosen)))
            lengths = sorted(w.bit_count() for w in design.defining_relation)
            # Minimum aberration: the fewest shortest words, i.e. the lexicographically largest lengths.
            if lengths[0] >= resolution and (best is None or lengths > best[0]):
                best = (lengths, design)
        if best:
            return best[1]
    return FactorialDesign(tuple(factors))


def parse_arm(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split("+"))
    if names == (BASELINE,):
        return ()
    for name in names:
        if name not in REGISTRY:
            raise ValueError(
                f"unknown intervention '{name}' in study arm '{text}'; choose from {BASELINE}, {', '.join(REGISTRY)}"
            )
    return names


def study_arms(conf: StudyConf) -> list[tuple[str, ...]]:
    arms = [parse_arm(text) for text in conf.arms]
    if conf.factorial is not None:
        factors = conf.factorial.factors
        if not all(len(parse_arm(name)) == 1 for name in factors):
            raise ValueError(f"factorial factors are single interventions (no baseline, no '+'): {list(factors)}")
        components = [c for name in factors for c in REGISTRY[name].expanded()]
        if len(components) != len(set(components)):
            raise ValueError(
                f"factorial factors {list(factors)} share components: a stack and its parts cannot vary independently"
            )
        arms += factorial_design(conf.factorial.factors, conf.factorial.resolution).combinations()
    seen: dict[str, tuple[str, ...]] = {}
    for arm in arms:
        label = TrialSpec(arm, 0, None).intervention
        if label in seen:
            raise ValueError(
                f"study arms {'+'.join(seen[label]) or BASELINE!r} and {'+'.join(arm) or BASELINE!r} "
                f"apply the same interventions ({label})"
            )
        seen[label] = arm
    if not arms:
        raise ValueError("the study has no arms: set hydra.sweeper.arms or hydra.sweeper.factorial")
    return arms


def study_trials(conf: StudyConf) -> list[TrialSpec]:
    """Every trial, seed-major: each init seed covers all arms before the next, so a study cut short
    still holds complete paired comparisons. A sequential study's are those of its first round."""
    for name, values in (("seeds", conf.seeds), ("train_seeds", conf.train_seeds)):
        if not values or len(set(values)) != len(values):
            raise ValueError(f"hydra.sweeper.{name}={list(values)} must be non-empty and without duplicates")
    check_sequential(conf)
    arms = study_arms(conf)
    seeds = sequential_schedule(conf)[: conf.first_seeds] if conf.sequential else conf.seeds
    trials = round_trials(conf, arms, seeds)
    for repeat in conf.repeats:
        cell = TrialSpec(parse_arm(repeat.arm), repeat.seed, repeat.train_seed)
        if repeat.runs < 2:
            raise ValueError(f"repeat of {cell.name}: runs={repeat.runs}; exact repeats need at least 2 runs")
        if conf.sequential and cell.seed not in seeds:
            raise ValueError(
                f"repeat of {cell.name}: a sequential study runs exact repeats in its first round, "
                f"at init seeds {seeds}"
            )
        already = sum(t == cell for t in trials)
        trials += [TrialSpec(cell.arm, cell.seed, cell.train_seed, r) for r in range(already, repeat.runs)]
    if conf.sequential and conf.budget_trials is not None and conf.budget_trials < len(trials):
        raise ValueError(
            f"hydra.sweeper.budget_trials={conf.budget_trials}: the first round alone has {len(trials)} trials"
        )
    return trials


def round_trials(conf: StudyConf, arms: list[tuple[str, ...]], seeds: list[int]) -> list[TrialSpec]:
    return [TrialSpec(arm, seed, train_seed) for seed in seeds for train_seed in conf.train_seeds for arm in arms]


SEQUENTIAL_KEYS = ("max_seeds", "first_seeds", "alpha", "min_effect", "spending", "budget_trials", "budget_gpu_hours")
SPENDING = ("obrien_fleming", "pocock")


def sequential_schedule(conf: StudyConf) -> list[int]:
    """The init seeds in the order rounds add them: `seeds`, then the smallest positive integers they do not
    list, up to `max_seeds` (seeds 42, 22, 67 and max_seeds 6 give 42, 22, 67, 1, 2, 3)."""
    more = (seed for seed in itertools.count(1) if seed not in conf.seeds)
    return [*conf.seeds, *itertools.islice(more, sequential_max_seeds(conf))][: sequential_max_seeds(conf)]


def sequential_max_seeds(conf: StudyConf) -> int:
    return len(conf.seeds) if conf.max_seeds is None else conf.max_seeds


def check_sequential(conf: StudyConf) -> None:
    """The sequential settings, each refused with its reason; outside a sequential study they must stay unset."""
    if not conf.sequential:
        defaults = {f.name: f.default for f in fields(StudyConf)}
        changed = [
            f"hydra.sweeper.{key}={getattr(conf, key)}"
            for key in SEQUENTIAL_KEYS
            if getattr(conf, key) != defaults[key]
        ]
        if changed:
            raise ValueError(
                f"{', '.join(changed)}: {'settings' if len(changed) > 1 else 'a setting'} of sequential "
                f"studies; add hydra.sweeper.sequential=true"
            )
        return
    max_seeds = sequential_max_seeds(conf)
    problems = []
    if conf.factorial is not None:
        problems.append(
            "factorial: a sequential study compares listed arms with the baseline; a factorial "
            "estimates effects from all its combinations at once"
        )
    if [parse_arm(arm) for arm in conf.arms].count(()) != 1 or len(conf.arms) < 2:
        problems.append(f"arms={list(conf.arms)}: a sequential study needs the baseline and at least one other arm")
    if max_seeds < 2:
        problems.append(f"max_seeds={max_seeds}: at least 2 (a decision needs paired init seeds)")
    if not 1 <= conf.first_seeds <= max_seeds:
        problems.append(f"first_seeds={conf.first_seeds}: between 1 and max_seeds ({max_seeds})")
    if not 0 < conf.alpha < 1:
        problems.append(f"alpha={conf.alpha}: between 0 and 1")
    if not conf.min_effect >= 0:
        problems.append(f"min_effect={conf.min_effect}: at least 0")
    if conf.spending not in SPENDING:
        problems.append(f"spending={conf.spending}: one of {', '.join(SPENDING)}")
    if conf.budget_trials is not None and conf.budget_trials < 1:
        problems.append(f"budget_trials={conf.budget_trials}: at least 1")
    if conf.budget_gpu_hours is not None and not conf.budget_gpu_hours > 0:
        problems.append(f"budget_gpu_hours={conf.budget_gpu_hours}: more than 0")
    if problems:
        raise ValueError("sequential study: " + "; ".join(f"hydra.sweeper.{p}" for p in problems))
