#!/usr/bin/env python3
"""An OPC UA server built on asyncua (python-opcua's asyncio successor), an
implementation independent of the agent's, for end-to-end tests and the
benchmark.

    opcua_server.py --port PORT [--nodes nodes.json] [--scale N] [--tick MS]
                    [--cert server.der --key server.pem --trust client.der ...]
                    [--user NAME:PASSWORD]

Serves opc.tcp://127.0.0.1:PORT/outpost/ with namespace urn:outpost:test at
index 2. nodes.json is a list of typed variables, each created as
ns=2;s=<name>:

    [{"name": "Int32", "type": "Int32", "value": -70000}, ...]

`type` is an asyncua VariantType name (Boolean, SByte, Byte, Int16, UInt16,
Int32, UInt32, Int64, UInt64, Float, Double, String, DateTime, ByteString,
LocalizedText, Guid); a list `value` makes an array of that type. A DateTime
is given as RFC 3339 text, a ByteString as hex.

--scale N adds N Double variables ns=2;s=n0 .. n<N-1> (value i), in folders
of 100; --tick MS
adds ns=2;s=Counter, an Int64 that counts up every MS milliseconds, and, with
--scale, sets every scale variable to a new value at each tick.

Without --cert the only endpoint has security None. With --cert and --key the
endpoints are Basic256Sha256, Aes128_Sha256_RsaOaep and Aes256_Sha256_RsaPss
in SignAndEncrypt mode, and a client must present one of the --trust
certificates. With --user only that user and password may open a session
(no anonymous access).

Prints `listening opc.tcp://127.0.0.1:PORT/outpost/` on stdout once it
serves. Exits with status 3 and a message on stderr if asyncua cannot be
imported.
"""

import argparse
import asyncio
import datetime
import json
import sys
import uuid

try:
    from asyncua import Server, ua
    from asyncua.server.user_managers import UserManager
    from asyncua.crypto.permission_rules import User, UserRole
except ImportError as e:  # pragma: no cover
    print(f"asyncua is not importable: {e}", file=sys.stderr)
    sys.exit(3)


def variant(kind, value):
    vt = getattr(ua.VariantType, kind)

    def one(v):
        if kind == "DateTime":
            return datetime.datetime.fromisoformat(v.replace("Z", "+00:00"))
        if kind == "ByteString":
            return bytes.fromhex(v)
        if kind == "LocalizedText":
            return ua.LocalizedText(v, "en")
        if kind == "Guid":
            return uuid.UUID(v)
        return v

    if isinstance(value, list):
        return ua.Variant([one(v) for v in value], vt)
    return ua.Variant(one(value), vt)


class OneUser(UserManager):
    def __init__(self, name, password):
        self.name = name
        self.password = password

    def get_user(self, iserver, username=None, password=None, certificate=None):
        if username == self.name and password == self.password:
            return User(role=UserRole.User)
        return None


async def main():
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--nodes")
    p.add_argument("--scale", type=int, default=0)
    p.add_argument("--tick", type=int, default=0)
    p.add_argument("--cert")
    p.add_argument("--key")
    p.add_argument("--trust", action="append", default=[])
    p.add_argument("--user")
    a = p.parse_args()

    user_manager = None
    if a.user:
        name, _, password = a.user.partition(":")
        user_manager = OneUser(name, password)
    server = Server(user_manager=user_manager)
    await server.init()
    url = f"opc.tcp://127.0.0.1:{a.port}/outpost/"
    server.set_endpoint(url)
    server.set_server_name("Outpost test server")
    if a.cert:
        await server.set_application_uri("urn:outpost:test:server")
        server.set_security_policy(
            [
                ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt,
                ua.SecurityPolicyType.Aes128Sha256RsaOaep_SignAndEncrypt,
                ua.SecurityPolicyType.Aes256Sha256RsaPss_SignAndEncrypt,
            ]
        )
        await server.load_certificate(a.cert)
        await server.load_private_key(a.key)
        from asyncua.crypto.truststore import TrustStore
        from asyncua.crypto.validator import (
            CertificateValidator,
            CertificateValidatorOptions,
        )
        from pathlib import Path

        store = TrustStore([Path(t).parent for t in a.trust], [])
        await store.load()
        validator = CertificateValidator(
            CertificateValidatorOptions.TRUSTED_VALIDATION
            | CertificateValidatorOptions.PEER_CLIENT,
            store,
        )
        server.set_certificate_validator(validator)
    else:
        server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
    if a.user:
        server.set_security_IDs(["Username"])

    idx = await server.register_namespace("urn:outpost:test")
    objects = server.nodes.objects
    if a.nodes:
        with open(a.nodes) as f:
            for n in json.load(f):
                await objects.add_variable(
                    ua.NodeId(n["name"], idx), n["name"], variant(n["type"], n["value"])
                )
    # The scale variables in folders of 100 (asyncua checks each new
    # reference against all of its parent's, so 10,000 children of one node
    # take minutes), made with one AddNodes call each.
    scale = [ua.NodeId(f"n{i}", idx) for i in range(a.scale)]
    for k in range((a.scale + 99) // 100):
        await objects.add_folder(ua.NodeId(f"f{k}", idx), f"f{k}")
    items = []
    for i, nid in enumerate(scale):
        item = ua.AddNodesItem()
        item.RequestedNewNodeId = nid
        item.BrowseName = ua.QualifiedName(f"n{i}", idx)
        item.NodeClass = ua.NodeClass.Variable
        item.ParentNodeId = ua.NodeId(f"f{i // 100}", idx)
        item.ReferenceTypeId = ua.NodeId(ua.ObjectIds.HasComponent)
        item.TypeDefinition = ua.NodeId(ua.ObjectIds.BaseDataVariableType)
        attrs = ua.VariableAttributes()
        attrs.DisplayName = ua.LocalizedText(f"n{i}")
        attrs.Value = ua.Variant(float(i), ua.VariantType.Double)
        attrs.DataType = ua.NodeId(ua.ObjectIds.Double)
        attrs.ValueRank = ua.ValueRank.Scalar
        attrs.AccessLevel = ua.AccessLevel.CurrentRead.mask
        attrs.UserAccessLevel = ua.AccessLevel.CurrentRead.mask
        item.NodeAttributes = attrs
        items.append(item)
    if items:
        results = await server.iserver.isession.add_nodes(items)
        bad = [r.StatusCode for r in results if not r.StatusCode.is_good()]
        if bad:
            print(f"adding scale variables failed: {bad[0]}", file=sys.stderr)
            sys.exit(4)
    counter = None
    if a.tick:
        node = await objects.add_variable(
            ua.NodeId("Counter", idx), "Counter", ua.Variant(0, ua.VariantType.Int64)
        )
        counter = node.nodeid

    async with server:
        print(f"listening {url}", flush=True)
        n = 0
        while True:
            if not a.tick:
                await asyncio.sleep(3600)
                continue
            await asyncio.sleep(a.tick / 1000)
            n += 1
            await server.write_attribute_value(
                counter, ua.DataValue(ua.Variant(n, ua.VariantType.Int64))
            )
            for i, nid in enumerate(scale):
                await server.write_attribute_value(
                    nid, ua.DataValue(ua.Variant(float(i + n), ua.VariantType.Double))
                )


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
