"""One short function per pipeline, each reading top to bottom: load, transform, quantize, save."""
