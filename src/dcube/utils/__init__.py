"""Small shared helpers: atomic file writes, checkpoints, seeding, run metadata."""
