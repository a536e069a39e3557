"""Running the shim's session pool against a real server, in tests."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from salience_client import AsyncSalienceClient
from salience_server.http.decode_options import DecodeOptions
from salience_server.http.sessions_pool import SessionPool

GREEDY = DecodeOptions(max_tokens=4, temperature=0.0)


def run_with_pool(target: str, test: Any, **pool_options: Any) -> Any:
    """Runs ``test(pool, client)`` in a fresh event loop with a pool on ``target``."""

    async def main() -> Any:
        async with AsyncSalienceClient(target, timeout=30) as client:
            for info in await client.list_sessions():  # what earlier tests left
                await (await client.session(info.session_id)).close()
            pool = SessionPool(client, **{"max_sessions": 8, **pool_options})
            try:
                return await test(pool, client)
            finally:
                await pool.close()

    return asyncio.run(main())


async def wait_for_sessions(client: AsyncSalienceClient, count: int) -> None:
    """Until the server holds ``count`` sessions (the pool closes the ones it lets go in
    the background), for at most 10 s."""
    deadline = time.monotonic() + 10
    while len(sessions := await client.list_sessions()) != count:
        assert time.monotonic() < deadline, (
            f"the server holds {len(sessions)} sessions after 10 s, not {count}: "
            f"{[(s.session_id, s.length) for s in sessions]}"
        )
        await asyncio.sleep(0.01)
