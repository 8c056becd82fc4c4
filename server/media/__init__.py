"""Media: content-addressed artifact storage and safe decoding of input images."""
