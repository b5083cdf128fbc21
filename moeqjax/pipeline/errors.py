"""The errors a pipeline phase raises for bad user input (printed as one line) or a stopped run."""

from moeqjax.alloc.allocation import AllocationError
from moeqjax.convert import ConvertError
from moeqjax.data import DataError
from moeqjax.pipeline.config import ConfigError
from moeqjax.serve import PackedCheckpointError
from moeqjax.train import TrainingStopped
from moeqjax.train.mesh import MeshError

# Each says what was wrong and how to fix it: the CLI prints it without a traceback.
USER_ERRORS = (ConfigError, AllocationError, DataError, ConvertError, PackedCheckpointError,
               MeshError)

__all__ = ["USER_ERRORS", "TrainingStopped"]
