"""moestream: run frontier-scale Mixture-of-Experts models by streaming experts from SSD.

The namespace maps the project's top-level folders: ``moestream.layouts`` (the pack format),
``moestream.quant`` (group quantization and error metrics), ``moestream.convert`` (Hugging Face
checkpoint -> pack), ``moestream.runtime`` and ``moestream.metal``. The CLI lives in
``moestream.main``.
"""

__version__ = "0.1.0"
