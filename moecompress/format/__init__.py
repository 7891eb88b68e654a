"""The on-disk format: tensor names, the `quantization_config` schema, byte accounting, bit packing.

Imported by both the compression side and the runtime; imports neither.
"""
