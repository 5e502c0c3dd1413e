"""kafka-pipeline: pipes-and-filters stream processing on Apache Kafka.

The public API is re-exported here; everything else is internal.
"""

from pipeline.config import Settings
from pipeline.errors import PipelineError

__all__ = ["PipelineError", "Settings"]
