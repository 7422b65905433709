"""The benchmarks' fixture upstream (tests/fixtures/toolbox.py) served by the SDK's streamable HTTP app.

    python bench/sdk_http_server.py [PORT]      (0, the default, picks a free port)

uvicorn binds the address itself, the SDK's usual deployment. Prints
`serving streamable HTTP at http://127.0.0.1:PORT/mcp` on stderr once it listens.
"""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import uvicorn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "fixtures"))
from toolbox import server  # the fixture lives outside any package


class _Announcing(uvicorn.Server):
    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        print(f"serving streamable HTTP at http://127.0.0.1:{self.config.port}/mcp", file=sys.stderr, flush=True)


def main() -> None:
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 0
    if port == 0:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
    app = server.streamable_http_app(host="127.0.0.1")
    _Announcing(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")).run()


if __name__ == "__main__":
    main()
