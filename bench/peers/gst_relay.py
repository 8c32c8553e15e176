"""GStreamer's fan-out as a peer: udpsrc ! multiudpsink, with every listener
added as a client (C all the way; Python only builds the pipeline).

    /usr/bin/python3 bench/peers/gst_relay.py INGEST_PORT DEST_FILE

Run with Debian's python3 (python3-gi, gir1.2-gstreamer-1.0). The client
list goes through the element's add signal because a clients= string for
thousands of listeners is longer than one command-line argument may be.
"""
import signal
import sys

import gi

gi.require_version("Gst", "1.0")
from gi.repository import GLib, Gst  # noqa: E402


def main() -> None:
    port, dest_file = int(sys.argv[1]), sys.argv[2]
    Gst.init(None)
    pipeline = Gst.parse_launch(
        f"udpsrc address=127.0.0.1 port={port} buffer-size=8388608 ! "
        "multiudpsink name=out sync=false async=false buffer-size=8388608 bind-address=127.0.0.1")
    sink = pipeline.get_by_name("out")
    with open(dest_file) as f:
        for line in f:
            if line.strip():
                ip, p = line.split()
                sink.emit("add", ip, int(p))
    pipeline.set_state(Gst.State.PLAYING)
    loop = GLib.MainLoop()
    GLib.unix_signal_add(GLib.PRIORITY_DEFAULT, signal.SIGTERM, loop.quit)
    print("ready", flush=True)
    loop.run()
    pipeline.set_state(Gst.State.NULL)


if __name__ == "__main__":
    main()
