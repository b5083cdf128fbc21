"""Serving: packed checkpoints, inference from packed weights, KV-cache decoding and sampling."""

from moeqjax.serve.checkpoint import PackedCheckpointError
from moeqjax.serve.checkpoint import PackedModel
from moeqjax.serve.checkpoint import load_packed
from moeqjax.serve.checkpoint import pack
from moeqjax.serve.decode import Generation
from moeqjax.serve.decode import forward_cached
from moeqjax.serve.decode import generate
from moeqjax.serve.decode import init_cache
from moeqjax.serve.sampling import SamplingConfig
from moeqjax.serve.sampling import sample
from moeqjax.serve.switch_decode import init_switch_cache
from moeqjax.serve.switch_decode import switch_generate
from moeqjax.serve.switch_decode import switch_greedy
