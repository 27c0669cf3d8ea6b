#!/usr/bin/env python3
"""A Modbus TCP or RTU server built on pymodbus, an implementation independent
of the agent's, for end-to-end tests.

    pymodbus_server.py --port PORT --points points.json
    pymodbus_server.py --serial /dev/ttyX [--baud 19200] [--unit 1] --points points.json
    pymodbus_server.py ... --writes writes.json

With --port it serves Modbus TCP on 127.0.0.1:PORT. With --serial it serves
Modbus RTU (8 data bits, no parity, 1 stop bit) on a serial line, such as one
end of a pty pair made by socat; like a device on an RS-485 bus it answers
only requests for its own unit id and stays silent for every other one.

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

With --writes FILE it counts every write request it receives (function
codes 5, 6, 15, 16 and 22), by table and starting address, and rewrites FILE
(atomically, by a rename) after each one: `{"holding/0": 1, "coil/3": 2}`.
The count is of requests received, before the datastore applies them, so a
test that asserts a command wrote once sees every attempt, not only the ones
that succeeded. The file exists (`{}`) from the moment the server listens.

Prints `listening 127.0.0.1:PORT` (TCP) or `listening /dev/ttyX` (RTU) on
stdout once it serves. Exits with status 3 and a message on stderr if pymodbus
(or, for --serial, pyserial) cannot be imported.
"""

import argparse
import asyncio
import json
import os
import struct
import sys

try:
    from pymodbus.datastore import (
        ModbusSequentialDataBlock,
        ModbusServerContext,
    )
    from pymodbus import FramerType
    from pymodbus.server import ModbusSerialServer, StartAsyncTcpServer

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


def server_context(tables, unit=1):
    # Blocks are addressed from 1: values[0] is protocol address 0.
    device = ModbusDeviceContext(
        co=ModbusSequentialDataBlock(1, tables["coil"]),
        di=ModbusSequentialDataBlock(1, tables["discrete"]),
        hr=ModbusSequentialDataBlock(1, tables["holding"]),
        ir=ModbusSequentialDataBlock(1, tables["input"]),
    )
    try:
        return ModbusServerContext(devices={unit: device}, single=False)
    except TypeError:  # pymodbus before 3.10 named the argument `slaves`.
        return ModbusServerContext(slaves={unit: device}, single=False)


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


def only_unit(unit):
    """A pymodbus `trace_pdu` hook that drops requests for other unit ids.

    Every device on a serial bus sees every request and only the addressed one
    answers (Modbus over Serial Line V1.02, 2.2). pymodbus 3.16 instead
    answers a request for a unit it does not serve with exception 4, device
    failure, even with ignore_missing_devices, so the request is dropped here
    before it reaches the datastore. Broadcasts (unit 0) are dropped too, so
    a broadcast write is not applied.
    """

    def trace(sending, pdu):
        if not sending and pdu.dev_id != unit:
            # Said on stderr so a test can tell silence from a lost request.
            print(
                f"not answering a request for unit {pdu.dev_id}",
                file=sys.stderr,
                flush=True,
            )
            return None
        return pdu

    return trace


# The function codes that write, and the table each writes.
WRITE_TABLES = {5: "coil", 15: "coil", 6: "holding", 16: "holding", 22: "holding"}


class WriteCounter:
    """Counts write requests by table and starting address into a JSON file."""

    def __init__(self, path):
        self.path = path
        self.counts = {}
        self.save()

    def save(self):
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.counts, f, sort_keys=True)
        os.replace(tmp, self.path)

    def saw(self, pdu):
        table = WRITE_TABLES.get(pdu.function_code)
        if table is None:
            return
        key = f"{table}/{pdu.address}"
        self.counts[key] = self.counts.get(key, 0) + 1
        self.save()


def tracer(unit=None, counter=None):
    """A `trace_pdu` hook: drops requests for other unit ids (if `unit`),
    and counts the write requests it lets through (if `counter`)."""
    drop = only_unit(unit) if unit is not None else None

    def trace(sending, pdu):
        if drop is not None and drop(sending, pdu) is None:
            return None
        if not sending and counter is not None:
            counter.saw(pdu)
        return pdu

    return trace


async def serve_serial(args, context, counter):
    try:
        import serial  # noqa: F401  pymodbus opens the line with pyserial.
    except ImportError as e:
        print(
            f"pyserial is not importable by {sys.executable}: {e}; "
            "install it with: pip install pyserial",
            file=sys.stderr,
        )
        sys.exit(3)
    server = ModbusSerialServer(
        context,
        framer=FramerType.RTU,
        port=args.serial,
        baudrate=args.baud,
        bytesize=8,
        parity="N",
        stopbits=1,
        trace_pdu=tracer(args.unit, counter),
    )
    # In the background, serve_forever returns once the line is open.
    await server.serve_forever(background=True)
    print(f"listening {args.serial}", flush=True)
    await server.serving


async def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--port", type=int, help="serve Modbus TCP on 127.0.0.1:PORT")
    where.add_argument("--serial", help="serve Modbus RTU on this serial device")
    parser.add_argument("--baud", type=int, default=19200, help="RTU baud rate")
    parser.add_argument("--unit", type=int, default=1, help="the unit id served")
    parser.add_argument("--points", required=True, help="JSON file of typed points")
    parser.add_argument("--writes", help="count write requests into this JSON file")
    args = parser.parse_args()
    with open(args.points, encoding="utf-8") as f:
        points = json.load(f)
    context = server_context(build_tables(points), args.unit)
    counter = WriteCounter(args.writes) if args.writes else None
    if args.serial is not None:
        await serve_serial(args, context, counter)
        return
    server = asyncio.create_task(
        StartAsyncTcpServer(
            context=context,
            address=("127.0.0.1", args.port),
            trace_pdu=tracer(None, counter) if counter is not None else None,
        )
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
