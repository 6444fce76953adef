"""Shape search: choose the pruned shape by measured speed on the target provider and a fast
quality proxy (the paper's hardware co-design, section 4.1, measured instead of simulated)."""
