"""Why xxh3-64 checksums: single-thread hashing speed of 256 MiB, next to the alternatives.

Usage: python benchmarks/checksum_speed.py
"""

import hashlib
import os
import time
import zlib

import xxhash


def main() -> None:
    data = os.urandom(256 << 20)
    for name, fn in [
        ("xxh3_64", xxhash.xxh3_64_intdigest),
        ("crc32 (zlib)", zlib.crc32),
        ("sha256", lambda b: hashlib.sha256(b).digest()),
        ("blake2b-128", lambda b: hashlib.blake2b(b, digest_size=16).digest()),
    ]:
        t = time.perf_counter()
        fn(data)
        print(f"{name:<14} {len(data) / (time.perf_counter() - t) / 1e9:6.2f} GB/s")


if __name__ == "__main__":
    main()
