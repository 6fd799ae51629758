"""Container health check: GET the /health route that Flower 1.41's SuperLink and SuperNode serve.

    python /opt/fedsim/bin/healthcheck.py http://127.0.0.1:9094/health
    python /opt/fedsim/bin/healthcheck.py https://127.0.0.1:8000/health /run/secrets/ca.crt

With a CA file the server certificate is verified against it (make-certs.sh puts 127.0.0.1 in its SANs).
Exit status 0 when the route answers 2xx, 1 otherwise.
"""

from __future__ import annotations

import ssl
import sys
import urllib.request


def healthy(url: str, ca_file: str | None = None, timeout: float = 5.0) -> bool:
    context = ssl.create_default_context(cafile=ca_file) if url.startswith("https") else None
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=context) as response:  # noqa: S310 (fixed URL)
            return 200 <= response.status < 300
    except OSError as err:
        print(f"unhealthy: {url}: {err}", file=sys.stderr)
        return False


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit("usage: healthcheck.py URL [CA_FILE]")
    sys.exit(0 if healthy(sys.argv[1], sys.argv[2] if len(sys.argv) == 3 else None) else 1)
