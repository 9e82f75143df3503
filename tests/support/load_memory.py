"""Memory of loading a model onto a TP mesh, measured in a fresh process on 8 fake CPU devices
(docs/weights.md, "Sharded loading"; tests/runtime/test_sharded_loading.py runs it).

    python -m tests.support.load_memory write DIR                 # a ~200 MB float32 llama checkpoint
    python -m tests.support.load_memory measure DIR --tp 4        # one JSON line of figures
    python -m tests.support.load_memory measure DIR --tp 4 --path whole   # the old path, for comparison

`measure` loads one TP instance's weights onto a mesh of `tp` devices (`shard_stage_params`, what
ModelRunner calls for each stage) and reports the model's bytes (every weight once), each
device's bytes (sum of `shard.data.nbytes` over all params), and the process's peak RSS while
loading above the RSS just before (Linux: /proc/self/status VmHWM after resetting it with
/proc/self/clear_refs; elsewhere ru_maxrss, which includes start-up). The same calls on a tiny
model come first, so the baseline already has the code they run paged in.
On fake CPU devices device buffers are host memory, so the RSS counts every device's shards too.
Paths: `sharded` (the checkpoint's WeightSource: each tensor read straight onto the mesh),
`dummy` (random weights made sharded), `whole` (before: the whole checkpoint loaded onto the
default device, then resharded, the unsharded copy kept as the launcher kept it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

# Llama-shaped, float32: 12 layers of 4.0M parameters, 2.1M in embeddings and head: 49.3M, 197 MB.
BIG_LLAMA = dict(vocab_size=2048, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                 num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512)


def llama_tensor_shapes(c: dict) -> dict[str, tuple[int, ...]]:
    """HF LlamaForCausalLM tensor names and shapes for config `c`."""
    e, f, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    d = e // c["num_attention_heads"]
    kv = c["num_key_value_heads"] * d
    shapes = {"model.embed_tokens.weight": (v, e), "model.norm.weight": (e,), "lm_head.weight": (v, e)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (e,), p + "post_attention_layernorm.weight": (e,),
            p + "self_attn.q_proj.weight": (e, e), p + "self_attn.k_proj.weight": (kv, e),
            p + "self_attn.v_proj.weight": (kv, e), p + "self_attn.o_proj.weight": (e, e),
            p + "mlp.gate_proj.weight": (f, e), p + "mlp.up_proj.weight": (f, e), p + "mlp.down_proj.weight": (e, f),
        })
    return shapes


def write_checkpoint(model_dir: Path, config: dict = BIG_LLAMA) -> Path:
    """config.json + model.safetensors of random float32 weights (safetensors' numpy API)."""
    from safetensors.numpy import save_file

    model_dir.mkdir(parents=True, exist_ok=True)
    hf = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_act": "silu", "rms_norm_eps": 1e-5,
          "tie_word_embeddings": False, "bos_token_id": 256, "eos_token_id": 257, "torch_dtype": "float32", **config}
    (model_dir / "config.json").write_text(json.dumps(hf, indent=1))
    rng = np.random.default_rng(0)
    tensors = {name: (np.ones(shape, np.float32) if len(shape) == 1 else
                      rng.standard_normal(shape, dtype=np.float32) * 0.02)
               for name, shape in llama_tensor_shapes(config).items()}
    save_file(tensors, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    return model_dir


def _status_bytes(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def _maxrss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def measure(model_dir: str, tp: int, path: str) -> dict:
    import jax

    from dsjax.engine.placement import PhaseParallel
    from dsjax.runtime.builder import load_causal_lm
    from dsjax.runtime.sharding import instance_meshes, shard_stage_params
    from models.config import get_preset
    from models.transformer import CausalLM
    from models.weights import WeightSource, load_hf_checkpoint

    devices = jax.devices()
    mesh = instance_meshes(devices[:tp], PhaseParallel(tp=tp)).meshes[0]
    # Warm-up: the same calls on a tiny model, so that the code they run (jaxlib's transfer paths,
    # numpy's) is paged in and allocator pools exist before the baseline.
    tiny_config = dataclasses.replace(get_preset("tiny-llama"), num_heads=tp, num_kv_heads=tp)
    tiny, tiny_weights = CausalLM(config=tiny_config), WeightSource(tiny_config, "float32")
    layers = tiny_config.num_layers
    jax.block_until_ready([shard_stage_params(tiny, tiny_weights, mesh, 0, layers),
                           shard_stage_params(tiny, tiny_weights.load(), mesh, 0, layers)])
    model, weights = load_causal_lm(model_dir, dtype="float32", dummy_weights=path == "dummy", backend="xla")
    model.abstract_params()  # tracing caches, outside the measurement
    exact = _reset_peak() and _status_bytes("VmHWM") is not None
    base = _status_bytes("VmRSS") if exact else _maxrss_bytes()
    full = None
    layers = model.config.num_layers
    start = time.perf_counter()
    if path == "whole":  # before: the whole model on the default device, resharded, and kept
        full = load_hf_checkpoint(model_dir, dtype="float32")[1]
        params = shard_stage_params(model, full, mesh, 0, layers)
    else:  # what ModelRunner does with a WeightSource
        params = shard_stage_params(model, weights, mesh, 0, layers)
    jax.block_until_ready(params)
    seconds = time.perf_counter() - start
    peak = (_status_bytes("VmHWM") if exact else _maxrss_bytes()) - base
    leaves = jax.tree.leaves(params)
    model_bytes = sum(x.nbytes for x in leaves)
    per_device = {d.id: 0 for d in devices}
    for x in leaves + jax.tree.leaves(full):
        for shard in x.addressable_shards:
            per_device[shard.device.id] += shard.data.nbytes
    return {"path": path, "tp": tp, "model_bytes": model_bytes, "per_device_bytes": per_device,
            "max_device_ratio": max(per_device.values()) / model_bytes, "peak_rss_bytes": peak,
            "peak_rss_ratio": peak / model_bytes, "rss_method": "VmHWM after clear_refs" if exact else "ru_maxrss",
            "baseline_rss_bytes": base, "load_s": round(seconds, 3)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("write")
    w.add_argument("dir")
    m = sub.add_parser("measure")
    m.add_argument("dir")
    m.add_argument("--tp", type=int, default=4)
    m.add_argument("--path", choices=["sharded", "dummy", "whole"], default="sharded")
    args = ap.parse_args(argv)
    if args.cmd == "write":
        print(write_checkpoint(Path(args.dir)))
        return 0
    if "jax" in sys.modules:
        raise SystemExit("measure needs a fresh process (8 fake devices are set before jax is imported)")
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
    print(json.dumps(measure(args.dir, args.tp, args.path)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
