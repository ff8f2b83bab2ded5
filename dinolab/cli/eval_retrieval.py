"""``dinolab eval retrieval``: global descriptors, cosine ranking, mAP / mP@k (revisited Oxford / Paris)."""

from __future__ import annotations

import argparse

from dinolab.cli.eval_dense import add_common_arguments, resolved_arguments, write_json
from dinolab.cli.options import backbone_from_args
from dinolab.config import from_namespace
from dinolab.runtime import resolve_device


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", required=True, choices=["roxford5k", "rparis6k", "folder"])
    data.add_argument("--root", help="folder holding {dataset}/gnd_{dataset}.pkl and {dataset}/jpg/")
    data.add_argument("--queries", help="folder dataset: query images")
    data.add_argument("--database", help="folder dataset: database images")
    data.add_argument("--relevance", help="folder dataset: lines 'query<TAB>relevant<TAB>relevant...'")
    desc = parser.add_argument_group("descriptors")
    desc.add_argument("--image-size", type=int, default=512, help="longest side at scale 1")
    desc.add_argument("--multiscale", action="store_true", help="average descriptors at scales 1, 1/sqrt(2), 1/2")
    desc.add_argument("--pooling", choices=["cls", "gem"], default="cls")
    desc.add_argument("--gem-p", type=float, default=3.0)


def run(args: argparse.Namespace) -> int:
    from dinolab.eval.readers import retrieval as readers
    from dinolab.eval.retrieval import MULTISCALE, RetrievalConfig, evaluate_retrieval

    if args.dataset == "folder":
        if not (args.queries and args.database and args.relevance):
            raise SystemExit("--dataset folder needs --queries, --database and --relevance")
        data = readers.folder_relevance(args.queries, args.database, args.relevance)
    else:
        if not args.root:
            raise SystemExit(f"--dataset {args.dataset} needs --root")
        data = readers.revisited(args.root, args.dataset)
    config = from_namespace(RetrievalConfig, args, scales=MULTISCALE if args.multiscale else (1.0,))
    model = backbone_from_args(args)
    results = evaluate_retrieval(
        model, data, config, resolve_device(args.device), args.num_workers, not args.no_progress
    )
    record = {"task": "retrieval", "dataset": data.name, "args": resolved_arguments(args), **results.to_dict()}
    path = write_json(args.output / "results.json", record)
    print(f"{data.name}: {results.summary_line()} -> {path}")
    return 0
