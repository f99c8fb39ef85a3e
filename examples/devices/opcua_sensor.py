#!/usr/bin/env python3
"""An OPC UA boiler (asyncua server), for the user-mapper example and test.

  ns=2;s=Temperature  water temperature, Double, °C; heads for the set point (or drifts with --drift)
  ns=2;s=Setpoint     set point, Double, writable: the Device's desired value lands here
  ns=2;s=Burner       Boolean, on while the temperature is below the set point

Prints one line per set-point change ("setpoint 45.0"), flushed, so a test can wait for it.

Usage: opcua_sensor.py --port PORT [--host 127.0.0.1] [--drift]
Serves opc.tcp://HOST:PORT/sedna/boiler without security (loopback only).
Needs the PyPI package asyncua (scripts/setup installs it into .venv).
"""
import argparse
import asyncio
import logging
import math

from asyncua import Server, ua


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--drift", action="store_true", help="the temperature follows a slow sine")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)

    server = Server()
    await server.init()
    server.set_endpoint(f"opc.tcp://{args.host}:{args.port}/sedna/boiler")
    server.set_server_name("sedna example boiler")
    server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
    ns = await server.register_namespace("urn:sedna:example:boiler")
    boiler = await server.nodes.objects.add_object(ua.NodeId("Boiler", ns), "Boiler")
    temperature = await boiler.add_variable(ua.NodeId("Temperature", ns), "Temperature", 40.0)
    setpoint = await boiler.add_variable(ua.NodeId("Setpoint", ns), "Setpoint", 60.0)
    burner = await boiler.add_variable(ua.NodeId("Burner", ns), "Burner", True)
    await setpoint.set_writable()

    async with server:
        print(f"serving opc.tcp://{args.host}:{args.port}/sedna/boiler", flush=True)
        tick, said = 0, None
        while True:
            goal = await setpoint.read_value()
            if goal != said:
                print(f"setpoint {goal}", flush=True)
                said = goal
            now = await temperature.read_value()
            if args.drift:
                now = goal + 2.0 * math.sin(tick / 20.0)
            else:
                now += max(-0.5, min(0.5, goal - now))
            await temperature.write_value(round(now, 2))
            await burner.write_value(bool(now < goal))
            tick += 1
            await asyncio.sleep(0.1)


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
