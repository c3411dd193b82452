"""The records of an experiment run, shared by ``msda.experiment`` (which makes them) and
``msda.report`` (which reads them): the protocol and its tasks, the inputs and their
fingerprints, a finished task's file and the run's ``protocol.json``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from msda.errors import MsdaError
from msda.io import file_fingerprint
from msda.network.model import member_name
from msda.settings import DOMAIN_LOSS_NAMES, LossWeights, TrainSettings

METHODS = ("pretrained", "finetune", "ms", "da", "msda")
PAPER_NS = (1, 5, 9, 13, 17, 21, 29, 37, 45)
ALPHA_METHODS = ("ms", "msda")  # the methods whose loss has an alpha
QUICK_MEMBERS = tuple(member_name(d, 16) for d in (1, 2, 3, 4, 5))  # the width-16 member of each depth
N_STRIPS = 6
SAMPLES = {"n": "samples"}  # in result tables, n is the number of training stations


class ExperimentError(MsdaError):
    """Bad protocol, inputs, or a failed task."""


# ----- protocol -----------------------------------------------------------------------------
TRAIN_FIELDS = ("epochs", "batch", "lr", "average_last")  # the TrainSettings a protocol sets (seed and device per task)


@dataclass(frozen=True)
class Protocol:
    """What to run: N x repeats x methods x alphas, and the settings every fit shares.

    ``train``: epochs, batch, learning rate and weight averaging of every fit (each task's seed
    and device are its own). ``loss``: the domain loss; alpha and beta come from each task's
    method (``LossWeights.for_method``). ``Protocol.make`` takes those settings by name.
    """

    network: str = "SCAN"
    ns: tuple[int, ...] = PAPER_NS
    repeats: int = 10
    methods: tuple[str, ...] = METHODS
    alphas: tuple[float, ...] = (0.7,)
    train: TrainSettings = field(default_factory=TrainSettings)
    loss: LossWeights = field(default_factory=LossWeights)
    members: tuple[str, ...] = ()  # empty: every member of the weights
    seed: int = 0
    quick: bool = False

    @classmethod
    def make(cls, **settings) -> "Protocol":
        """A protocol from flat settings: its own fields, ``epochs``, ``batch``, ``lr`` and
        ``average_last`` (into ``train``) and ``domain_loss`` (into ``loss``)."""
        train = {k: settings.pop(k) for k in TRAIN_FIELDS if k in settings}
        loss = {"domain_loss": settings.pop("domain_loss")} if "domain_loss" in settings else {}
        unknown = sorted(set(settings) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ExperimentError(f"unknown protocol setting(s) {unknown}")
        base = settings.pop("train", TrainSettings())
        base_loss = settings.pop("loss", LossWeights())
        settings = {k: tuple(v) if isinstance(v, list) else v for k, v in settings.items()}
        return cls(train=dataclasses.replace(base, **train), loss=dataclasses.replace(base_loss, **loss), **settings)

    @classmethod
    def from_dict(cls, d: dict) -> "Protocol":
        """The protocol a run record holds (``to_dict``; also the flat layout of older records)."""
        d = dict(d)
        train = d.pop("train", None) or {}
        loss = d.pop("loss", None) or {}
        train = {k: train[k] for k in TRAIN_FIELDS if k in train}
        return cls.make(**d, **train, **({"domain_loss": loss["domain_loss"]} if "domain_loss" in loss else {}))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["train"] = {k: d["train"][k] for k in TRAIN_FIELDS}
        d["loss"] = {"domain_loss": self.loss.domain_loss}
        return d

    @classmethod
    def quick_run(cls, **changes) -> "Protocol":
        """The demo's protocol: 5 members, 8 epochs, N in 1, 5, 21, 3 repeats (minutes on 2 cores)."""
        base = dict(ns=(1, 5, 21), repeats=3, epochs=8, average_last=3, members=QUICK_MEMBERS, quick=True)
        return cls.make(**{**base, **changes})

    def task_settings(self, task: "Task", seed: int, device: str) -> tuple[LossWeights, TrainSettings]:
        """The loss weights and train settings of one task's fit."""
        weights = LossWeights.for_method(task.method, task.alpha, None, self.loss.domain_loss)
        return weights, dataclasses.replace(self.train, seed=seed, device=device)

    def check(self, n_stations: int | None = None) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ExperimentError(f"unknown method {unknown[0]!r}; choose from {', '.join(METHODS)}")
        if not self.methods:
            raise ExperimentError("no methods to run")
        if not self.ns or min(self.ns) < 1:
            raise ExperimentError(f"every N must be >= 1, got {list(self.ns)}")
        if self.repeats < 1:
            raise ExperimentError(f"repeats must be >= 1, got {self.repeats}")
        bad = [a for a in self.alphas if not 0.0 <= a <= 1.0]
        if bad or not self.alphas:
            raise ExperimentError(f"alpha must lie in [0, 1], got {bad[0] if bad else 'none'}")
        for name, values in (("alpha", self.alphas), ("N", self.ns), ("method", self.methods)):
            twice = sorted({v for v in values if list(values).count(v) > 1})
            if twice:
                raise ExperimentError(f"{name} {twice[0]} is given twice")
        if self.loss.domain_loss not in DOMAIN_LOSS_NAMES:
            raise ExperimentError(f"unknown domain loss {self.loss.domain_loss!r}; choose {' or '.join(DOMAIN_LOSS_NAMES)}")
        if n_stations is not None and max(self.ns) >= n_stations:
            raise ExperimentError(
                f"network {self.network} has {n_stations} stations; N = {max(self.ns)} leaves no target station "
                f"(at most {n_stations - 1})"
            )

    def tasks(self) -> list["Task"]:
        out = [Task(0, 0, "pretrained", None)] if "pretrained" in self.methods else []
        for n in self.ns:
            for rep in range(self.repeats):
                for method in self.methods:
                    if method == "pretrained":
                        continue
                    for alpha in self.alphas if method in ALPHA_METHODS else (None,):
                        out.append(Task(n, rep, method, alpha))
        return out

    def station_seed(self, n: int, repeat: int) -> int:
        """The seed of the station draw of (N, repeat): the same for every method (paired runs)."""
        return int(np.random.SeedSequence([self.seed, n, repeat]).generate_state(1)[0])

    def fit_fields(self) -> dict:
        """The settings that change a task's result: a resumed run must not change them."""
        train = dataclasses.asdict(self.train)
        return {"network": self.network, **{k: train[k] for k in TRAIN_FIELDS}, "domain_loss": self.loss.domain_loss,
                "members": self.members, "seed": self.seed}


