"""Data tools: readers, filters, dedup, classifiers, tokenization, synthesis."""
