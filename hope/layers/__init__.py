"""Layers of a Hope block: the Titans and attention mixers, the CMS, and shared pieces."""
from .attention import AttentionMixer
from .cms import CMS, CMSLevel
from .common import RMSNorm, ShortConv
from .titans_mixer import TitansMixer

__all__ = ["AttentionMixer", "CMS", "CMSLevel", "RMSNorm", "ShortConv", "TitansMixer"]
