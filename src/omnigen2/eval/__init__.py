"""Benchmarks: ShapesBench (``omnigen2 eval shapes``)."""
