"""Image maths as pure functions: decode, resize, colour, rows."""
