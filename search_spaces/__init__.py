"""The shipped search spaces. This folder is installed as the package
``angiotune.search_spaces`` (see pyproject.toml), so that ``--space lora_rank.yaml`` finds
them in a wheel install as in a source checkout."""
