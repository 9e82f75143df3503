"""`python -m dsjax.training`: train the embedded default model (models/checkpoints/tiny-chat).

    pip install -e ".[train]"      # optax and safetensors
    python -m dsjax.training --out models/checkpoints/tiny-chat          # the committed model
    python -m dsjax.training --out /tmp/m --steps 20 --max-conversations 500   # a quick look

Steps: ShareGPT English prose -> byte-level BPE tokenizer -> packed rows -> AdamW on next-token
loss (JAX + optax, float32, on the CPU) -> a Hugging Face checkpoint: model.safetensors,
config.json, generation_config.json, tokenizer.json, tokenizer_config.json (with the chat
template), and training.json (settings, loss curve, wall time). docs/weights.md records the run.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from dsjax.training.corpus import (BOS, CHAT_TEMPLATE, END, PAD, CorpusConfig, documents, pack_rows, render,
                                   shuffled, train_tokenizer)
from dsjax.training.llama import LlamaShape


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m dsjax.training", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="checkpoint directory to write")
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=768)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--max-positions", type=int, default=1024, help="context length the checkpoint declares")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--max-conversations", type=int, default=60_000)
    p.add_argument("--tokenizer-chars", type=int, default=30_000_000, help="text the BPE tokenizer learns from")
    p.add_argument("--eval-rows", type=int, default=64, help="held-out rows for the final loss")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def _chat_renderer():
    from models.chat_template import render_chat_template

    return lambda messages: render_chat_template(CHAT_TEMPLATE, messages, bos_token=BOS, eos_token=END)


def build_data(args):
    from dsjax.workloads.sharegpt import iter_conversations

    corpus = CorpusConfig(max_conversations=args.max_conversations, seed=args.seed)
    chat = _chat_renderer()
    texts = [render(kind, doc, chat) for kind, doc in documents(iter_conversations(corpus.max_conversations), corpus)]
    texts = shuffled(texts, args.seed)
    budget, sample = args.tokenizer_chars, []
    for t in texts:
        if budget <= 0:
            break
        sample.append(t)
        budget -= len(t)
    tok = train_tokenizer(sample, args.vocab)
    encoded = [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]
    rows = pack_rows(encoded, args.seq_len, tok.token_to_id(PAD))
    stats = {"documents": len(texts), "characters": sum(map(len, texts)), "tokens": sum(map(len, encoded)),
             "rows": len(rows)}
    return tok, rows, stats


def train(args, rows, shape: LlamaShape):
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from tqdm import tqdm

    from dsjax.training.llama import init_params, loss_fn

    held_out, train_rows = rows.take(np.arange(args.eval_rows)), rows.take(np.arange(args.eval_rows, len(rows)))
    warmup = min(args.warmup, args.steps // 10)
    schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, warmup, args.steps, end_value=args.lr / 10)
    opt = optax.chain(optax.clip_by_global_norm(1.0),
                      optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=0.1,
                                  mask=lambda p: {k: v.ndim == 2 for k, v in p.items()}))
    params = init_params(shape, args.seed)
    state = opt.init(params)

    @jax.jit
    def step(params, state, t, s, p):
        loss, grads = jax.value_and_grad(loss_fn)(params, shape, t, s, p)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    evaluate = jax.jit(lambda params, t, s, p: loss_fn(params, shape, t, s, p))
    rng = np.random.default_rng(args.seed)
    curve, t0 = [], time.perf_counter()
    bar = tqdm(range(args.steps), desc="training", unit="step")
    for i in bar:
        batch = train_rows.take(rng.integers(0, len(train_rows), args.batch))
        params, state, loss = step(params, state, *(jnp.asarray(a) for a in (batch.tokens, batch.segments, batch.positions)))
        if i % 10 == 0 or i == args.steps - 1:
            curve.append((i, float(loss)))
            bar.set_postfix(loss=f"{float(loss):.3f}")
    wall = time.perf_counter() - t0
    eval_loss = float(evaluate(params, held_out.tokens, held_out.segments, held_out.positions))
    return params, {"train_seconds": round(wall, 1), "loss_curve": curve, "final_train_loss": curve[-1][1],
                    "held_out_loss": round(eval_loss, 4), "tokens_seen": args.steps * args.batch * args.seq_len}


def save(out: Path, tok, params, shape: LlamaShape, args, report: dict) -> None:
    import numpy as np
    from safetensors.numpy import save_file

    out.mkdir(parents=True, exist_ok=True)
    bos, end, pad = (tok.token_to_id(s) for s in (BOS, END, PAD))
    save_file({k: np.asarray(v, np.float32) for k, v in params.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    tok.save(str(out / "tokenizer.json"))
    write = lambda name, obj: (out / name).write_text(json.dumps(obj, indent=2) + "\n")  # noqa: E731
    write("config.json", shape.hf_config(max_positions=args.max_positions, bos_id=bos, eos_id=end, pad_id=pad))
    write("generation_config.json", {"bos_token_id": bos, "eos_token_id": [end], "pad_token_id": pad,
                                     "do_sample": True, "temperature": 0.7, "top_p": 0.9})
    write("tokenizer_config.json", {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": END,
                                    "pad_token": PAD, "add_bos_token": True, "model_max_length": args.max_positions,
                                    "chat_template": CHAT_TEMPLATE})
    write("training.json", report)


def main(argv=None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    tok, rows, stats = build_data(args)
    data_seconds = time.perf_counter() - t0
    print(f"data: {stats} in {data_seconds:.0f}s")
    shape = LlamaShape(vocab_size=tok.get_vocab_size(), hidden=args.hidden, layers=args.layers, heads=args.heads,
                       kv_heads=args.kv_heads, intermediate=args.intermediate)
    params, result = train(args, rows, shape)
    n_params = sum(int(v.size) for v in params.values())
    report = {"settings": vars(args), "data": stats, "data_seconds": round(data_seconds, 1), "parameters": n_params,
              **result}
    save(Path(args.out), tok, params, shape, args, report)
    from dsjax.training.llama import greedy

    prompt = [tok.token_to_id(BOS), *tok.encode("Once upon a time", add_special_tokens=False).ids]
    sample = tok.decode(greedy(params, shape, prompt, 40, {tok.token_to_id(END)}))
    print(f"{n_params / 1e6:.2f} M parameters, {result['train_seconds']:.0f}s, train loss {result['final_train_loss']:.3f}, "
          f"held-out {result['held_out_loss']:.3f}\nOnce upon a time{sample}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
