#!/usr/bin/env python3
"""An OPC UA device mapper: serves the Devices whose protocol is `opcua` through the edge agent's
mapper interface (proto/mapper.proto), to show how a protocol the agent has no built-in mapper for
is added without changing the agent.

Device settings it reads:
  protocol configData   {endpoint: "opc.tcp://HOST:PORT/PATH"}
  property visitor      {nodeId: "ns=2;s=Temperature"}
Each property is read every collectCycle and reported; a writable property's desired value is
written to its node (as the property's type) and reported applied. A lost server is said (the
device turns offline with the reason) and retried every few seconds.

Usage: opcua_mapper.py --socket PATH [--name opcua-mapper] [--protocol opcua]
  PATH: the agent's mapper socket (`sedna up` prints it; `sedna edgecore`: DATA_DIR/mappers.sock).
Needs the PyPI packages asyncua, grpcio and grpcio-tools (scripts/setup installs them into .venv);
the Python code for proto/mapper.proto is generated at start, into a temporary directory.
"""
import argparse
import asyncio
import json
import logging
import os
import sys
import tempfile

import grpc
from asyncua import Client, ua
from grpc_tools import protoc

HERE = os.path.dirname(os.path.abspath(__file__))
PROTO = os.path.normpath(os.path.join(HERE, "..", "..", "..", "proto", "proto", "mapper.proto"))
UA_TYPES = {
    "int": ua.VariantType.Int64,
    "float": ua.VariantType.Float,
    "double": ua.VariantType.Double,
    "boolean": ua.VariantType.Boolean,
    "string": ua.VariantType.String,
}
RETRY_SECONDS = 3.0


def load_stubs(proto: str):
    """Generates mapper_pb2 / mapper_pb2_grpc from the proto file and imports them."""
    out = tempfile.mkdtemp(prefix="sedna-mapper-")
    code = protoc.main([
        "grpc_tools.protoc",
        f"-I{os.path.dirname(proto)}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        proto,
    ])
    if code != 0:
        sys.exit(f"opcua-mapper: cannot generate code from {proto}")
    sys.path.insert(0, out)
    import mapper_pb2
    import mapper_pb2_grpc
    return mapper_pb2, mapper_pb2_grpc


def say(*words) -> None:
    print("opcua-mapper:", *words, flush=True)


def text_of(value) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def typed(text: str, type_: str):
    if type_ == "boolean":
        return text.strip().lower() in ("true", "1", "on")
    if type_ == "int":
        return int(text)
    if type_ in ("float", "double"):
        return float(text)
    return text


