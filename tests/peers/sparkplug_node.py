#!/usr/bin/env python3
"""A Sparkplug B edge node for end-to-end tests, scripted line by line, whose
payloads are encoded by pysparkplug (pip `pysparkplug`, which compiles the
Eclipse Tahu schema with Google's protobuf): an implementation independent
of the agent's decoder. MQTT through paho-mqtt.

    sparkplug_node.py --port PORT --group G --node N

Connects to 127.0.0.1:PORT, subscribes to spBv1.0/G/NCMD/N, prints `ready`,
then reads one JSON command per line from stdin and prints `ok <op>` once
the broker has it (QoS 1 for data, as a test needs it delivered):

    {"op": "nbirth", "seq": 0, "bdseq": 1, "metrics": [M, ...]}
    {"op": "ndata" | "dbirth" | "ddata" | "ddeath", "seq": S, "device": D, "metrics": [M, ...]}
    {"op": "ndeath", "bdseq": 1}
    {"op": "raw", "topic": "spBv1.0/...", "hex": "ff00..."}

where M is {"name": ..., "alias": ..., "type": "DOUBLE", "value": ...}
(name or alias may be left out; type is a pysparkplug DataType name).
Every NCMD that arrives is printed as `ncmd <topic> <json>`, the JSON being
{metric name: value} as pysparkplug decodes it. Status 3 if pysparkplug or
paho-mqtt cannot be imported.
"""

import argparse
import json
import sys
import threading

try:
    import paho.mqtt.client as mqtt
    import pysparkplug as sp
except ImportError as e:  # pragma: no cover
    print(f"cannot import pysparkplug / paho-mqtt (pip install pysparkplug): {e}", file=sys.stderr)
    sys.exit(3)

TS = 1_796_558_400_000  # 2026-12-06T12:00:00Z in milliseconds.

out_lock = threading.Lock()


def say(line):
    with out_lock:
        print(line, flush=True)


def metric(m):
    dt = sp.DataType[m["type"]]
    value = m.get("value")
    if isinstance(value, list):
        value = tuple(value)
    return sp.Metric(
        timestamp=m.get("timestamp", TS),
        name=m.get("name"),
        alias=m.get("alias"),
        datatype=dt,
        value=value,
    )


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--group", required=True)
    ap.add_argument("--node", required=True)
    a = ap.parse_args()

    client = mqtt.Client(client_id=f"sparkplug-{a.node}", clean_session=True)
    subscribed = threading.Event()
    ncmd = f"spBv1.0/{a.group}/NCMD/{a.node}"

    def on_connect(c, _u, _f, rc):
        if rc != 0:
            print(f"connect refused: {rc}", file=sys.stderr)
            sys.exit(1)
        c.subscribe(ncmd, qos=0)

    def on_subscribe(_c, _u, _mid, _q):
        subscribed.set()

    def on_message(_c, _u, msg):
        cmd = sp.NCmd.decode(msg.payload)
        values = {m.name: m.value for m in cmd.metrics}
        say(f"ncmd {msg.topic} {json.dumps(values)}")

    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_message = on_message
    client.connect("127.0.0.1", a.port, keepalive=30)
    client.loop_start()
    if not subscribed.wait(30):
        print("not subscribed within 30 s", file=sys.stderr)
        sys.exit(1)
    say("ready")

    base = f"spBv1.0/{a.group}"
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        c = json.loads(line)
        op = c["op"]
        metrics = tuple(metric(m) for m in c.get("metrics", []))
        seq = c.get("seq", 0)
        dev = c.get("device")
        if op == "nbirth":
            bd = sp.Metric(timestamp=TS, name="bdSeq", datatype=sp.DataType.INT64, value=c["bdseq"])
            topic, payload = f"{base}/NBIRTH/{a.node}", sp.NBirth(TS, seq, (bd,) + metrics).encode()
        elif op == "ndata":
            topic, payload = f"{base}/NDATA/{a.node}", sp.NData(TS, seq, metrics).encode()
        elif op == "dbirth":
            topic, payload = f"{base}/DBIRTH/{a.node}/{dev}", sp.DBirth(TS, seq, metrics).encode()
        elif op == "ddata":
            topic, payload = f"{base}/DDATA/{a.node}/{dev}", sp.DData(TS, seq, metrics).encode()
        elif op == "ddeath":
            topic, payload = f"{base}/DDEATH/{a.node}/{dev}", sp.DDeath(TS, seq).encode()
        elif op == "ndeath":
            bd = sp.Metric(timestamp=TS, name="bdSeq", datatype=sp.DataType.INT64, value=c["bdseq"])
            topic, payload = f"{base}/NDEATH/{a.node}", sp.NDeath(TS, bd).encode()
        elif op == "raw":
            topic, payload = c["topic"], bytes.fromhex(c["hex"])
        else:
            print(f"unknown op {op!r}", file=sys.stderr)
            sys.exit(1)
        info = client.publish(topic, payload, qos=1)
        info.wait_for_publish(timeout=30)
        if not info.is_published():
            print(f"{op} not published within 30 s", file=sys.stderr)
            sys.exit(1)
        say(f"ok {op}")
    client.loop_stop()
    client.disconnect()


if __name__ == "__main__":
    main()
