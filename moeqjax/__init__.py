"""moeqjax: quantization-aware fine-tuning of MoE language models in JAX."""
