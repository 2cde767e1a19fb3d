"""A benchmark grid: datasets x models x attacks x poisoning rates x seeds x defenses.

A grid file (YAML or JSON) names each axis; :func:`load_grid` checks all of it before any work
(every field's type and range, every name, every dataset path, every setting of the training,
the attacks, the defenses and the re-tuning) and :meth:`Grid.cells` expands it into
:class:`Cell` objects. Booleans are YAML's own (``true``/``false``, unquoted): a string such as
``"false"`` is refused, never read as true. A cell's ``key`` hashes everything that shapes its
result (the subject's data checksum, model, attack and training config, the seed, the defense
with every setting filled in, the clean-set size, the optional measurements, and the
fingerprint of the package's source code, :func:`rnp.runs.fingerprint.package_fingerprint`),
so a finished cell is recognised on a later run and a changed setting or a code change makes a
new cell. Cells share a :class:`Subject` (the backdoored model) when they differ only in the
defense; subjects are cached by :func:`rnp.bench.subjects.cached_subject`.

Example (``benchmarks/grids/`` holds every study's)::

    name: cpu
    datasets: {cifar10: ../shared/data/cifar10/cifar10-jpeg.zip}
    models: [{arch: preact_resnet18, width: 16}]
    train: {epochs: 10}
    attacks: [badnets, blend, {name: wanet, k: 4}]
    poison_rates: [default]
    seeds: [0]
    defenses: {none: {}, rnp: {}, anp: {iterations: 200}}
    clean_size: 500
    retuning: {epochs: [1, 5, 20]}

Besides the defenses, a grid may measure (each study of ``benchmarks/grids/`` uses some):
``clean_seeds`` draws the clean set and seeds the defense several times on each subject (a
defense row may carry its own ``clean_seeds``, e.g. three for RNP and the grid's one for the
costly baselines);
``repeats`` times every defense several times (median seconds, results checked equal);
``prune_counts`` adds RNP's oracle ranking (CA / ASR after pruning its first k channels);
``recalibration: true`` also measures every defended model after re-estimating its BatchNorm
statistics on the clean set (:mod:`rnp.bench.recalibration`);
``cost_floor: false`` skips timing RNP's optimisation floor (:mod:`rnp.bench.cost`), which in
float32 can take longer than a bfloat16 RNP run itself, where a study needs no cost figures;
``attack_properties``, ``exposure`` and ``label_runs`` (:mod:`rnp.bench.measurements`) measure
each subject in its undefended cell. An attack entry may carry its own ``poison_rate`` and ``seeds``, and the
attack ``none`` is a clean subject.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from rnp import __version__
from rnp.attacks import ATTACKS
from rnp.bench.measurements import ExposureConfig, LabelRunsConfig
from rnp.bench.retuning import RetuningConfig
from rnp.bench.suite import suite_attack
from rnp.defenses import DEFENSES
from rnp.errors import RnpError
from rnp.models import MODEL_NAMES
from rnp.runs.fingerprint import package_fingerprint
from rnp.runs.folder import config_dict
from rnp.training import TrainConfig
from rnp.utils import resolve_precision

NO_DEFENSE = "none"
"""The pseudo-defense that returns the model unchanged: the row every other is compared to."""

NO_ATTACK = "none"
"""The attack name of a clean subject (the re-tuning attack's control)."""

GRID_KEYS = {"name", "datasets", "models", "train", "attacks", "poison_rates", "seeds", "defenses",
             "clean_size", "retuning", "curve_images", "reduced_attacks", "cache", "data_cache", "output",
             "clean_seeds", "repeats", "prune_counts", "attack_properties", "exposure", "cost_floor",
             "label_runs", "recalibration", "development", "reference"}


@dataclass(frozen=True)
class Subject:
    """One backdoored model to train (or find in the cache)."""

    dataset: str
    data_spec: str
    arch: str
    width: int
    attack: str
    attack_params: dict
    poison_rate: float | None
    seed: int
    train: dict
    reduced: bool = True

    def build_attack(self):
        """The attack, or None for a clean subject (attack "none")."""
        if self.attack == NO_ATTACK:
            return None
        params = dict(self.attack_params, seed=self.seed)
        if self.poison_rate is not None:
            params["poison_rate"] = self.poison_rate
        return suite_attack(self.attack, reduced=self.reduced, **params)

    def train_config(self) -> TrainConfig:
        return TrainConfig(**{**self.train, "seed": self.seed})

    @property
    def key(self) -> str:
        """A string naming the subject (its fields hold dicts, so it is not hashable itself)."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    def clean_twin(self) -> "Subject":
        """The same model trained the same way on the same data without the attack."""
        return dataclasses.replace(self, attack=NO_ATTACK, attack_params={}, poison_rate=None)

    @property
    def label(self) -> str:
        if self.attack == NO_ATTACK:
            return "clean"
        rate = "" if self.poison_rate is None else f"@{self.poison_rate:g}"
        params = "".join(f",{k}={v}" for k, v in sorted(self.attack_params.items()))
        return f"{self.attack}{params}{rate}"


@dataclass(frozen=True)
class Cell:
    """One defense on one subject: what a grid run computes and stores as one record."""

    subject: Subject
    defense: str
    settings: dict
    clean_size: int
    retuning: RetuningConfig | None
    curve_images: int
    data_checksum: str
    name: str = ""
    code: str = ""
    key: str = ""
    clean_seed: int | None = None
    repeats: int = 1
    prune_counts: tuple[int, ...] = ()
    attack_properties: bool = False
    exposure: ExposureConfig | None = None
    label_runs: LabelRunsConfig | None = None
    cost_floor: bool = True
    """Whether an RNP cell times its optimisation floor (:func:`rnp.bench.cost.optimisation_floor`)."""
    recalibration: bool = False
    """Whether the cell also measures its model with BatchNorm statistics re-estimated on the clean set."""
    device: str = "cpu"
    """Where the grid runs. The key holds the precision "auto" resolves to there, not the device."""

    @property
    def seed(self) -> int:
        """The seed of the clean set and the defense: the clean seed, else the subject's."""
        return self.subject.seed if self.clean_seed is None else self.clean_seed

    @property
    def measures_subject(self) -> bool:
        """Whether this cell (the undefended one) measures its subject."""
        return self.defense == NO_DEFENSE and (self.attack_properties or self.exposure is not None
                                               or self.label_runs is not None)

    @property
    def control(self) -> Subject | None:
        """The clean subject the undefended cell also re-tunes, as the re-tuning attack's
        control (how far a model that never had the backdoor learns it from the same few
        poisoned samples), and whose clean accuracy the attack properties compare with."""
        if self.subject.attack == NO_ATTACK or self.defense != NO_DEFENSE:
            return None
        if self.retuning is not None or self.attack_properties:
            return self.subject.clean_twin()
        return None

    def defense_config(self):
        """The defense's config (None for no defense), its precision resolved for the cell's
        device (:func:`rnp.utils.resolve_precision`) where it has one, so the cell computes
        what its key says wherever it runs."""
        if self.defense not in DEFENSES:
            return None
        config = DEFENSES[self.defense].config_class(**self.settings)
        return resolve_precision(config, self.device) if hasattr(config, "amp") else config

    def describe(self) -> dict:
        """Everything that shapes the result, as JSON-ready data (hashed into the key). The
        dataset enters by its checksum, not its path, so moving the data keeps the cells. The
        training and defense configs hold the precision used on the cell's device ("auto"
        resolved), so a bfloat16 cell never takes a float32 record's place."""
        config = self.defense_config()
        subject = {k: v for k, v in dataclasses.asdict(self.subject).items() if k != "data_spec"}
        return {"rnp_version": __version__, "code": self.code,
                "subject": subject, "data_checksum": self.data_checksum,
                "attack_spec": attack.spec() if (attack := self.subject.build_attack()) else None,
                "train_config": config_dict(resolve_precision(self.subject.train_config(), self.device)),
                "defense": self.defense,
                "defense_config": config_dict(config) if config is not None else {},
                "clean_size": self.clean_size,
                "retuning": config_dict(self.retuning) if self.retuning else None,
                "curve_images": self.curve_images if self.defense == "rnp" else 0,
                **({"name": self.name} if self.name and self.name != self.defense else {}),
                **self._measurements()}

    def _measurements(self) -> dict:
        """The optional measurements that are on, so a grid without them keeps its keys."""
        subject = self.measures_subject
        extras = {"clean_seed": self.clean_seed, "repeats": self.repeats if self.repeats > 1 else None,
                  "prune_counts": list(self.prune_counts) if self.defense == "rnp" and self.prune_counts else None,
                  "attack_properties": True if subject and self.attack_properties else None,
                  "cost_floor": False if self.defense == "rnp" and not self.cost_floor else None,
                  "exposure": config_dict(self.exposure) if subject and self.exposure else None,
                  "label_runs": config_dict(self.label_runs) if subject and self.label_runs else None,
                  "recalibration": True if self.recalibration else None}
        return {key: value for key, value in extras.items() if value is not None}


@dataclass
class Grid:
    """A parsed grid file."""

    name: str
    datasets: dict[str, str]
    models: list[dict]
    attacks: list[tuple[str, dict]]
    """(name, parameters); the parameters may hold the entry's own ``poison_rate`` and ``seeds``."""
    defenses: dict[str, tuple[str, dict]]
    train: dict = field(default_factory=dict)
    poison_rates: list[float | None] = field(default_factory=lambda: [None])
    seeds: list[int] = field(default_factory=lambda: [0])
    clean_size: int = 500
    retuning: RetuningConfig | None = None
    curve_images: int = 1000
    reduced_attacks: bool = True
    cache: str | None = None
    data_cache: str | None = None
    output: str | None = None
    clean_seeds: list[int] | None = None
    row_clean_seeds: dict[str, list[int]] = field(default_factory=dict)
    repeats: int = 1
    prune_counts: list[int] = field(default_factory=list)
    attack_properties: bool = False
    exposure: ExposureConfig | None = None
    label_runs: LabelRunsConfig | None = None
    cost_floor: bool = True
    recalibration: bool = False
    development: tuple[str, ...] = ()
    """Attack labels the grid's settings were chosen on; the report compares defenses on them
    apart from the rest (held back). Not part of any cell's key."""
    reference: str = "rnp"
    """The defense row every other is compared with on the same cells (the report's comparison)."""

    def subjects(self) -> list[Subject]:
        return [Subject(name, spec, model["arch"], model.get("width", 16), attack, _attack_params(params),
                        rate, seed, self.train, self.reduced_attacks)
                for name, spec in self.datasets.items() for model in self.models
                for attack, params in self.attacks
                for rate in _entry_rates(attack, params, self.poison_rates)
                for seed in params.get("seeds", self.seeds)]

    def cells(self, checksums: dict[str, str], device: str = "cpu") -> list[Cell]:
        """Every cell, subjects in grid order and defenses in the file's order within each.
        ``checksums`` maps each dataset name to its data checksum; ``device`` is where the grid
        runs (the precision "auto" means there enters the keys)."""
        cells = []
        default = self.clean_seeds or [None]
        every = list(dict.fromkeys([*default, *(s for seeds in self.row_clean_seeds.values() for s in seeds)]))
        for subject in self.subjects():
            for clean_seed in every:
                seed = subject.seed if clean_seed is None else clean_seed
                for name, (defense, settings) in self.defenses.items():
                    if clean_seed not in self.row_clean_seeds.get(name, default):
                        continue
                    if defense != NO_DEFENSE and "seed" in _fields(defense):
                        settings = {"seed": seed, **settings}
                    cell = Cell(subject, defense, settings, self.clean_size, self.retuning,
                                self.curve_images, checksums[subject.dataset], name, package_fingerprint(),
                                clean_seed=clean_seed, repeats=self.repeats,
                                prune_counts=tuple(self.prune_counts),
                                attack_properties=self.attack_properties, exposure=self.exposure,
                                label_runs=self.label_runs, cost_floor=self.cost_floor,
                                recalibration=self.recalibration, device=str(device))
                    cells.append(dataclasses.replace(cell, key=_hash(cell.describe())))
        return cells


def load_grid(path) -> Grid:
    """Reads and checks a grid file; every mistake is one RnpError line naming the file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise RnpError(f"{path}: {error.strerror or error}") from None
    try:
        import yaml
        raw = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise RnpError(f"{path}: not valid YAML ({str(error).splitlines()[0]})") from None
    try:
        return parse_grid(raw, base=path.parent)
    except RnpError as error:
        raise RnpError(f"{path}: {error}") from None


def parse_grid(raw, *, base: Path = Path(".")) -> Grid:
    """A :class:`Grid` from the mapping a grid file holds, every field checked. Relative dataset
    paths are taken relative to the working directory when they exist there, else to ``base``."""
    if not isinstance(raw, dict):
        raise RnpError("a grid is a mapping of the keys " + ", ".join(sorted(GRID_KEYS)))
    unknown = sorted(set(raw) - GRID_KEYS)
    if unknown:
        raise RnpError(f"unknown grid key(s) {', '.join(unknown)}; known: {', '.join(sorted(GRID_KEYS))}")
    for required in ("datasets", "attacks", "defenses"):
        if not raw.get(required):
            raise RnpError(f"the grid needs a non-empty {required!r}")
    reduced = _bool(raw.get("reduced_attacks", True), "reduced_attacks")
    grid = Grid(
        name=_text(raw.get("name", "grid"), "name"), datasets=_datasets(raw["datasets"], base),
        models=[_model(m) for m in _list(raw.get("models", [{"arch": "preact_resnet18"}]), "models")],
        attacks=[_attack(a, reduced) for a in _list(raw["attacks"], "attacks")],
        defenses=_defenses(raw["defenses"]), row_clean_seeds=_row_clean_seeds(raw["defenses"]),
        train=_train(raw.get("train", {})),
        poison_rates=[_rate(r) for r in _list(raw.get("poison_rates", ["default"]), "poison_rates")],
        seeds=[_int(s, "seeds") for s in _list(raw.get("seeds", [0]), "seeds")],
        clean_size=_int(raw.get("clean_size", 500), "clean_size", minimum=1),
        retuning=_retuning(raw.get("retuning")),
        curve_images=_int(raw.get("curve_images", 1000), "curve_images"), reduced_attacks=reduced,
        **{key: _folder(raw.get(key), key) for key in ("cache", "data_cache", "output")},
        clean_seeds=_clean_seeds(raw.get("clean_seeds")),
        repeats=_int(raw.get("repeats", 1), "repeats", minimum=1),
        prune_counts=[_int(k, "prune_counts", minimum=1) for k in _list(raw.get("prune_counts", []), "prune_counts")],
        attack_properties=_bool(raw.get("attack_properties", False), "attack_properties"),
        exposure=_measurement(ExposureConfig, raw.get("exposure"), "exposure"),
        label_runs=_measurement(LabelRunsConfig, raw.get("label_runs"), "label_runs"),
        cost_floor=_bool(raw.get("cost_floor", True), "cost_floor"),
        recalibration=_bool(raw.get("recalibration", False), "recalibration"),
        development=tuple(_text(a, "development") for a in _list(raw.get("development", []), "development")),
        reference=_text(raw.get("reference", "rnp"), "reference"))
    _check_measurements(grid)
    _check_comparison(grid, explicit_reference="reference" in raw)
    return grid


def _check_comparison(grid: Grid, explicit_reference: bool) -> None:
    """The development attacks are the grid's backdoors, by the labels the report prints, and
    the reference is one of its defense rows where given or where development attacks are (the
    default, "rnp", may be absent otherwise: no comparison then)."""
    rows = [name for name, (defense, _) in grid.defenses.items() if defense != NO_DEFENSE]
    if (explicit_reference or grid.development) and grid.reference not in rows:
        raise RnpError(f"reference {grid.reference!r} is not a defense row of the grid (the comparison "
                       f"needs one); its rows: {', '.join(rows) or 'none'}")
    labels = {subject.label for subject in grid.subjects() if subject.attack != NO_ATTACK}
    unknown = [a for a in grid.development if a not in labels]
    if unknown:
        raise RnpError(f"development names attacks the grid does not have: {', '.join(unknown)}; "
                       f"its attacks: {', '.join(sorted(labels))}")


def _row_clean_seeds(raw) -> dict[str, list[int]]:
    """Row name -> the row's own ``clean_seeds``, for the rows that carry them."""
    if isinstance(raw, list):
        return {}
    rows = {}
    for name, settings in _mapping(raw, "defenses").items():
        if isinstance(settings, dict) and "clean_seeds" in settings:
            rows[str(name)] = _clean_seeds(settings["clean_seeds"])
            if rows[str(name)] is None:
                raise RnpError(f"defenses.{name}.clean_seeds is a non-empty list of seeds")
    return rows


def _clean_seeds(raw) -> list[int] | None:
    """None (each cell draws its clean set with its subject's seed) or a non-empty list."""
    if raw is None:
        return None
    seeds = [_int(s, "clean_seeds") for s in _list(raw, "clean_seeds")]
    if not seeds:
        raise RnpError("'clean_seeds' is a non-empty list of seeds, or omitted")
    return seeds


def _measurement(config_class, raw, key: str):
    """A measurement's settings (``exposure``, ``label_runs``); omitted or false: none, true:
    the defaults."""
    if raw is None or raw is False:
        return None
    settings = _mapping({} if raw is True else raw, key)
    _check_fields(config_class, settings, key)
    _check_types(config_class, settings, key)
    try:
        return config_class(**settings)
    except RnpError as error:
        raise RnpError(f"{key}: {error}") from None


def _check_measurements(grid: Grid) -> None:
    """The measurements a grid asks for have the cells they are made in."""
    defenses = {defense for defense, _ in grid.defenses.values()}
    if (grid.attack_properties or grid.exposure or grid.label_runs) and NO_DEFENSE not in defenses:
        raise RnpError("'attack_properties', 'exposure' and 'label_runs' measure each subject in its "
                       "undefended cell: add the defense 'none'")
    if grid.prune_counts and ("rnp" not in defenses or not grid.curve_images):
        raise RnpError("'prune_counts' measures RNP's ranking on the curve_images test subset: "
                       "it needs an rnp defense and curve_images > 0")
    if any(attack == NO_ATTACK for attack, _ in grid.attacks) and grid.retuning:
        raise RnpError("the attack 'none' (a clean subject) has no backdoor to re-tune: remove 'retuning'")


def _datasets(raw, base: Path) -> dict[str, str]:
    """Name -> path, each path resolved and existing (a typo fails now, not after training)."""
    if not isinstance(raw, dict):
        raise RnpError("'datasets' maps a name to a dataset path, e.g. {cifar10: path/to/data}")
    datasets = {}
    for name, spec in raw.items():
        path = _resolve(_text(spec, f"datasets.{name}"), base)
        if not Path(path).exists():
            raise RnpError(f"datasets.{name}: no such file or folder {path}")
        datasets[str(name)] = path
    return datasets


def _train(raw) -> dict:
    """The training settings: known TrainConfig fields of the right types and ranges, no seed."""
    train = _mapping(raw, "train")
    if "seed" in train:
        raise RnpError("'train' takes no seed: the grid's 'seeds' set it")
    _check_fields(TrainConfig, train, "train")
    _check_types(TrainConfig, train, "train")
    try:
        TrainConfig(**train)
    except RnpError as error:
        raise RnpError(f"train: {error}") from None
    return train


def _retuning(raw) -> RetuningConfig | None:
    """The re-tuning attack's settings; omitted or false: none, true: the defaults."""
    if raw is None or raw is False:
        return None
    settings = _mapping({} if raw is True else raw, "retuning")
    _check_fields(RetuningConfig, settings, "retuning")
    _check_types(RetuningConfig, settings, "retuning")
    return RetuningConfig(**settings)


def _defenses(raw) -> dict[str, tuple[str, dict]]:
    """Row name -> (defense, settings). A row is named after its defense, or carries
    ``defense: NAME`` among its settings to run one defense under several settings."""
    if isinstance(raw, list):
        raw = {name: {} for name in raw}
    raw = _mapping(raw, "defenses")
    known = [NO_DEFENSE, *DEFENSES]
    result = {}
    for name, settings in raw.items():
        settings = dict(_mapping(settings or {}, f"defenses.{name}"))
        settings.pop("clean_seeds", None)  # the row's own clean sets: _row_clean_seeds
        defense = settings.pop("defense", name)
        if defense not in known:
            raise RnpError(f"unknown defense {defense!r}; choose from {', '.join(known)} "
                           "(a row with another name says which with 'defense: NAME')")
        if defense == NO_DEFENSE and settings:
            raise RnpError("the 'none' defense takes no settings")
        if defense != NO_DEFENSE:
            DEFENSES[defense].check_settings(settings)
            _check_types(DEFENSES[defense].config_class, settings, f"defenses.{name}")
            DEFENSES[defense](**settings)  # validates the values now, not hours into the run
        result[str(name)] = (defense, settings)
    return result


def _attack(item, reduced: bool) -> tuple[str, dict]:
    """(name, parameters), the parameters checked by building the attack once. An entry's own
    ``poison_rate`` and ``seeds`` replace the grid's for it; ``none`` is a clean subject."""
    if isinstance(item, str):
        name, params = item, {}
    else:
        params = dict(_mapping(item, "attacks[]"))
        name = params.pop("name", None)
    if name not in ATTACKS and name != NO_ATTACK:
        raise RnpError(f"unknown attack {name!r}; choose from {', '.join(sorted(ATTACKS))} "
                       f"(or {NO_ATTACK}: a clean subject)")
    if "seed" in params or "target" in params:
        raise RnpError(f"attack {name}: seed and target come from the grid's seeds "
                       "(or the entry's 'seeds') and the suite's target 0")
    entry = {}
    if "seeds" in params:
        entry["seeds"] = [_int(s, f"attacks.{name}.seeds") for s in _list(params.pop("seeds"), f"attacks.{name}.seeds")]
        if not entry["seeds"]:
            raise RnpError(f"attacks.{name}.seeds is a non-empty list of seeds")
    if "poison_rate" in params:
        entry["poison_rate"] = _rate(params.pop("poison_rate"))
    if name == NO_ATTACK:
        if params or "poison_rate" in entry:
            raise RnpError(f"the attack {NO_ATTACK} (a clean subject) takes only 'seeds'")
        return name, entry
    _check_types(ATTACKS[name], params, f"attacks.{name}")
    try:
        suite_attack(name, reduced=reduced, **params)
    except (TypeError, ValueError) as error:
        raise RnpError(f"attacks.{name}: {error}") from None
    return name, {**params, **entry}


def _attack_params(params: dict) -> dict:
    """An attack entry's parameters without the entry's own rate and seeds."""
    return {k: v for k, v in params.items() if k not in ("poison_rate", "seeds")}


def _entry_rates(attack: str, params: dict, rates: list) -> list:
    """The poisoning rates of an attack entry: its own, none for a clean subject, else the grid's."""
    if attack == NO_ATTACK:
        return [None]
    return [params["poison_rate"]] if "poison_rate" in params else rates


def _model(item) -> dict:
    if isinstance(item, str):
        item = {"arch": item}
    item = _mapping(item, "models[]")
    if item.get("arch") not in MODEL_NAMES or set(item) - {"arch", "width"}:
        raise RnpError(f"a model is {{arch: one of {', '.join(MODEL_NAMES)}, width: N}}, got {item}")
    return {"arch": item["arch"], "width": _int(item.get("width", 16), "models[].width", minimum=1)}


def _rate(value) -> float | None:
    if value in (None, "default"):
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise RnpError(f"a poisoning rate is 'default' or a number in (0, 1), got {value!r}")
    return float(value)


def _resolve(spec: str, base: Path) -> str:
    path = Path(spec).expanduser()
    if path.is_absolute() or path.exists() or not (base / path).exists():
        return str(path)
    return str(base / path)


def _check_fields(config_class, settings: dict, where: str) -> None:
    known = {f.name for f in dataclasses.fields(config_class)}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise RnpError(f"{where} has no setting {', '.join(unknown)}; known: {', '.join(sorted(known))}")


def _fields(defense: str) -> set[str]:
    return {f.name for f in dataclasses.fields(DEFENSES[defense].config_class)}


def _list(value, where: str) -> list:
    if not isinstance(value, list):
        raise RnpError(f"{where!r} must be a list, got {value!r}")
    return value


def _mapping(value, where: str) -> dict:
    if not isinstance(value, dict):
        raise RnpError(f"{where!r} must be a mapping, got {value!r}")
    return value


def _int(value, where: str, *, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise RnpError(f"{where!r} takes integers >= {minimum}, got {value!r}")
    return value


def _bool(value, where: str) -> bool:
    """A YAML boolean; the string "false" is refused rather than read as true."""
    if not isinstance(value, bool):
        raise RnpError(f"{where!r} takes true or false (unquoted), got {value!r}")
    return value


def _text(value, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise RnpError(f"{where!r} takes a non-empty string, got {value!r}")
    return value


def _folder(value, where: str) -> str | None:
    """An optional folder to write into: a string naming no existing file."""
    if value is None:
        return None
    if Path(_text(value, where)).expanduser().is_file():
        raise RnpError(f"{where!r} names a folder, but {value} is a file")
    return value


def _check_types(config_class, settings: dict, where: str) -> None:
    """Each setting has the type its dataclass field declares (int, float, bool, str, None,
    tuples of them; other types are left to the class): a wrong type fails here, in one line,
    not as a traceback hours into the run."""
    hints = typing.get_type_hints(config_class)
    for name, value in settings.items():
        if name in hints and not _fits(value, hints[name]):
            raise RnpError(f"{where}.{name} takes {_type_name(hints[name])}, got {value!r}")


def _fits(value, hint) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, arg) for arg in args)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            return False
        items = args[:1] * len(value) if args[-1:] == (Ellipsis,) else args
        return len(items) == len(value) and all(_fits(v, a) for v, a in zip(value, items))
    if hint is bool:
        return isinstance(value, bool)
    if hint in (int, float):
        return not isinstance(value, bool) and isinstance(value, int if hint is int else (int, float))
    if hint in (str, type(None)):
        return isinstance(value, hint)
    return True


def _type_name(hint) -> str:
    names = {bool: "true or false (unquoted)", int: "an integer", float: "a number", str: "a string",
             type(None): "null"}
    if hint in names:
        return names[hint]
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(arg) for arg in args)
    if origin is tuple:
        items = {int: "integers", float: "numbers", str: "strings", bool: "booleans"}.get(args[0], "values")
        return f"a list of {items}" if args[-1:] == (Ellipsis,) else f"a list of {len(args)} {items}"
    return getattr(hint, "__name__", str(hint))


def _hash(description: dict) -> str:
    return hashlib.sha256(json.dumps(description, sort_keys=True, default=str).encode()).hexdigest()[:16]
