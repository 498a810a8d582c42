"""Save the image of a model's JSON response: `curl ... | python3 -m scripts.save_image out.png`.

Standard library only, so it runs with any python3. An error response is printed, exit 1.
"""

from __future__ import annotations

import base64
import json
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: ... | python3 -m scripts.save_image OUTPUT.png", file=sys.stderr)
        return 2
    raw = sys.stdin.buffer.read()
    try:
        response = json.loads(raw)
    except json.JSONDecodeError:
        print(f"not a JSON response: {raw[:300]!r}", file=sys.stderr)
        return 1
    if not isinstance(response, dict) or "generated_image" not in response:
        print(f"no image in the response: {json.dumps(response)[:500]}", file=sys.stderr)
        return 1
    data = base64.b64decode(response.pop("generated_image"))
    Path(argv[0]).write_bytes(data)
    extras = {key: value for key, value in response.items() if key != "masks"}
    print(f"wrote {argv[0]} ({len(data)} bytes) {json.dumps(extras)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
