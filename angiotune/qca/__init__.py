"""QCA from a segment mask: centerline, diameter function, reference, MLD, %DS, length in mm."""

from angiotune.qca.measure import QCAError, QCAResult, QCASettings, measure

__all__ = ["QCAError", "QCAResult", "QCASettings", "measure"]
