"""The dsjax.v1 protos and their generated code (regenerate with `python -m serving.proto.regen`)."""
