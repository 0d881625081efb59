"""Step 2b: the D-Cube classifier head on selected hyper-features, its losses and trainer."""
