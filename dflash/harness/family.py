"""The registry of ablation families: what kind of case an ablation test takes, which profiles it runs on, how
its records are rendered and plotted, what its baselines hold, and which pytest session it shares.

A family is one folder and one `FamilySpec`, registered by its own module (the package's families are listed one
line each in dflash/plugin.py; a family outside the package registers when its ablation file imports it, as the
worked example examples/majority_vote does). The plugin (dflash.harness.plugin) parametrizes, provides fixtures,
renders and plots by iterating this registry, so adding a family touches no harness file.

    register_family(FamilySpec(
        name="majority_vote", display_name="Majority vote (example)", fixture="vote_case",
        params=lambda profiles: [FamilyParam(p, p, p) for p in profiles if p == "tiny"],
        make_case=lambda request, state, family, param: VoteCase(request, state, state.profile(param.profile),
                                                                 family, Toy()),
        renderers={"majority_vote": vote_table}, baseline_kind="outcomes"))

A family's ablation test takes `spec.fixture`; `make_case(request, state, family, param)` builds the case object
(a dflash.harness.case.CaseRecord: baseline lookup, gates, finish, resume) for one `FamilyParam` of `params`. The
record a case writes names its family, and the family's `renderers` (experiment, i.e. ablation name -> markdown
table) render it; an experiment no renderer knows is an error unless the family declares `default_renderer`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

from ..errors import DFlashError

Renderer = Callable[[list[dict]], str]
Plotter = Callable[[Sequence[dict], Path, list[str]], list[Path]]  # (records, directory, notes) -> written files
BASELINE_KINDS = ("decode", "outcomes")


@dataclass(frozen=True)
class FamilyParam:
    """One parameter of a family's fixture: the value `make_case` receives, its id in case ids, the run profile
    and decode dataset it belongs to (dataset None: the family has no decode datasets), and pytest marks."""
    value: object
    id: str
    profile: str
    dataset: str | None = None
    marks: tuple = ()


@dataclass(frozen=True)
class FamilySpec:
    name: str
    display_name: str  # titles the family's report sections and its skip reasons
    fixture: str  # the fixture its ablation tests take
    params: Callable[[Sequence[str]], list[FamilyParam]]  # the run's profile names -> the fixture's parameters
    make_case: Callable[..., object]  # (request, state, family, FamilyParam) -> a CaseRecord
    renderers: Mapping[str, Renderer]  # experiment (ablation name) -> markdown table, in report order
    titles: Mapping[str, str] = field(default_factory=dict)  # experiment -> section title (default: from its name)
    default_renderer: Callable[[list[dict]], Renderer] | None = None  # records of an unlisted experiment -> renderer
    plots: Plotter | None = None
    baseline_kind: str = "decode"  # what its baseline entries hold (dflash.harness.baselines)
    session: str = "main"  # the pytest session of `make test` it runs in (families sharing cores share one)
    spends_alpha: bool = True  # its gates are corrected over the run (so its session takes a share of the error rate)
    description: str = ""

    def __post_init__(self):
        if self.baseline_kind not in BASELINE_KINDS:
            raise ValueError(f"family {self.name!r}: baseline_kind must be one of {BASELINE_KINDS}, got "
                             f"{self.baseline_kind!r}")

    def renderer(self, experiment: str, records: list[dict]) -> Renderer:
        """The table of this family's experiment; an experiment it does not know is an error (a misspelt
        ablation name would otherwise render as some other table)."""
        if experiment in self.renderers:
            return self.renderers[experiment]
        if self.default_renderer is not None:
            return self.default_renderer(records)
        raise DFlashError(f"family {self.name!r} has no table for experiment {experiment!r} (its experiments: "
                          f"{', '.join(self.renderers) or 'none'}); register a renderer for it in the family's "
                          "FamilySpec")

    def title(self, experiment: str) -> str:
        return self.titles.get(experiment) or experiment.replace("_", " ").capitalize()


FAMILIES: dict[str, FamilySpec] = {}
_LISTENERS: list[Callable[[FamilySpec], None]] = []


def register_family(spec: FamilySpec) -> FamilySpec:
    """Add a family (once: a second family of the same name or fixture is an error)."""
    if spec.name in FAMILIES:
        if FAMILIES[spec.name] == spec:
            return spec
        raise DFlashError(f"an ablation family named {spec.name!r} is registered already")
    taken = {f.fixture: f.name for f in FAMILIES.values()}
    if spec.fixture in taken:
        raise DFlashError(f"family {spec.name!r}: fixture {spec.fixture!r} belongs to family {taken[spec.fixture]!r}")
    FAMILIES[spec.name] = spec
    for listener in _LISTENERS:
        listener(spec)
    return spec


def on_register(listener: Callable[[FamilySpec], None]) -> None:
    """Call `listener` for every family registered, now and later (the plugin makes each family's fixture)."""
    _LISTENERS.append(listener)
    for spec in list(FAMILIES.values()):
        listener(spec)


def profiles_naming(part: str) -> Callable[[Sequence[str]], list[FamilyParam]]:
    """A FamilySpec.params: the run's profiles that name the family's `part` (dflash.profiles.Profile field),
    one parameter each, its id the profile's name."""
    def params(profiles) -> list[FamilyParam]:
        from ..profiles import PROFILES
        return [FamilyParam(name, name, name) for name in profiles if getattr(PROFILES[name], part) is not None]
    return params


def get_family(name: str) -> FamilySpec:
    if name not in FAMILIES:
        raise DFlashError(f"unknown ablation family {name!r} (registered: {', '.join(FAMILIES) or 'none'}); a "
                          "record names the family that wrote it, so this run's families must be registered")
    return FAMILIES[name]


def family_of_fixtures(fixtures) -> FamilySpec | None:
    """The family whose fixture a test takes (None: not an ablation case)."""
    return next((spec for spec in FAMILIES.values() if spec.fixture in fixtures), None)


def sessions() -> list[str]:
    """The pytest sessions of `make test`, in registration order of their first family."""
    return list(dict.fromkeys(spec.session for spec in FAMILIES.values()))


def alpha_shares(alpha: float) -> dict[str, float]:
    """Each session's --gate-alpha when `alpha` is make test's error rate: split evenly over the sessions whose
    families spend it (a session of families that spend none, e.g. one that checks a backend against the
    reference measured in the same case, runs at `alpha` and takes no share)."""
    spending = [s for s in sessions() if any(f.spends_alpha for f in FAMILIES.values() if f.session == s)]
    return {s: alpha / len(spending) if s in spending else alpha for s in sessions()}


def remove_listener(listener) -> None:
    """Stop calling `listener` (a pytest session that ended)."""
    if listener in _LISTENERS:
        _LISTENERS.remove(listener)
