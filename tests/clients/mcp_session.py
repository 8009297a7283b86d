"""One MCP session with `lume serve --mcp`, driven by the official MCP Python
SDK (mcp from PyPI), for tests/e2e_mcp.rs.

Usage: mcp_session.py LUME_BIN IMAGE VM
Starts LUME_BIN serve --mcp over stdio (with this process's environment:
HOME, XDG_CONFIG_HOME, LUME_ACCEL), lists tools, prompts and resources,
makes bad calls, then drives create -> run -> exec -> stop -> clone ->
delete on VM (a Debian cloud image). Prints one line `RESULT <json>` with
what the server answered; the Rust test makes the assertions.
"""

import asyncio
import json
import os
import sys

from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client


def text_of(result):
    return "\n".join(c.text for c in result.content if getattr(c, "type", None) == "text")


def ssh_cmdlines(needle):
    """The command lines of the running ssh processes that contain needle."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            continue
        line = " ".join(a.decode(errors="replace") for a in args if a)
        if args and args[0].endswith(b"ssh") and needle in line:
            found.append(line)
    return found


def call_record(result):
    return {"isError": bool(result.is_error), "text": text_of(result)}


def server_pids(lume):
    """The pids of `LUME serve --mcp` processes."""
    pids = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                args = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
        except OSError:
            continue
        if args[:3] == [lume, "serve", "--mcp"]:
            pids.append(int(pid))
    return pids


async def killed_server_leaves_no_ssh(lume, vm):
    """A second session runs a long command; its server is killed with
    SIGKILL: the command's ssh must die with it (parent-death signal).
    Returns whether the ssh was seen and the server killed, and the ssh
    command lines left a few seconds later."""
    seen = killed = False
    before = set(server_pids(lume))
    params = StdioServerParameters(command=lume, args=["serve", "--mcp"], env=dict(os.environ))
    alias = f"HostKeyAlias=lume-{vm}"
    try:
        async with stdio_client(params) as (read, write):
            async with ClientSession(read, write) as session:
                await session.initialize()
                (pid,) = set(server_pids(lume)) - before
                task = asyncio.create_task(
                    session.call_tool("lume_exec", {"name": vm, "command": "sleep 300", "timeout": 600})
                )
                for _ in range(200):
                    if ssh_cmdlines(alias):
                        seen = True
                        break
                    await asyncio.sleep(0.1)
                os.kill(pid, 9)
                killed = True
                try:
                    await asyncio.wait_for(task, 10)
                except BaseException:
                    pass
    except BaseException:
        pass
    left = ssh_cmdlines(alias)
    for _ in range(50):
        if not left:
            break
        await asyncio.sleep(0.1)
        left = ssh_cmdlines(alias)
    return {"seen": seen, "killed": killed, "left": left}


async def main(lume, image, vm):
    params = StdioServerParameters(command=lume, args=["serve", "--mcp"], env=dict(os.environ))
    out = {}
    async with stdio_client(params) as (read, write):
        async with ClientSession(read, write) as session:
            init = await session.initialize()
            out["server"] = {"name": init.server_info.name, "instructions": init.instructions}
            tools = await session.list_tools()
            out["tools"] = {t.name: {"description": t.description, "inputSchema": t.input_schema} for t in tools.tools}
            prompts = await session.list_prompts()
            out["prompts"] = {p.name: [a.name for a in (p.arguments or [])] for p in prompts.prompts}
            got = await session.get_prompt("run-in-sandbox", {"vm_name": vm, "command": "uname -a"})
            out["prompt_text"] = got.messages[0].content.text
            resources = await session.list_resources()
            out["resources"] = sorted(str(r.uri) for r in resources.resources)
            cred = await session.read_resource("lume://credentials")
            out["credentials"] = cred.contents[0].text

            async def call(name, args, timeout=600):
                progress = []

                async def on_progress(value, total, message):
                    progress.append({"progress": value, "message": message})

                r = await session.call_tool(
                    name, args, read_timeout_seconds=timeout, progress_callback=on_progress
                )
                rec = call_record(r)
                rec["progress"] = progress
                return rec

            # Bad calls: error results, and the session goes on.
            out["bad"] = {
                "get_missing": await call("lume_get_vm", {"name": "no-such-vm"}),
                "bad_name": await call("lume_get_vm", {"name": "../etc"}),
                "missing_arg": await call("lume_get_vm", {}),
                "wrong_type": await call("lume_create_vm", {"name": "x", "cpu": "many"}),
                "bad_size": await call("lume_create_vm", {"name": "x", "memory": "lots"}),
                "cpu_zero": await call("lume_create_vm", {"name": "x", "cpu": "0"}),
                "relative_image": await call("lume_create_vm", {"name": "x", "image": "disk.qcow2"}),
                "ipsw": await call("lume_create_vm", {"name": "x", "ipsw": "latest"}),
                "shared_dir": await call("lume_run_vm", {"name": "x", "shared_dir": "tmp:ro"}),
                "run_missing": await call("lume_run_vm", {"name": "no-such-vm"}),
                "exec_missing": await call("lume_exec", {"name": "no-such-vm", "command": "true"}),
                "unknown_tool": await call("lume_frobnicate", {}),
            }

            flow = {}
            flow["list_before"] = await call("lume_list_vms", {})
            flow["create"] = await call(
                "lume_create_vm",
                {"name": vm, "image": image, "disk_size": "3GB", "cpu": 2, "memory": "1GB", "network": "nat"},
            )
            flow["get"] = await call("lume_get_vm", {"name": vm})
            flow["exec_stopped"] = await call("lume_exec", {"name": vm, "command": "true"})
            flow["run"] = await call("lume_run_vm", {"name": vm})
            flow["run_again"] = await call("lume_run_vm", {"name": vm})
            flow["clone_running"] = await call("lume_clone_vm", {"name": vm, "new_name": vm + "-c"})
            # The first boot under TCG: SSH answers once cloud-init is done.
            flow["exec"] = await call(
                "lume_exec",
                {"name": vm, "command": "cloud-init status --wait >/dev/null; hostname; id -un; echo oops >&2", "timeout": 420},
                timeout=900,
            )
            flow["exec_fails"] = await call("lume_exec", {"name": vm, "command": "echo out; echo err >&2; exit 3"})
            flow["exec_timeout"] = await call("lume_exec", {"name": vm, "command": "sleep 30", "timeout": 3})
            # Created without a password by default (no_password defaults to true).
            flow["password"] = await call("lume_exec", {"name": vm, "command": "sudo -n passwd -S lume"})
            flow["control_bytes"] = await call("lume_exec", {"name": vm, "command": "printf 'a\\000b\\033c'"})
            # A cancelled command: the SDK sends notifications/cancelled when
            # the caller gives up. Its ssh must go at once, and the guest must
            # kill the command at its timeout (15 s) although the connection
            # is gone. The command must not be on ssh's command line (ps).
            marker = "/tmp/lume-cancelled-pid"
            task = asyncio.create_task(
                call("lume_exec", {"name": vm, "command": f"echo $$ > {marker}; exec sleep 300", "timeout": 15})
            )
            alias = f"HostKeyAlias=lume-{vm}"
            seen = []
            for _ in range(200):
                seen = ssh_cmdlines(alias)
                if seen:
                    break
                await asyncio.sleep(0.1)
            await asyncio.sleep(1)
            flow["cancel_ssh_cmdlines"] = seen
            task.cancel()
            try:
                await task
                flow["cancel_finished"] = True
            except asyncio.CancelledError:
                flow["cancel_finished"] = False
            left = ssh_cmdlines(alias)
            for _ in range(50):
                if not left:
                    break
                await asyncio.sleep(0.1)
                left = ssh_cmdlines(alias)
            flow["cancel_ssh_left"] = left
            flow["cancel_guest"] = await call(
                "lume_exec",
                {
                    "name": vm,
                    "command": f"for i in $(seq 40); do kill -0 $(cat {marker}) 2>/dev/null || {{ echo dead; exit 0; }}; sleep 1; done; echo alive",
                    "timeout": 120,
                },
            )
            flow["killed_server_ssh_left"] = await killed_server_leaves_no_ssh(lume, vm)
            flow["resize_running"] = await call("lume_resize_disk", {"name": vm, "disk_size": "4GB"})
            # Lenient as lume: a number given as a string.
            flow["stop"] = await call("lume_stop_vm", {"name": vm, "timeout": "60"})
            flow["resize"] = await call("lume_resize_disk", {"name": vm, "disk_size": "4GB"})
            flow["shrink"] = await call("lume_resize_disk", {"name": vm, "disk_size": "2GB"})
            flow["clone"] = await call("lume_clone_vm", {"name": vm, "new_name": vm + "-c"})
            flow["list_after_clone"] = await call("lume_list_vms", {})
            flow["delete_clone"] = await call("lume_delete_vm", {"name": vm + "-c"})
            flow["delete"] = await call("lume_delete_vm", {"name": vm})
            flow["list_end"] = await call("lume_list_vms", {})
            flow["interfaces"] = await call("lume_network_interfaces", {})
            out["flow"] = flow
    print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3]))
