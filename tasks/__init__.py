"""SeqIO task and mixture registrations. Importing this package registers them (no I/O)."""
