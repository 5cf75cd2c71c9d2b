"""The ledger: one row per object per job. ``repo`` is the only module that queries it."""
