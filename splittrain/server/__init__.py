"""The trunk server: runs the trunk for its clients and steps its optimizer when they say so.

The same :class:`TrunkServer` sits behind every transport. It takes a trunk :class:`~splittrain.segments.Segment`
and never the client's code. Clients cannot touch each other: each independent client trains its own trunk LoRA
adapter (a :class:`TrunkAdapter`: peft adapter, AdamW, schedule, step counter, checkpoint folder ``trunk/<client>/``)
over the one frozen trunk, so N fine-tunes hold the base weights once; the clients of a federation share the
federation's adapter (``trunk/``), and only its members may train it. Everything else a client does lives in its
session, named by the client's authenticated name, one live session per name: its graphs (bounded by count, bytes
and age), the last replies (a request repeated after a reconnect is answered again, never re-applied), its
generations' KV caches, and its unapplied gradients, which are dropped with the session when a client dies
mid-step. Checkpoints hold only what the server owns (an adapter's tensors, optimizer and scheduler state, step
counter) as safetensors, written atomically.

- :mod:`.trunk`: :class:`TrunkServer`, requests and the trunk's forward, backward and optimizer steps;
- :mod:`.adapters`: the trunk's LoRA adapters, one per owner;
- :mod:`.sessions`: clients' sessions, their bounds and timeouts;
- :mod:`.generation`: generations' KV caches;
- :mod:`.checkpoints`: the adapters' checkpoints;
- :mod:`.replicas`: several server processes for one trunk (``serve`` under torchrun), their collectives;
- :mod:`.settings`: :class:`TrunkSettings`, :class:`ServerLimits` and :func:`load_trunk`.

A federation's trunk half (membership, synchronisation points, secure-aggregation relay) is
:mod:`splittrain.federated.trunk`.
"""

from ..transport import SessionBusy
from .adapters import FEDERATION, TrunkAdapter, TrunkAdapters
from .checkpoints import LATEST, Checkpoints
from .generation import Generation, Generations
from .sessions import Graph, Session, Sessions
from .settings import ServerLimits, TrunkSettings, load_trunk
from .trunk import TrunkServer

__all__ = ["FEDERATION", "LATEST", "Checkpoints", "Generation", "Generations", "Graph", "ServerLimits", "Session",
           "SessionBusy", "Sessions", "TrunkAdapter", "TrunkAdapters", "TrunkServer", "TrunkSettings", "load_trunk"]
