"""A batch-1 decode step as one persistent kernel (Pallas Mosaic GPU, Hopper); see mosaic_step."""
from pallas_kernels.decode_step.mosaic_step import Attention, Phase, Vector, run_phases

__all__ = ["Attention", "Phase", "Vector", "run_phases"]
