"""Corpus readers, cleaning, pretokenization and the demo corpus."""
