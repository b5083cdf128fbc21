"""Evaluation: held-out loss, routing consistency, expert load, true memory, reports and plots."""

from moeqjax.eval.lm_eval import evaluate_lm
from moeqjax.eval.memory_report import expert_shapes, model_memory
from moeqjax.eval.routing_metrics import expert_load, load_drift_kl, routing_agreement
from moeqjax.eval.seq2seq_eval import evaluate_seq2seq, seq2seq_routing_agreement
from moeqjax.eval.variants import REFERENCE, evaluate_variants
