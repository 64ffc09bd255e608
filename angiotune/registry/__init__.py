"""Best adapters per vessel: atomic, checksummed entries under results/best/."""
