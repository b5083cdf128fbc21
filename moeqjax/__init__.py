"""moeqjax: quantization-aware fine-tuning of MoE language models in JAX."""


def __getattr__(name):
  # Lazy, so that `import moeqjax` stays light (no jax import until a model is needed).
  if name == "from_hf":
    from moeqjax.convert import from_hf
    return from_hf
  raise AttributeError(f"module 'moeqjax' has no attribute {name!r}")
