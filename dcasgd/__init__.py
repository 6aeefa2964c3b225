"""dcasgd: a sharded ZeroMQ parameter server for asynchronous SGD with delay compensation."""

from .client import Client, DcasgdError, HandshakeError, ServerError, ShardTimeout
from .layout import FlatLayout, shard_ranges
from .optim import DistributedOptimizer
from .rules import MODES, RuleConfig

__all__ = [
    "MODES",
    "Client",
    "DcasgdError",
    "DistributedOptimizer",
    "FlatLayout",
    "RuleConfig",
    "ServerError",
    "ShardTimeout",
    "HandshakeError",
    "shard_ranges",
]
__version__ = "0.1.0"
