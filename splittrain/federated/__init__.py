"""Several clients, one trunk (SplitFed): everything federated lives in this folder.

- :mod:`.settings`: what ``model.federated`` means (FedSGD or FedAvg, rounds, client sampling, weighting).
- :mod:`.averaging`: where a client-side average is computed (in process, a torchrun group, secure aggregation).
- :mod:`.secagg`: pairwise-masked secure aggregation over TCP and its threat model.
- :mod:`.partition`: each client's shard of the rows (iid, label skew, by column).
- :mod:`.client`: the client half (the clients one process holds, their steps and averages).
- :mod:`.trunk`: the trunk half on the server (who takes part, synchronisation points, the shared adapter's steps,
  the key and aggregate relay).

A new aggregation rule is a setting in :mod:`.settings` plus its client half (:mod:`.client`) and trunk half
(:mod:`.trunk`), all in this folder. The two halves are imported from their modules (not re-exported here): the
server imports this package, and each half imports its party's code.
"""

from .averaging import Averager, DistAverager, LocalAverager, flatten, unflatten_into
from .partition import PARTITIONS, PartitionMethod, partition
from .secagg import (CONTEXT, KEY_BYTES, SCALE_BITS, KeyPair, Masker, SecureAverager, aggregate, decode, encode, mask,
                     mask_stream, pair_context)
from .settings import AVERAGES, TRUNK_UPDATES, WEIGHTINGS, FederatedSettings, round_half_up

__all__ = ["AVERAGES", "CONTEXT", "KEY_BYTES", "SCALE_BITS", "TRUNK_UPDATES", "WEIGHTINGS", "Averager", "DistAverager",
           "FederatedSettings", "KeyPair", "LocalAverager", "Masker", "PARTITIONS", "PartitionMethod", "SecureAverager",
           "aggregate", "decode", "encode", "flatten", "mask", "mask_stream", "pair_context", "partition", "round_half_up",
           "unflatten_into"]
