"""Datasets: raw on-disk formats, WebDataset shards, and the reader pipeline."""
