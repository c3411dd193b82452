"""The DenseSM network: its declared architecture (``ArchSpec``) and the engines that run it.

``spec``: the architecture every engine builds from. ``reference``: the plain PyTorch modules
as a trainer and an inference engine that cover every spec (the fallback of the fast engines,
msda.stacked, msda.predict.FusedEnsemble and msda.native, which cover the default spec only).
"""

from msda.network.spec import DEFAULT_ARCH, ArchSpec

__all__ = ["DEFAULT_ARCH", "ArchSpec"]
