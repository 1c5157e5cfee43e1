"""Transcribe a file with the official ``openai`` Python client against ``harken serve``.

    harken serve --model exp/demo/best.pt            # in another shell (port 8000)
    pip install openai
    python examples/openai_client.py call.wav [--url http://127.0.0.1:8000/v1] [--key KEY]
        [--format json|text|srt|vtt|verbose_json] [--words] [--stream]

The ``model`` field is accepted for compatibility and ignored (the server has one model; see
``GET /v1/models``). With ``--words``, verbose_json carries word times.
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("audio")
    p.add_argument("--url", default=os.environ.get("HARKEN_URL", "http://127.0.0.1:8000/v1"))
    p.add_argument("--key", default=os.environ.get("HARKEN_API_KEY", "none"), help="API key (if the server has auth)")
    p.add_argument("--format", default="json", choices=("json", "text", "srt", "vtt", "verbose_json"))
    p.add_argument("--words", action="store_true", help="word timestamps (verbose_json)")
    p.add_argument("--stream", action="store_true", help="server-sent events, one delta per segment")
    a = p.parse_args(argv)

    from openai import APIStatusError, OpenAI

    client = OpenAI(base_url=a.url, api_key=a.key)
    print("models:", [m.id for m in client.models.list().data], file=sys.stderr)
    try:
        with open(a.audio, "rb") as f:
            if a.stream:
                for ev in client.audio.transcriptions.create(model="harken", file=f, stream=True):
                    if ev.type == "transcript.text.delta":
                        print(ev.delta, end="", flush=True)
                print()
                return 0
            kw = {"timestamp_granularities": ["word", "segment"]} if a.words else {}
            fmt = "verbose_json" if a.words else a.format
            out = client.audio.transcriptions.create(model="harken", file=f, response_format=fmt, **kw)
    except APIStatusError as e:  # errors come in OpenAI's shape: status, code, param, request id
        print(f"error {e.status_code} ({e.code}, param={e.param}, request {e.request_id}): {e.message}",
              file=sys.stderr)
        return 1
    if isinstance(out, str):
        print(out, end="" if out.endswith("\n") else "\n")
    elif fmt == "verbose_json":
        print(out.text)
        for seg in out.segments or []:
            print(f"[{seg.start:7.2f} -> {seg.end:7.2f}] {seg.text}")
        for w in out.words or []:
            print(f"  {w.start:7.2f} {w.end:7.2f} {w.word}")
    else:
        print(out.text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
