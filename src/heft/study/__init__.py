"""Studies: strategies compared over seeds, the report with paired tests, plots."""
