"""The synthetic concept world (probe, target, truth) and its source model."""
