"""SAM 3 base models (embedded tiny or a local checkpoint), adapters and losses."""
