"""The weight stream of a persistent decode step (Pallas Mosaic GPU, Hopper); see mosaic_stream."""
from pallas_kernels.weight_stream.mosaic_stream import stream_weights

__all__ = ["stream_weights"]
