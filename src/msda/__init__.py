"""msda: 50 m soil moisture from Sentinel-1 by multi-scale domain adaptation of DenseSM-E."""

__version__ = "0.1.0"

import os as _os

from msda.runtime import busy_cores as _busy_cores  # noqa: E402  (no PyTorch)

# On a machine other processes keep busy, OpenMP threads wait passively, leaving their cores to
# work (msda.runtime). OpenMP reads the policy when PyTorch loads it, so it is set before the
# imports below; on an idle machine spinning is faster (15-25 % on a training step), so kept.
if "OMP_WAIT_POLICY" not in _os.environ and _busy_cores(reads=3, interval=0.01) > 0:
    _os.environ["OMP_WAIT_POLICY"] = "PASSIVE"

from msda.errors import MsdaError, SchemaError, TableError, WeightsError  # noqa: E402
from msda.network.model import DenseSM, DenseSME, MemberSpec, default_members  # noqa: E402
from msda.schema import DEFAULT_SCHEMA, FeatureSchema, load_schema, table1  # noqa: E402
from msda.tables import Samples, read_samples, write_samples  # noqa: E402
from msda.weights import load_ensemble, save_ensemble  # noqa: E402
from msda.predict import Prediction, predict  # noqa: E402
from msda.runtime import configure_threads  # noqa: E402
from msda.samples import build_samples  # noqa: E402

__all__ = [
    "__version__",
    "MsdaError",
    "SchemaError",
    "TableError",
    "WeightsError",
    "DenseSM",
    "DenseSME",
    "MemberSpec",
    "default_members",
    "DEFAULT_SCHEMA",
    "FeatureSchema",
    "load_schema",
    "table1",
    "Samples",
    "read_samples",
    "write_samples",
    "load_ensemble",
    "save_ensemble",
    "Prediction",
    "predict",
    "configure_threads",
    "build_samples",
]
