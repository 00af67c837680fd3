"""`prunefleet predict`: classify image files with the variant an edge serves, one line per image."""

from __future__ import annotations

import argparse
import sys

import grpc

from cloud.admin import predict_client
from common import security
from common.files import short_id


def add_parser(top, environ=None) -> None:
    predict = top.add_parser(
        "predict",
        help="classify image files on an edge: one line per image, its class and probability",
        description=(
            "Ask the edge which variant it serves, prepare every image as that variant was trained (size, "
            "channels), send them and print IMAGE<TAB>CLASS<TAB>PROBABILITY per image."
        ),
    )
    predict.add_argument("--edge", required=True, metavar="HOST:PORT", help="the edge's InferenceService")
    security.add_arguments(predict, token=False, environ=environ)
    predict.add_argument("--json", action="store_true", help="one JSON document instead of lines")
    predict.add_argument("--top", type=_positive, default=1, metavar="K", help="the K most probable classes")
    predict.add_argument("images", nargs="+", metavar="IMAGE", help="image files (PNG, JPEG, ...)")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"K is a whole number of at least 1, got {text!r}")
    return value


def run(args) -> int:
    """0 when every image was classified; 1 when the edge failed (its status and message on stderr);
    unusable images or flags raise, which the CLI reports with exit status 2."""
    transport = security.from_arguments(args, token=False)
    try:
        predictions = predict_client.classify(args.edge, transport, args.images, args.top)
    except grpc.RpcError as err:
        print(f"prunefleet: {err.code().name}: the edge at {args.edge}: {err.details()}", file=sys.stderr)
        return 1
    print(predict_client.as_json(predictions) if args.json else predict_client.as_lines(predictions))
    answered = sorted({p.variant_id for p in predictions})
    print(f"prunefleet: answered by variant {', '.join(short_id(v) for v in answered)}", file=sys.stderr)
    return 0
