"""Command-line options of URL lists and the network, shared by download, downsample and colorize."""
from __future__ import annotations

import argparse

from apache_beam.io.filesystems import FileSystems

from imagebeam.transforms.imaging.decode import DEFAULT_MAX_PIXELS
from imagebeam.transforms.inputs.fetch import USER_AGENT, FetchConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = FetchConfig()
    g = parser.add_argument_group("URL lists and the network (inputs ending .txt/.tsv/.csv/.jsonl/.parquet, "
                                  "optionally .gz, or a .tgz holding a text list)")
    g.add_argument("--url-column", default="url", help="CSV/JSONL/Parquet column holding the URL")
    g.add_argument("--key-column", help="column holding the image key (its name in the output)")
    g.add_argument("--label-column", help="column holding the class (WNID or folder-style name)")
    g.add_argument("--timeout", type=float, default=defaults.timeout, help="seconds to connect and per read")
    g.add_argument("--deadline", type=float, default=defaults.deadline, help="seconds for a whole response")
    g.add_argument("--retries", type=int, default=defaults.retries,
                   help="retries on timeouts, connection errors, 429 and 5xx (exponential backoff, jitter)")
    g.add_argument("--backoff", type=float, default=defaults.backoff, help="first backoff in seconds (doubles)")
    g.add_argument("--max-retry-after", type=float, default=defaults.max_retry_after,
                   help="longest Retry-After honoured; longer ones give up on the URL for this run")
    g.add_argument("--threads", type=int, default=defaults.threads, help="downloads in flight per worker")
    g.add_argument("--per-host", type=int, default=defaults.per_host,
                   help="concurrent requests to one host per worker")
    g.add_argument("--max-bytes", type=int, default=defaults.max_bytes, help="larger bodies are abandoned")
    g.add_argument("--min-size", type=int, default=defaults.min_size,
                   help="images whose shorter side is below this many pixels are dropped (too_small)")
    g.add_argument("--placeholders", help="file of sha256 hex digests of known 'image unavailable' images, "
                                          "one per line ('#' comments allowed)")
    g.add_argument("--allow-private-networks", action="store_true",
                   help="allow hosts on loopback, private and link-local addresses (intranets, tests); "
                        "cloud metadata addresses stay refused")
    g.add_argument("--ignore-robots-tag", action="store_true",
                   help="fetch images whose response says X-Robots-Tag: noai / noimageai (skipped by default)")
    g.add_argument("--user-agent", default=USER_AGENT)
    if not any(a.dest == "max_pixels" for a in parser._actions):
        g.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                       help="images declaring more pixels are refused as decompression bombs")


def read_placeholders(path: str | None) -> frozenset:
    if not path:
        return frozenset()
    if not FileSystems.exists(path):
        raise SystemExit(f"--placeholders: no such file: {path}")
    with FileSystems.open(path) as f:
        lines = f.read().decode("utf-8", "replace").splitlines()
    digests = set()
    for number, line in enumerate(lines, 1):
        text = line.split("#", 1)[0].strip().lower()
        if not text:
            continue
        token = text.split()[0]
        if len(token) != 64 or any(c not in "0123456789abcdef" for c in token):
            raise SystemExit(f"--placeholders {path}:{number}: not a sha256 hex digest: {line.strip()!r}")
        digests.add(token)
    return frozenset(digests)


def fetch_config(args: argparse.Namespace) -> FetchConfig:
    for name in ("threads", "per_host"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be at least 1")
    if args.retries < 0 or args.timeout <= 0 or args.deadline <= 0 or args.max_bytes < 1:
        raise SystemExit("--retries must be >= 0; --timeout, --deadline and --max-bytes must be positive")
    return FetchConfig(
        timeout=args.timeout, deadline=args.deadline, retries=args.retries, backoff=args.backoff,
        max_retry_after=args.max_retry_after, per_host=args.per_host, threads=args.threads,
        max_bytes=args.max_bytes, min_size=args.min_size, max_pixels=args.max_pixels,
        placeholders=read_placeholders(args.placeholders), allow_private_networks=args.allow_private_networks,
        respect_robots_tag=not args.ignore_robots_tag, user_agent=args.user_agent)


def list_columns(args: argparse.Namespace) -> tuple:
    return args.url_column, args.key_column, args.label_column
