"""Several clients, one trunk (SplitFed): everything federated lives in this folder.

- :mod:`.settings`: what ``model.federated`` means (FedSGD or FedAvg, rounds, client sampling, weighting).
- :mod:`.averaging`: where a client-side average is computed (in process, a torchrun group, secure aggregation).
- :mod:`.secagg`: pairwise-masked secure aggregation over TCP and its threat model.

A new aggregation rule is a setting in :mod:`.settings` plus its client half and trunk half in this folder.
"""

from .averaging import Averager, DistAverager, LocalAverager, flatten, unflatten_into
from .partition import PARTITIONS, PartitionMethod, partition  # noqa: F401  (each client's shard of the rows)
from .secagg import (CONTEXT, KEY_BYTES, SCALE_BITS, KeyPair, Masker, SecureAverager, aggregate, decode, encode, mask,
                     mask_stream, pair_context)
from .settings import AVERAGES, TRUNK_UPDATES, WEIGHTINGS, FederatedSettings, round_half_up

__all__ = ["AVERAGES", "CONTEXT", "KEY_BYTES", "SCALE_BITS", "TRUNK_UPDATES", "WEIGHTINGS", "Averager", "DistAverager",
           "FederatedSettings", "KeyPair", "LocalAverager", "Masker", "SecureAverager", "aggregate", "decode", "encode",
           "flatten", "mask", "mask_stream", "pair_context", "round_half_up", "unflatten_into"]
