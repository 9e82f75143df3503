"""dsjax's gRPC serving layer: the router (public `dsjax.v1.Generation` endpoint), prefill and decode
worker processes, KV transfer between them, metrics. Entry points: `python -m dsjax.serve`,
`python -m dsjax.client`; docs/serving.md describes the processes and the wire format."""
