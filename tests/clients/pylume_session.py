"""Drives a lume server with lume's own Python SDK, pylume, unchanged.

Usage: python pylume_session.py PORT PHASE
  PHASE "make": list, create, get, update (then the test makes the VM's
  network `none`); PHASE "use": run, get, stop, clone, a missing VM,
  delete, list.
The last stdout line is "RESULT " and a JSON object of what pylume
returned (pylume prints curl commands on stdout before it).
"""

import asyncio
import json
import sys

from pylume import PyLume, VMConfig, VMRunOpts
from pylume.exceptions import LumeConfigError, LumeNotFoundError


def status(vm):
    return {
        "name": vm.name,
        "state": vm.state,
        "os": vm.os,
        "cpu": vm.cpu,
        "memory_size": vm.memory_size,
        "disk_total": vm.disk_size.total,
        "vnc_url": vm.vnc_url,
        "ip_address": vm.ip_address,
    }


async def make(p):
    out = {"before": [v.name for v in await p.list_vms()]}
    await p.create_vm(
        VMConfig(name="py", os="linux", cpu=1, memory="256MB", diskSize="16MB")
    )
    out["created"] = status(await p.get_vm("py"))
    await p.update_vm("py", {"cpu": 2, "memory": "512MB"})
    out["updated"] = status(await p.get_vm("py"))
    return out


async def use(p):
    out = {}
    await p.run_vm("py", VMRunOpts(no_display=True))
    out["running"] = status(await p.get_vm("py"))
    await p.stop_vm("py")
    out["stopped"] = status(await p.get_vm("py"))
    try:
        await p.clone_vm("py", "py2")
        out["clone"] = "ok"
    except LumeConfigError as e:
        # pylume 0.2.1 sends new_name where lume expects newName: lume
        # answers 400 too.
        out["clone"] = "400: " + str(e)
    try:
        await p.get_vm("ghost")
        out["ghost"] = "found"
    except LumeNotFoundError:
        out["ghost"] = "not found"
    await p.delete_vm("py")
    out["after"] = [v.name for v in await p.list_vms()]
    return out


async def main(port, phase):
    async with PyLume(port=port, use_existing_server=True, host="127.0.0.1") as p:
        out = await (make(p) if phase == "make" else use(p))
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), sys.argv[2]))
