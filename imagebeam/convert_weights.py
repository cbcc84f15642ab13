"""`imagebeam convert-weights`: a TF-slim Inception-ResNet-v2 checkpoint -> a backend-neutral `.npz`.

JAX and PyTorch workers load the `.npz` (`--inception-weights inception.npz`) without TensorFlow; the
conversion reads the checkpoint with TensorFlow once, wherever it is installed.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence
from imagebeam.runners.checks import OneLineParser


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = OneLineParser(prog="imagebeam convert-weights", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="inception_resnet_v2_2016_08_30.ckpt, or a V2 checkpoint prefix")
    p.add_argument("output", help="the .npz to write")
    args = p.parse_args(argv)
    from imagebeam.transforms.model import inception

    try:
        if inception.weights_kind(args.checkpoint) != inception.KIND_SLIM:
            raise ValueError(f"{args.checkpoint}: not a TF-slim checkpoint")
        if not args.output.lower().endswith(".npz"):
            raise ValueError(f"{args.output}: the output must end in .npz")
        inception.convert_slim_checkpoint(args.checkpoint, args.output)
        classes = inception.embedding_size(args.output)
    except (ValueError, RuntimeError, OSError) as exc:
        print(f"imagebeam convert-weights: {exc}", file=sys.stderr)
        return 1
    print(f"{args.output}: {classes} logits; use --inception-weights {args.output} on any --embedding-backend")
    return 0