@dataclass(frozen=True)
class Task:
    n: int
    repeat: int
    method: str
    alpha: float | None

    @property
    def key(self) -> str:
        if self.method == "pretrained":
            return "pretrained"
        a = "" if self.alpha is None else f"_a{float(self.alpha)!r}"  # shortest exact form: 0.701, 0.7
        return f"n{self.n:03d}_r{self.repeat:02d}_{self.method}{a}"

    @property
    def variant(self) -> str:
        """The method with its alpha where it has one, e.g. ``msda (0.7)``."""
        return self.method if self.alpha is None else f"{self.method} ({self.alpha:g})"


@dataclass(frozen=True)
class Inputs:
    fine: str
    coarse: str
    weights: str
    schema: str | None = None


@lru_cache(maxsize=2)
def load_inputs(inputs: Inputs, members: tuple[str, ...]):
    """The fine and 9 km tables and the ensemble (its named members) of a run; read once per
    worker process."""
    from msda.schema import DEFAULT_SCHEMA, load_schema
    from msda.tables import read_samples
    from msda.weights import load_ensemble

    schema = DEFAULT_SCHEMA if inputs.schema is None else load_schema(inputs.schema)
    fine = read_samples(inputs.fine, "fine", schema)
    coarse = read_samples(inputs.coarse, "coarse", schema)
    ensemble = select_members(load_ensemble(inputs.weights, schema=schema), members, inputs.weights)
    return fine, coarse, ensemble


def select_members(ensemble, names: tuple[str, ...], source: str = "the weights"):
    """A DenseSM-E of the named members (all when ``names`` is empty)."""
    import copy

    from msda.network.model import DenseSME

    if not names:
        return ensemble
    missing = [n for n in names if n not in ensemble.names]
    if missing:
        raise ExperimentError(f"{source}: no member {missing[0]} (members: {', '.join(ensemble.names)})")
    keep = [ensemble.names.index(n) for n in names]
    sub = DenseSME([ensemble.specs[i] for i in keep], schema=ensemble.schema, arch=ensemble.arch)
    for j, i in enumerate(keep):
        sub.members[j] = copy.deepcopy(ensemble.members[i])
    sub.provenance = getattr(ensemble, "provenance", {})
    return sub


# ----- finished tasks and the run record -----------------------------------------------------
def read_task(path: Path) -> tuple[dict, np.ndarray]:
    """A finished task's metadata and ensemble-mean predictions; ExperimentError if unreadable."""
    try:
        table = pq.read_table(path)
        meta = json.loads(table.schema.metadata[b"msda"])
        pred = table.column("pred").to_numpy()
    except (OSError, KeyError, TypeError, ValueError, pa.ArrowException) as exc:
        raise ExperimentError(f"{path}: unreadable task file ({type(exc).__name__}: {exc})") from None
    if not isinstance(meta, dict) or "method" not in meta:
        raise ExperimentError(f"{path}: task file without its msda metadata")
    return meta, pred


def read_spread(path: Path) -> np.ndarray:
    """A finished task's member spread per row of the fine table (NaN for files without it)."""
    try:
        table = pq.read_table(path, columns=["spread"])
        return table.column("spread").to_numpy()
    except (OSError, KeyError, ValueError, pa.ArrowException):
        return np.full(pq.read_metadata(path).num_rows, np.nan)


def task_done(path: Path) -> bool:
    """True for a readable task file; an unreadable one (a kill, a full disk) is removed, to redo."""
    if not path.exists():
        return False
    try:
        pq.read_schema(path).metadata[b"msda"]
        return True
    except (OSError, KeyError, TypeError, pa.ArrowException):
        path.unlink(missing_ok=True)
        return False


def input_fingerprints(inputs: "Inputs") -> dict[str, str | None]:
    """What the fits depend on, by content: the tables' and schema's bytes, the weights' model
    (tensors, schema and members; not when or how they were made)."""
    from msda.weights import weights_fingerprint

    return {k: None if not v else weights_fingerprint(v) if k == "weights" else file_fingerprint(v)
            for k, v in dataclasses.asdict(inputs).items()}


def read_record(out: Path) -> dict:
    """``out/protocol.json``, or ExperimentError naming what is wrong with it."""
    path = out / "protocol.json"
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        raise ExperimentError(f"{out}: no protocol.json; not a run directory of msda experiment") from None
    except (OSError, ValueError) as exc:
        raise ExperimentError(f"{path}: unreadable ({exc}); use a new --out") from None
    if not isinstance(record, dict) or not isinstance(record.get("protocol"), dict):
        raise ExperimentError(f"{path}: malformed run record; use a new --out")
    return record


