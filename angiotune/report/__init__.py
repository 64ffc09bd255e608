"""``angiotune report``: one self-contained HTML page about a finished search."""

from angiotune.report.page import write_report

__all__ = ["write_report"]
