#!/usr/bin/env python3
"""A Modbus TCP temperature sensor with a thermostat set point (pymodbus), for the device examples
and tests.

  input register 0      temperature × 10, int16 (21.5 °C reads 215); drifts with --drift
  holding register 0-1  set point, float32 (high word first), written by the Device's desired value
  coil 0                heater on/off, follows temperature < set point

Usage: modbus_sensor.py --port PORT [--host 127.0.0.1] [--drift]
Needs the PyPI package pymodbus (scripts/setup installs it into .venv).
"""
import argparse
import asyncio
import math
import logging
import struct

from pymodbus.datastore import (
    ModbusDeviceContext,
    ModbusSequentialDataBlock,
    ModbusServerContext,
)
from pymodbus.server import ModbusTcpServer


def words_of(value: float) -> list[int]:
    hi, lo = struct.unpack(">HH", struct.pack(">f", value))
    return [hi, lo]


def value_of(words: list[int]) -> float:
    return struct.unpack(">f", struct.pack(">HH", *words))[0]


async def simulate(server: ModbusTcpServer, drift: bool) -> None:
    tick = 0
    while True:
        temperature = 21.5 + (2.0 * math.sin(tick / 20.0) if drift else 0.0)
        await server.async_setValues(0, 4, 0, [int(round(temperature * 10)) & 0xFFFF])
        set_point = value_of(await server.async_getValues(0, 3, 0, count=2))
        await server.async_setValues(0, 5, 0, [temperature < set_point])
        tick += 1
        await asyncio.sleep(0.1)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--drift", action="store_true", help="the temperature follows a slow sine")
    args = parser.parse_args()
    # pymodbus 3.16 warns that this datastore API goes away in 4.0 (setup pins < 4).
    logging.getLogger("pymodbus").setLevel(logging.ERROR)
    # pymodbus blocks start at address 1: protocol address 0 is values[0].
    device = ModbusDeviceContext(
        co=ModbusSequentialDataBlock(1, [0] * 16),
        di=ModbusSequentialDataBlock(1, [0] * 16),
        hr=ModbusSequentialDataBlock(1, words_of(20.0) + [0] * 14),
        ir=ModbusSequentialDataBlock(1, [215] + [0] * 15),
    )
    context = ModbusServerContext(devices=device, single=True)
    server = ModbusTcpServer(context, address=(args.host, args.port))
    task = asyncio.create_task(simulate(server, args.drift))
    print(f"modbus sensor on {args.host}:{args.port}", flush=True)
    await server.serve_forever()
    task.cancel()


if __name__ == "__main__":
    asyncio.run(main())
