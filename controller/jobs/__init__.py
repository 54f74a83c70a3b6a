"""Jobs: the command/job ledger, model distribution and the model catalogue."""
