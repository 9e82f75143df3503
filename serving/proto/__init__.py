"""The dsjax.v1 protos and their generated code (regenerate with `python -m serving.proto.regen`)."""

from serving.proto.dsjax.v1 import dsjax_pb2 as _pb

# The public streaming service's full name (what health checks ask about).
GENERATION_SERVICE = _pb.DESCRIPTOR.services_by_name["Generation"].full_name
