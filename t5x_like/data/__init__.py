"""Data, from text to rows: vocabularies, mixtures and the shipped tasks' building blocks
(UL2's denoisers, preference pairs), SeqIO pipelines and packing, ArrayRecord stores and
their preparation, streaming workers, deduplication. Imports nothing else of the package
but `launch` and `process`."""
