"""Recipes: procedures of several runs built from training and evaluation. DoReMi
(reference and proxy runs, then a mixture file) and rejection sampling (best-of-N samples
scored by a reward model, kept as a SeqIO task to fine-tune on)."""
