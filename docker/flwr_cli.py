"""Run the `flwr` CLI against a deployed SuperLink, writing the connection it needs first.

Flower 1.41's `flwr` reads SuperLink connections from $FLWR_HOME/config.toml (default ~/.flwr):

    [superlink]
    default = "lab"

    [superlink.lab]
    address = "superlink.lab.example:8000"          # the SuperLink's one HTTP(S) port
    root-certificates = "/abs/path/to/ca.crt"       # TLS (an absolute path), or: insecure = true

This script writes that connection (keeping any other ones), optionally waits until N SuperNodes are online,
then replaces itself with `flwr ARGS...`:

    python flwr_cli.py --superlink superlink:8000 --ca /run/secrets/ca.crt -- supernode register k.pub
    python flwr_cli.py --superlink superlink:8000 --insecure --wait-nodes 3 -- run /opt/fedsim/app --stream

Without `--superlink` it leaves the configuration alone. The tests import `write_connection` and
`wait_for_nodes` from here.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import tomli_w


def flwr_home() -> Path:
    return Path(os.environ.get("FLWR_HOME") or Path.home() / ".flwr")


def write_connection(
    name: str, address: str, ca_file: str | None = None, insecure: bool = False, home: Path | None = None
) -> Path:
    """Add or replace `[superlink.<name>]` in config.toml and make it the default connection."""
    if bool(ca_file) == insecure:
        raise ValueError("give exactly one of a CA certificate (TLS) or insecure=True")
    path = (home or flwr_home()) / "config.toml"
    config = tomllib.loads(path.read_text()) if path.exists() else {}
    superlink = config.setdefault("superlink", {})
    connection: dict[str, object] = {"address": address}
    if ca_file:
        connection["root-certificates"] = str(Path(ca_file).resolve())  # flwr wants an absolute path
    else:
        connection["insecure"] = True
    superlink[name] = connection
    superlink["default"] = name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps(config))
    return path


def online_nodes(connection: str, env: dict[str, str] | None = None) -> list[str]:
    """Node ids that the SuperLink reports online (`flwr supernode list --format json`)."""
    out = subprocess.run(
        ["flwr", "supernode", "list", connection, "--format", "json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    try:
        listing = json.loads(out.stdout)
    except json.JSONDecodeError:
        return []
    return [str(node["node-id"]) for node in listing.get("nodes", []) if node.get("status") == "online"]


def wait_for_nodes(
    connection: str, count: int, timeout: float = 300, env: dict[str, str] | None = None, poll: float = 2.0
) -> list[str]:
    """Block until `count` SuperNodes are online, so that the first round samples all of them."""
    deadline = time.monotonic() + timeout
    nodes: list[str] = []
    while time.monotonic() < deadline:
        nodes = online_nodes(connection, env)
        if len(nodes) >= count:
            return nodes
        time.sleep(poll)
    raise TimeoutError(f"only {len(nodes)} of {count} SuperNodes came online within {timeout:.0f} s")


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", default="fedsim", help="connection name (default: fedsim)")
    parser.add_argument("--superlink", help="the SuperLink's host:port")
    tls = parser.add_mutually_exclusive_group()
    tls.add_argument("--ca", help="CA certificate that signed the SuperLink's certificate")
    tls.add_argument("--insecure", action="store_true", help="plain HTTP (single-host classroom only)")
    parser.add_argument("--wait-nodes", type=int, default=0, help="wait until this many SuperNodes are online")
    parser.add_argument("--wait-timeout", type=float, default=600)
    if "--" in argv:
        split = argv.index("--")
        own, flwr_args = argv[:split], argv[split + 1 :]
    else:
        own, flwr_args = [], argv
    args = parser.parse_args(own)
    if args.superlink:
        if not args.ca and not args.insecure:
            parser.error("--superlink needs --ca (TLS) or --insecure")
        path = write_connection(args.name, args.superlink, args.ca, args.insecure)
        print(f"flwr connection '{args.name}' -> {args.superlink} ({'TLS' if args.ca else 'insecure'}) in {path}")
    if args.wait_nodes:
        print(f"waiting for {args.wait_nodes} SuperNodes to come online ...", flush=True)
        nodes = wait_for_nodes(args.name, args.wait_nodes, args.wait_timeout)
        print(f"{len(nodes)} SuperNodes online", flush=True)
    if not flwr_args:
        return
    sys.stdout.flush()
    os.execvp("flwr", ["flwr", *flwr_args])


if __name__ == "__main__":
    main(sys.argv[1:])
