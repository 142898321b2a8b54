"""`heft tune`: Optuna studies over a run config's fields, scored on the dev split, with any number of workers."""
