"""The training runtime: launch environment, data, optimizer, ZeRO engine, loop, checkpoints."""
