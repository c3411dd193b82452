"""msda: 50 m soil moisture from Sentinel-1 by multi-scale domain adaptation of DenseSM-E."""

__version__ = "0.1.0"

import os as _os

# OpenMP threads wait passively: on a machine other processes keep busy, spinning threads lose
# their cores to each other (a training step 3 x, prediction 7 x slower with OpenMP's default
# spin); on an idle one passive waiting costs 0-5 % (benchmarks/contention.py). OpenMP reads the
# policy when PyTorch loads it, so it is set before the imports below; a policy or spin count of
# your own is kept.
if not {"OMP_WAIT_POLICY", "GOMP_SPINCOUNT"} & set(_os.environ):
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
