"""``priorface batch``: the argparse sub-command (standard library only; the work is in :mod:`.batch`).

    priorface batch WORKFLOW_API.json INPUT_DIR OUTPUT_DIR --url http://127.0.0.1:8188

Per-image values come from ``--params CSV``: a column ``input`` (file name or stem) and one column
per value; a column named after an input (``seed``, ``strength``) sets it on every node that has
it, ``NODE.input`` (node id or unique title, e.g. ``3.seed``, ``6.text``) on one node only.
"""

from __future__ import annotations

import argparse
import logging
import sys

DESCRIPTION = (
    "Upload each image of INPUT_DIR to a running ComfyUI, set it on the workflow's LoadImage node, run the "
    "workflow, download its saved images and record every item in a results CSV (a rerun skips finished items)."
)
PARAMS_HELP = (
    "--params CSV: a column 'input' (file name or stem) and one column per value. A column named after an "
    "input (seed, strength, ...) sets it on every node that has that input; 'NODE.input' (node id or unique "
    "title, e.g. 3.seed, 6.text) sets one node only. Empty cells keep the workflow's value."
)
EXIT_FAILED_ITEMS = 1
EXIT_SERVER_LOST = 3
EXIT_INTERRUPTED = 130


def add_batch_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``batch`` sub-command to a ``subparsers`` object."""
    p = subparsers.add_parser(
        "batch",
        help="run an API-format workflow on every image of a folder through a running ComfyUI",
        description=DESCRIPTION,
        epilog=PARAMS_HELP,
    )
    add_batch_arguments(p)
    p.set_defaults(func=run_batch_cli)
    return p


def add_batch_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of ``priorface batch``."""
    p.add_argument("workflow", help="API-format workflow JSON (Export (API), or workflows/api/ of the pack)")
    p.add_argument(
        "input_dir", help="folder of images (png, jpg, jpeg, webp, bmp, tif); not searched recursively"
    )
    p.add_argument(
        "output_dir", help="where outputs go, as <input stem>_<node id>_<index>.png, plus results.csv"
    )
    p.add_argument(
        "--url", default="http://127.0.0.1:8188", help="ComfyUI address (default http://127.0.0.1:8188)"
    )
    p.add_argument("--host", help="ComfyUI host, as in `comfy run` (overrides --url's host)")
    p.add_argument("--port", type=int, help="ComfyUI port, as in `comfy run` (overrides --url's port)")
    p.add_argument(
        "--image-node", help="id of the node that receives each image (default: the only LoadImage)"
    )
    p.add_argument(
        "--params", help="CSV of per-image values: column 'input' + input names or NODE.input columns"
    )
    p.add_argument("--results", help="results CSV (default OUTPUT_DIR/results.csv)")
    p.add_argument(
        "--retries", type=int, default=1, help="retries of an item after an execution error (default 1)"
    )
    p.add_argument(
        "--concurrency",
        type=int,
        default=1,
        help="prompts queued at once (default 1; 2 hides upload latency)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        help="seconds one item may run before it is interrupted and retried (default: none)",
    )
    p.add_argument(
        "--reconnect-timeout",
        type=float,
        default=120.0,
        help="how long to wait for a server that went away (restart) before giving up (default 120 s)",
    )
    p.add_argument(
        "--upload-subfolder", default="priorface_batch", help="subfolder of ComfyUI's input/ for uploads"
    )
    p.add_argument(
        "--overwrite", action="store_true", help="ignore the results CSV and run every image again"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _url(args: argparse.Namespace) -> str:
    from urllib.parse import urlsplit

    if not (args.host or args.port):
        return args.url
    parts = urlsplit(args.url if "://" in args.url else f"http://{args.url}")
    host = args.host or parts.hostname or "127.0.0.1"
    return f"{parts.scheme}://{host}:{args.port or parts.port or 8188}"


def run_batch_cli(args: argparse.Namespace) -> int:
    """Run ``priorface batch``: 0 all done, 1 some items failed, 3 server gone, 130 after Ctrl-C."""
    from .batch import run_batch
    from .comfy_api import ComfyConnectionError

    try:
        summary = run_batch(
            _url(args),
            args.workflow,
            args.input_dir,
            args.output_dir,
            image_node=args.image_node,
            params_csv=args.params,
            results_csv=args.results,
            retries=args.retries,
            concurrency=args.concurrency,
            item_timeout=args.timeout,
            reconnect_timeout=args.reconnect_timeout,
            upload_subfolder=args.upload_subfolder,
            overwrite=args.overwrite,
            progress=not args.no_progress,
        )
    except ComfyConnectionError as e:
        print(f"error: {e} (is ComfyUI running at {_url(args)}?)", file=sys.stderr)
        return EXIT_SERVER_LOST
    print(
        f"{summary['success']} succeeded, {summary['error']} failed, {summary['interrupted']} interrupted, "
        f"{summary['skipped']} already done in {summary['seconds']:.1f} s; results: {summary['results']}"
    )
    if summary["aborted"]:
        print("interrupted: the server was told to stop; rerun the same command to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    return EXIT_FAILED_ITEMS if summary["error"] else 0


def main(argv: list[str] | None = None) -> int:
    """``python -m priorface.client.batch_cli``: the same command without the ``priorface`` entry point."""
    parser = argparse.ArgumentParser(prog="priorface-batch", description=DESCRIPTION, epilog=PARAMS_HELP)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    add_batch_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return run_batch_cli(args)
    except (FileNotFoundError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
