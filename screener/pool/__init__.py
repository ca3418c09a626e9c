"""The candidate pool: hypothetical compounds made by ionic substitution and relaxed, for DFT to label."""
