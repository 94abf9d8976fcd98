"""A run's record: the run log, the report (curves and plot), the model card an export writes."""