class Device:
    """One Device served: a client to its OPC UA server, a poller per property."""

    def __init__(self, pb, outbox: asyncio.Queue, add):
        self.pb, self.outbox, self.add = pb, outbox, add
        self.id = add.device
        self.endpoint = json.loads(add.config_json or "{}").get("endpoint", "")
        self.properties = {p.name: p for p in add.properties}
        self.desired = {p.name: p.desired for p in add.properties if p.HasField("desired")}
        self.client = None
        self.task = asyncio.create_task(self.run())

    async def send(self, **kind) -> None:
        await self.outbox.put(self.pb.MapperMessage(**kind))

    async def state(self, state, message="") -> None:
        await self.send(state=self.pb.DeviceState(device=self.id, state=state, message=message))

    def node(self, name: str):
        node_id = json.loads(self.properties[name].visitor_json or "{}").get("nodeId")
        if not node_id:
            raise ValueError(f"property {name}: visitors.configData.nodeId is missing")
        return self.client.get_node(node_id)

    async def write(self, name: str, value: str) -> None:
        prop = self.properties.get(name)
        if prop is None or not prop.writable or self.client is None:
            return
        try:
            variant = ua.Variant(typed(value, prop.type), UA_TYPES.get(prop.type, ua.VariantType.String))
            await self.node(name).write_value(ua.DataValue(variant))
            await self.send(applied=self.pb.Applied(device=self.id, property=name, value=value))
        except Exception as e:  # the device says why; the mapper keeps serving it
            await self.send(failed=self.pb.PropertyFailed(device=self.id, property=name,
                                                          message=f"writing {value!r}: {e}"))

    async def poll(self, name: str) -> None:
        prop = self.properties[name]
        while True:
            try:
                value = await self.node(name).read_value()
                await self.send(report=self.pb.Report(device=self.id, property=name,
                                                      value=text_of(value)))
            except (ConnectionError, asyncio.TimeoutError, OSError):
                raise
            except Exception as e:
                await self.send(failed=self.pb.PropertyFailed(device=self.id, property=name,
                                                              message=f"reading: {e}"))
            await asyncio.sleep(max(prop.collect_cycle_ms, 100) / 1000)

    async def run(self) -> None:
        while True:
            try:
                self.client = Client(self.endpoint, timeout=4)
                await self.client.connect()
                await self.state(self.pb.DeviceState.ONLINE)
                for name, value in self.desired.items():
                    await self.write(name, value)
                await asyncio.gather(*(self.poll(n) for n in self.properties))
            except asyncio.CancelledError:
                raise
            except Exception as e:
                await self.state(self.pb.DeviceState.OFFLINE,
                                 f"OPC UA server {self.endpoint}: {e or type(e).__name__}")
            finally:
                await self.close()
            await asyncio.sleep(RETRY_SECONDS)

    async def close(self) -> None:
        client, self.client = self.client, None
        if client is not None:
            try:
                await client.disconnect()
            except Exception:
                pass

    async def stop(self) -> None:
        self.task.cancel()
        try:
            await self.task
        except asyncio.CancelledError:
            pass
        await self.close()


async def serve(args, pb, pb_grpc) -> None:
    outbox: asyncio.Queue = asyncio.Queue(maxsize=1024)
    await outbox.put(pb.MapperMessage(register=pb.Register(name=args.name, protocols=[args.protocol])))

    async def messages():
        while True:
            yield await outbox.get()

    devices: dict[str, Device] = {}
    # gRPC's default :authority for a Unix socket is the path, percent-encoded, which HTTP/2
    # servers such as the agent's refuse as malformed: name a plain one.
    options = [("grpc.default_authority", "localhost")]
    async with grpc.aio.insecure_channel(f"unix:{args.socket}", options=options) as channel:
        stub = pb_grpc.DeviceMapperStub(channel)
        try:
            async for message in stub.Attach(messages()):
                kind = message.WhichOneof("kind")
                if kind == "registered":
                    say(f"registered for {args.protocol} on node {message.registered.node}")
                elif kind == "add":
                    old = devices.pop(message.add.device, None)
                    if old is not None:
                        await old.stop()
                    devices[message.add.device] = Device(pb, outbox, message.add)
                    say(f"serving {message.add.device}")
                elif kind == "remove":
                    old = devices.pop(message.remove.device, None)
                    if old is not None:
                        await old.stop()
                    say(f"stopped {message.remove.device}")
                elif kind == "desired":
                    d = devices.get(message.desired.device)
                    if d is not None:
                        d.desired[message.desired.property] = message.desired.value
                        await d.write(message.desired.property, message.desired.value)
        finally:
            for d in devices.values():
                await d.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--socket", required=True, help="the agent's mapper socket")
    parser.add_argument("--name", default="opcua-mapper")
    parser.add_argument("--protocol", default="opcua")
    parser.add_argument("--proto", default=PROTO, help="proto/mapper.proto of this repository")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    pb, pb_grpc = load_stubs(args.proto)
    try:
        asyncio.run(serve(args, pb, pb_grpc))
    except grpc.aio.AioRpcError as e:
        sys.exit(f"opcua-mapper: the agent ended the session: {e.code().name}: {e.details()}")
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
