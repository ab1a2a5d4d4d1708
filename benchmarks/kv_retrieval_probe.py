"""Does the ``retrieval`` cache bring back the block holding the pass key? One passkey sample
of ``benchmarks/kv_retrieval.py`` (same prompt for the same length, index and count), read
through the cache; at every decoding step, the share of (layer, KV head) pairs whose retrieved
blocks include the block holding the key's first digits, and the tokens decoded.

    python benchmarks/kv_retrieval_probe.py --model smollm2 --length 32768 --index 5 --of 20
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from memext.adapters import open_model
from memext.data.filler import CLASSIC_FILLER, Filler
from memext.data.tasks import passkey
from memext.hf.cache import PolicyCache, prefill, read_chunk
from memext.hf.model import cache_kwargs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--length", type=int, default=32768)
    p.add_argument("--index", type=int, default=0, help="The sample's index (its depth).")
    p.add_argument("--of", type=int, default=20, help="Samples in the run it comes from.")
    p.add_argument("--sinks", type=int, default=4)
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--block", type=int, default=64)
    p.add_argument("--topk", type=int, default=4)
    p.add_argument("--reps", type=int, default=4)
    p.add_argument("--chunk", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=12)
    p.add_argument("--group", default="mean", help="retrieval's group option (mean|max)")
    p.add_argument("--share", default="head", help="retrieval's share option (head|layer)")
    p.add_argument("--hold", default="token", help="retrieval's hold option (token|prompt)")
    p.add_argument("--score", default="free", help="retrieval's score option (free|rope)")
    p.add_argument(
        "--tail", type=int, default=0, help="Read the prompt's last TAIL tokens as a chunk alone."
    )
    p.add_argument("--filler", choices=("classic", "stdlib"), default="classic")
    p.add_argument(
        "--chat",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="The chat template (default: when the tokenizer has one); --no-chat: plain text.",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model = open_model(args.model)
    tok = model.tokenizer
    depth = (args.index + 0.5) / args.of  # as kv_retrieval.py spreads its samples
    filler = Filler.from_text(tok, CLASSIC_FILLER) if args.filler == "classic" else None
    sample = passkey(
        tok,
        filler or Filler.stdlib(tok),
        args.length,
        depth,
        (args.seed, args.length, args.index),
    )
    prompt = tok.decode_bytes(sample.prompt.tolist()).decode("utf-8", errors="replace")
    ids = model.prompt_ids(prompt, args.chat)
    digits = tok.encode(str(sample.meta["key"]))
    where = next(j for j in range(len(ids)) if ids[j : j + len(digits)] == digits)
    key_block = (where - args.sinks) // args.block  # blocks start after the sinks
    lm = model.model.model
    names = ("sinks", "window", "block", "topk", "reps", "group", "share", "hold", "score")
    opts = {k: getattr(args, k) for k in names}
    cache = PolicyCache(lm.config, "retrieval", **opts)
    started = time.perf_counter()

    def share() -> float:
        hits = [(layer.kv.selected[0] == key_block).any(-1) for layer in cache.layers]
        return float(torch.cat(hits).float().mean())

    try:
        cut = len(ids) - args.tail if 0 < args.tail < len(ids) else len(ids)
        logits, cache = prefill(lm, torch.tensor([ids[:cut]]), cache, args.chunk)
        if cut < len(ids):
            logits = read_chunk(lm, torch.tensor([ids[cut:]]), cache).logits[:, -1]
        shares, out, pos = [share()], [], len(ids)
        for _ in range(args.new_tokens):
            nxt = logits.argmax(-1)
            out.append(int(nxt))
            step = lm(
                input_ids=nxt[:, None],
                position_ids=torch.tensor([[pos]]),
                use_cache=True,
                **cache_kwargs(lm, cache),
            )
            logits, pos = step.logits[:, -1], pos + 1
            shares.append(share())
    finally:
        cache.detach()
    print(
        json.dumps(
            {
                "length": args.length,
                "depth": depth,
                "options": opts,
                "key": sample.meta["key"],
                "output": tok.decode(out),
                "prompt_tokens": len(ids),
                "key_block": key_block,
                # [0]: the prompt's last chunk; [i]: the forward of the i-th decoded token.
                "key_block_share": [round(x, 3) for x in shares],
                "seconds": round(time.perf_counter() - started, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
