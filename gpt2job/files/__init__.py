"""The files layer: prompts in (read, validate, convert), results out (the journal and the HDF5 output), show,
validate, and what the user sees while a job runs (progress, summary)."""
