"""Configuration: the typed schema of a run, loading it from YAML and dotted overrides, `--help` text, suites."""
