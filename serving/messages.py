"""Conversions between the engine's Python objects and the dsjax.v1 messages (no jax)."""

from __future__ import annotations

from dsjax.engine.request import FinishReason, Request
from dsjax.engine.sampling_params import SamplingParams
from serving.proto.dsjax.v1 import dsjax_pb2 as pb
from serving.proto.dsjax.v1 import worker_pb2 as wpb

FINISH_TO_PROTO = {
    FinishReason.LENGTH: pb.LENGTH,
    FinishReason.STOP: pb.STOP,
    FinishReason.EOS: pb.EOS,
    FinishReason.CANCELLED: pb.CANCELLED,
}
FINISH_FROM_PROTO = {v: k for k, v in FINISH_TO_PROTO.items()}


def sampling_to_proto(sp: SamplingParams) -> pb.SamplingParams:
    """Every field set (workers get resolved parameters; `seed` travels in WorkerRequest)."""
    return pb.SamplingParams(
        max_tokens=sp.max_tokens, temperature=sp.temperature, top_p=sp.top_p, top_k=sp.top_k,
        stop_token_ids=list(sp.stop_token_ids), stop=list(sp.stop), ignore_eos=sp.ignore_eos,
    )


def sampling_from_worker_proto(msg: pb.SamplingParams) -> SamplingParams:
    return SamplingParams(
        max_tokens=msg.max_tokens, temperature=msg.temperature, top_p=msg.top_p, top_k=msg.top_k,
        stop_token_ids=tuple(msg.stop_token_ids), ignore_eos=msg.ignore_eos,
    )


def worker_request(request_id: str, prompt: list[int], output: list[int], sampling: SamplingParams, seed: int,
                   eos_token_ids: tuple[int, ...]) -> wpb.WorkerRequest:
    return wpb.WorkerRequest(
        request_id=request_id, prompt_token_ids=prompt, output_token_ids=output, sampling=sampling_to_proto(sampling),
        seed=seed, eos_token_ids=eos_token_ids,
    )


def request_from_proto(msg: wpb.WorkerRequest) -> Request:
    """An engine Request carrying the tokens generated so far (stop strings stay on the router)."""
    return Request(
        request_id=msg.request_id, prompt_token_ids=list(msg.prompt_token_ids), output_token_ids=list(msg.output_token_ids),
        sampling=sampling_from_worker_proto(msg.sampling), seed=msg.seed,
        eos_token_ids=tuple(msg.eos_token_ids),
    )


def host_time_fields(runner) -> dict:
    """InstanceStats' host-time counters of an emulated runner (dsjax/runtime/emulated.py): decode
    steps that continued ready requests, prompt batches, and the device time lost before each.
    Real runners keep no device timeline: zeros."""
    return {"continued_steps": getattr(runner, "continued_steps", 0), "host_gap_seconds": getattr(runner, "host_gap_s", 0.0),
            "prefill_launches": getattr(runner, "prefill_launches", 0),
            "prefill_host_gap_seconds": getattr(runner, "prefill_host_gap_s", 0.0)}
