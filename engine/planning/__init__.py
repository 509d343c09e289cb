"""Memory planning: hardware probe, estimate, dry-run probe, planner and `peregrine profile`."""
