"""``dinolab shards FOLDER... --output DIR --shard-size N``: image folders / path lists -> WebDataset tar shards."""

from __future__ import annotations

import argparse

from dinolab.cli.options import add_runtime_arguments
from dinolab.data.shard_writer import verify_shards, write_shards


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="INPUTS", help="image folders (recursive), files, .txt path lists")
    parser.add_argument("--output", "-o", required=True, metavar="DIR", help="folder for NNNNNN.tar + manifest.json")
    parser.add_argument("--shard-size", type=int, default=1000, metavar="N", help="images per shard (default 1000)")
    parser.add_argument("--verify", action="store_true", help="then re-read every shard and check its sha256")
    add_runtime_arguments(parser, options=("progress",))  # no model, no device: only the progress lines apply


def run(args: argparse.Namespace) -> int:
    def progress(shard: int) -> None:
        print(f"shard {shard:06d} written", flush=True)

    after_shard = None if args.no_progress else progress
    result = write_shards(args.inputs, args.output, args.shard_size, after_shard=after_shard)
    resumed = result.shards - len(result.written)
    print(
        f"{result.images} images in {result.shards} shards -> {result.output}"
        + (f" ({resumed} shards were already done)" if resumed else "")
        + (f"; {result.unreadable} unreadable files listed in manifest.json" if result.unreadable else "")
    )
    if args.verify:
        bad = verify_shards(result.output)
        if bad:
            print(f"checksum mismatch in {len(bad)} shard(s): {', '.join(bad[:10])}")
            return 1
        print("every shard matches its sha256")
    return 0
