"""The DenseSM network: its declared architecture and the engines that run it.

- ``spec``: ``ArchSpec``, the architecture every engine builds from (stored in the weights);
- ``model``: the reference ``nn.Module``s (``DenseSM``, ``DenseSME``), the authors' layout;
- ``reference``: those modules behind the engines' interfaces; they cover every spec;
- ``stacked`` (with ``ops``, ``conv_stage``, ``dense_stage``): all members trained as stacked
  tensors, C kernels on CPU (``native``, ``_convstage.c``); the default spec;
- ``fused``: inference with folded batch norms, C convolutions on CPU; the default spec;
- ``engines``: the dispatchers, the fastest engine whose ``covers(arch, mode)`` holds.
"""

from msda.network.spec import DEFAULT_ARCH, ArchSpec

__all__ = ["DEFAULT_ARCH", "ArchSpec"]
