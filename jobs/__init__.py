"""The GPU pool: resource classes, workers, jobs, scheduler, dispatch and recipes."""
