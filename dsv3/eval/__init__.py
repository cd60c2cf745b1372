"""dsv3.eval: the evaluation suite (perplexity, generation metrics, multiple choice,
safety probes, dynamic difficulty, built-in tasks from the embedded corpus)."""
