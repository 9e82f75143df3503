"""Generated code for package dsjax.v1: `dsjax_pb2` (public Generation API), `worker_pb2` (internal
router/worker services) and their `_grpc` stubs."""
