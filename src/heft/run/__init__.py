"""A run: the pipeline of stages, the run folder it writes, its typed records, the folder lock and atomic file writes."""
