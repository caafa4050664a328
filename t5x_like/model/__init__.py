"""The model: layers and networks, the two families (decoder-only, encoder-decoder) with
their loss, scores and data form, KV-cache decoding, the sharding rules, and the FLOPs
and device peaks that MFU is measured against. Imports `data` (the data forms' feature
converters), never what trains or evaluates it."""
