"""lume_push and lume_pull through `lume serve --mcp`, driven by the official
MCP Python SDK (mcp from PyPI), for tests/e2e_registry.rs.

Usage: mcp_registry.py LUME_BIN REGISTRY
Starts LUME_BIN serve --mcp over stdio (with this process's environment),
pushes VM `src` as test/img:mcp to REGISTRY, pulls it back as VM `dst`
with a progress callback, and asks for a tag that does not exist. Prints
one line `RESULT <json>`; the Rust test makes the assertions.
"""

import asyncio
import json
import os
import sys

from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client


async def main(lume, registry):
    params = StdioServerParameters(command=lume, args=["serve", "--mcp"], env=dict(os.environ))
    out = {}
    async with stdio_client(params) as (read, write):
        async with ClientSession(read, write) as session:
            await session.initialize()

            async def call(name, args):
                progress = []

                async def on_progress(value, total, message):
                    progress.append({"progress": value, "total": total, "message": message})

                r = await session.call_tool(name, args, read_timeout_seconds=None, progress_callback=on_progress)
                text = "\n".join(c.text for c in r.content if getattr(c, "type", None) == "text")
                return {"isError": bool(r.is_error), "text": text, "progress": progress}

            where = {"registry": registry, "organization": "test"}
            out["push"] = await call("lume_push", {"name": "src", "image": "img:mcp", "chunk_size_mb": 8, **where})
            out["pull"] = await call("lume_pull", {"image": "img:mcp", "name": "dst", **where})
            out["missing"] = await call("lume_pull", {"image": "img:nope", "name": "nope", **where})
    print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
