"""Offline data preparation: tokenization to shards, SFT records, the demo corpus."""
