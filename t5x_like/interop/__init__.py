"""Interoperability: Hugging Face Llama and Mistral weights in and out (`hf`)."""
