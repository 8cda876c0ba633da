"""Data sets from local files, and the one resolver every command uses to turn a data spec into tensors."""
