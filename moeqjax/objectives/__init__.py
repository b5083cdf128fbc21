"""Losses: LM cross-entropy, teacher reconstruction, routing alignment, and their weighted sum (decoder-only and encoder-decoder)."""

from moeqjax.objectives.distill import block_reconstruction, kl_divergence, logits_kd
from moeqjax.objectives.joint import LossWeights, loss_terms, total_loss
from moeqjax.objectives.lm import cross_entropy, token_nll
from moeqjax.objectives.routing_align import structure_alignment, value_alignment
from moeqjax.objectives.seq2seq import masked_mean, seq2seq_loss_terms
