"""SeqIO task and mixture registrations. Importing this package registers them (no I/O)."""
from tasks import chat, gatt, learned, preference, reka_mix  # noqa: F401  (registers at import)
