"""afmrl_jax: attribute-enhanced fine-grained multimodal representation learning in JAX/Flax."""
