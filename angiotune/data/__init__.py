"""Data layer: phantoms, core-lab export -> Parquet index, readers, the Ray Data stream."""
