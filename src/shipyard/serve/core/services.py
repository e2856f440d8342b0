"""What the transports call: the data plane and its extensions, as one object built by the composition root."""

from __future__ import annotations

from dataclasses import dataclass

from shipyard.serve.core.dataplane import DataPlane
from shipyard.serve.core.generation import TextGeneration
from shipyard.serve.core.management import Management
from shipyard.serve.core.serverwide import ServerWide


@dataclass(frozen=True)
class Services:
    dataplane: DataPlane  # health, metadata, configuration, statistics, inference
    generation: TextGeneration  # language models: token by token
    management: Management  # the repository extension
    wide: ServerWide  # readiness, statistics, repository changes, drift and feedback for every worker
