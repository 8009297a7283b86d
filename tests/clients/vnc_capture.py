"""Connects to a VNC server with vncdotool, given only lume's vncUrl
(vnc://:PASSWORD@HOST:PORT), and saves a screenshot.

Usage: vnc_capture.py VNC_URL OUT.png [PASSWORD_OVERRIDE]
Prints `captured WIDTHxHEIGHT COLOURS` on success; `refused TYPE` and exit
status 3 when the server refused the login (or closed the connection).
"""
import sys
import urllib.parse

from PIL import Image
from vncdotool import api

url = urllib.parse.urlsplit(sys.argv[1])
assert url.scheme == "vnc", url
password = urllib.parse.unquote(url.password or "")
if len(sys.argv) > 3:
    password = sys.argv[3]
server = f"{url.hostname}::{url.port}"
try:
    client = api.connect(server, password=password, timeout=30)
    client.captureScreen(sys.argv[2])
    client.disconnect()
except Exception as e:  # a refused login surfaces as the client's error
    print(f"refused {type(e).__name__}: {e}")
    sys.exit(3)
finally:
    api.shutdown()
img = Image.open(sys.argv[2]).convert("RGB")
colours = img.getcolors(maxcolors=1 << 20)
print(f"captured {img.width}x{img.height} {len(colours) if colours else 1 << 20}")
