"""t5x_like: a JAX training stack for PaLM/Llama decoder-only and UL2 encoder-decoder LMs."""
