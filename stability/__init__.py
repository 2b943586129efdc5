"""Everything that keeps training healthy: trainer, guards, data, checkpoints, CLI."""
