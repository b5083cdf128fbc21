"""Training: state, the jitted step (with router statistics), optimizer, loop and checkpoints."""

from moeqjax.train.checkpoint import Checkpointer
from moeqjax.train.loop import (CheckpointExists, Interrupted, LoopConfig, NonFiniteLoss,
                                TrainingStopped, run_training)
from moeqjax.train.optim import (OptimConfig, decay_mask, lr_schedule, make_optimizer,
                                 project_params)
from moeqjax.train.progressive import progressive_step
from moeqjax.train.router_stats import init_router_stats, router_row_norms, update_router_stats
from moeqjax.train.seq2seq_step import (batch_arrays, jit_seq2seq_step, seq2seq_losses,
                                         seq2seq_train_step)
from moeqjax.train.state import TrainState, create_state, with_quant
from moeqjax.train.step import jit_train_step, train_step
