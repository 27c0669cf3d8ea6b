#!/usr/bin/env python3
"""A Modbus TCP server built on pymodbus, an implementation independent of the
agent's, for end-to-end tests.

    pymodbus_server.py --port PORT --points points.json

points.json is a list of typed values; this script encodes them itself with
`struct`, so the registers it serves do not come from the agent's codec:

    [{"table": "holding", "address": 0, "type": "f32", "order": "cdab",
      "length": 0, "value": -1.5}, ...]

`table` is coil, discrete, holding or input; `type` is bool (coil and discrete
only), u16, i16, u32, i32, u64, i64, f32, f64 or string; `order` is abcd, badc,
cdab or dcba; `length` is a string's length in registers. Naming the big-endian
bytes of a value A B C D ..., abcd keeps them, badc swaps the two bytes of each
register, cdab reverses the order of the registers and dcba does both. Strings
are UTF-8 padded with NULs to `length` registers; their registers stay in order
and only badc and dcba swap the bytes in each register.

Prints `listening 127.0.0.1:PORT` on stdout once it accepts connections. Exits
with status 3 and a message on stderr if pymodbus cannot be imported.
"""

import argparse
import asyncio
import json
import struct
import sys

try:
    from pymodbus.datastore import (
        ModbusSequentialDataBlock,
        ModbusServerContext,
    )
    from pymodbus.server import StartAsyncTcpServer

    try:
        from pymodbus.datastore import ModbusDeviceContext
    except ImportError:  # pymodbus before 3.10 called it a slave context.
        from pymodbus.datastore import ModbusSlaveContext as ModbusDeviceContext
except ImportError as e:
    print(
        f"pymodbus is not importable by {sys.executable}: {e}; "
        "install it with: pip install 'pymodbus>=3.8,<4'",
        file=sys.stderr,
    )
    sys.exit(3)

FORMATS = {
    "u16": ">H",
    "i16": ">h",
    "u32": ">I",
    "i32": ">i",
    "u64": ">Q",
    "i64": ">q",
    "f32": ">f",
    "f64": ">d",
}
TABLE_SIZE = 1024


def register_words(point):
    """The registers that hold a point's value, as the device sends them."""
    kind = point["type"]
    order = point.get("order", "abcd")
    if order not in ("abcd", "badc", "cdab", "dcba"):
        raise ValueError(f"unknown order {order!r}")
    if kind == "string":
        width = 2 * point["length"]
        raw = point["value"].encode("utf-8")
        if len(raw) > width:
            raise ValueError(f"{point['value']!r} does not fit {point['length']} registers")
        raw = raw.ljust(width, b"\0")
        reverse = False
    else:
        raw = struct.pack(FORMATS[kind], point["value"])
        reverse = order in ("cdab", "dcba")
    pairs = [raw[i : i + 2] for i in range(0, len(raw), 2)]
    if order in ("badc", "dcba"):
        pairs = [p[::-1] for p in pairs]
    if reverse:
        pairs.reverse()
    return [int.from_bytes(p, "big") for p in pairs]


def build_tables(points):
    tables = {
        "coil": [False] * TABLE_SIZE,
        "discrete": [False] * TABLE_SIZE,
        "holding": [0] * TABLE_SIZE,
        "input": [0] * TABLE_SIZE,
    }
    for point in points:
        table = tables[point["table"]]
        at = point["address"]
        if point["table"] in ("coil", "discrete"):
            if point["type"] != "bool":
                raise ValueError(f"a {point['table']} point must be bool: {point}")
            values = [bool(point["value"])]
        else:
            values = register_words(point)
        if at + len(values) > TABLE_SIZE:
            raise ValueError(f"point past address {TABLE_SIZE}: {point}")
        table[at : at + len(values)] = values
    return tables


def server_context(tables):
    # Blocks are addressed from 1: values[0] is protocol address 0.
    device = ModbusDeviceContext(
        co=ModbusSequentialDataBlock(1, tables["coil"]),
        di=ModbusSequentialDataBlock(1, tables["discrete"]),
        hr=ModbusSequentialDataBlock(1, tables["holding"]),
        ir=ModbusSequentialDataBlock(1, tables["input"]),
    )
    try:
        return ModbusServerContext(devices={1: device}, single=False)
    except TypeError:  # pymodbus before 3.10 named the argument `slaves`.
        return ModbusServerContext(slaves={1: device}, single=False)


async def announce_when_ready(port):
    while True:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.02)
            continue
        writer.close()
        print(f"listening 127.0.0.1:{port}", flush=True)
        return


async def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--points", required=True, help="JSON file of typed points")
    args = parser.parse_args()
    with open(args.points, encoding="utf-8") as f:
        points = json.load(f)
    context = server_context(build_tables(points))
    server = asyncio.create_task(
        StartAsyncTcpServer(context=context, address=("127.0.0.1", args.port))
    )
    ready = asyncio.create_task(announce_when_ready(args.port))
    done, _ = await asyncio.wait({server, ready}, return_when=asyncio.FIRST_COMPLETED)
    if server in done:
        # The server only returns when it failed to start (port taken, ...).
        server.result()
        sys.exit("pymodbus server stopped")
    await server


if __name__ == "__main__":
    asyncio.run(main())
