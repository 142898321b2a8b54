"""What training cannot change, computed once: the frozen token prefix, the frozen lower layers, kept keys/values, a study's shared stages."""
