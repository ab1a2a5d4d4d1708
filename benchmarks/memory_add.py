"""`memext memory add` of one long file: peak memory (RSS) and time, through the command itself.

The file is Python standard-library source (memext's ``stdlib`` corpus files, in order) written
to a temporary folder until it reaches ``--size-mb``; each pass over the library prefixes its
lines with the pass number, so no chunk repeats and the embedding cache never answers for one.
The command runs in a subprocess with a fresh, empty embedding cache (``MEMEXT_CACHE`` in the
temporary folder) and a new store; its peak RSS is the kernel's ``ru_maxrss`` of that child
(``os.wait4``), its time the wall clock around it.

``--encoder minilm`` embeds with all-MiniLM-L6-v2 (the default encoder, what a user runs);
``--encoder tiny`` with a random 2-layer, 32-wide BERT that reads MiniLM's own tokenizer, so
reading, tokenizing, chunking and storing are the same work as with MiniLM (the same chunks)
while embedding costs little: the way to measure a 50 MB file's memory on a CPU where MiniLM
would embed for hours. Results accumulate in ``--out``, one entry per (encoder, size).

    python benchmarks/memory_add.py --encoder tiny --size-mb 50     # the issue's 50 MB file
    python benchmarks/memory_add.py --encoder minilm --size-mb 2    # the real encoder's speed
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from memext.data.corpus import stdlib_files
from memext.runtime import command_line, cpu_name


def write_text(path: Path, size: int) -> int:
    """Write ``size`` bytes (to the last whole line) of stdlib source to ``path``."""
    root, files = stdlib_files()
    written = 0
    with open(path, "wb") as out:
        for n in range(1_000_000):
            for f in files:
                head = f"# --- pass {n}: {f.relative_to(root).as_posix()}\n"
                text = f.read_text(encoding="utf-8", errors="replace")
                if n:
                    text = "".join(f"{n} {line}" for line in text.splitlines(keepends=True))
                data = (head + text + "\n").encode("utf-8")
                if written + len(data) > size:
                    data = data[: size - written]
                    data = data[: data.rfind(b"\n") + 1]  # whole lines, whole characters
                    out.write(data)
                    return written + len(data)
                out.write(data)
                written += len(data)
    return written


def tiny_encoder(folder: Path) -> Path:
    """A random 2-layer, 32-wide BERT with all-MiniLM-L6-v2's tokenizer and limits."""
    import transformers

    from memext.pipelines.encoder import default_model_dir

    minilm = default_model_dir()
    folder.mkdir(parents=True)
    for name in (
        "tokenizer.json",
        "tokenizer_config.json",
        "vocab.txt",
        "special_tokens_map.json",
        "sentence_bert_config.json",
    ):
        shutil.copy(minilm / name, folder / name)
    vocab = len((minilm / "vocab.txt").read_text(encoding="utf-8").splitlines())
    config = transformers.BertConfig(
        vocab_size=vocab,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
    )
    transformers.BertModel(config).eval().save_pretrained(folder)
    return folder


def measure(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    doc = tmp / "long.txt"
    size = write_text(doc, int(args.size_mb * 1e6))
    print(f"{doc.name}: {size / 1e6:.1f} MB of stdlib source", flush=True)
    cmd = [sys.executable, "-m", "memext", "memory", "add", str(doc), "--store", str(tmp / "s")]
    if args.encoder == "tiny":
        cmd += ["--encoder", str(tiny_encoder(tmp / "tiny-encoder"))]
    env = {**os.environ, "MEMEXT_CACHE": str(tmp / "cache")}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    t0 = time.perf_counter()
    child = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True)
    output = child.stdout.read() if child.stdout else ""
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - t0
    child.returncode = os.waitstatus_to_exitcode(status)
    print(output, end="", flush=True)
    if child.returncode != 0:
        raise SystemExit(f"memext memory add failed (exit {child.returncode})")
    chunks = int(output.split(" new chunk(s)")[0].rsplit(": ", 1)[1])
    peak = usage.ru_maxrss * 1024  # kilobytes on Linux
    return {
        "encoder": args.encoder,
        "size_mb": args.size_mb,
        "file_bytes": size,
        "chunks": chunks,
        "seconds": round(seconds, 1),
        "mb_per_s": round(size / 1e6 / seconds, 3),
        "peak_rss_gb": round(peak / 1e9, 3),
        "threads": env.get("OMP_NUM_THREADS", "torch default"),
        "cpu": cpu_name(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "command": command_line("benchmarks/memory_add.py", args, ("out",)),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size-mb", type=float, default=50.0)
    p.add_argument("--encoder", choices=("minilm", "tiny"), default="minilm")
    p.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS (0: inherit)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/memory_add.json"))
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        row = measure(args, Path(tmp))
    print(
        f"{row['encoder']}, {row['file_bytes'] / 1e6:.1f} MB: {row['chunks']} chunks in "
        f"{row['seconds']:.0f} s ({row['mb_per_s']:.3f} MB/s), peak RSS {row['peak_rss_gb']:.2f} GB"
    )
    results = json.loads(args.out.read_text()) if args.out.is_file() else {"runs": []}
    runs = [
        r for r in results["runs"] if (r["encoder"], r["size_mb"]) != (args.encoder, args.size_mb)
    ]
    results["runs"] = sorted([*runs, row], key=lambda r: (r["encoder"], r["size_mb"]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
