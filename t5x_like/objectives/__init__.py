"""Objectives on top of a model family: Llama 2's reward model, DPO, and DoReMi's Group
DRO proxy. Each is a model (the same contract as `model.families`) that wraps a family's
network and replaces its loss."""
