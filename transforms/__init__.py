"""Reusable Beam pieces: sources, decode, resize, labels, shuffle, sinks."""
