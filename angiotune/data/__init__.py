"""Data layer: phantoms, ingest of core-lab exports into a Parquet index, readers, the Ray Data stream."""
