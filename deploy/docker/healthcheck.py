"""Docker HEALTHCHECK: exit 0 when GET /healthz answers 200 (python, so the image needs no curl)."""

import os
import sys
import urllib.request

port = os.environ.get("HARKEN_PORT", "8000")
url = f"http://127.0.0.1:{port}/healthz"
try:
    with urllib.request.urlopen(url, timeout=float(os.environ.get("HARKEN_HEALTHCHECK_TIMEOUT", "4"))) as r:
        sys.exit(0 if r.status == 200 else 1)
except Exception as e:  # any failure is "unhealthy"; the reason goes to `docker inspect`
    print(f"healthcheck: {url}: {e}", file=sys.stderr)
    sys.exit(1)
