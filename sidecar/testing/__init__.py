"""Offline models and trainer stand-ins for the demo, the tests and the benchmarks."""
