"""What the retry layer of pipelines/storage.py costs when storage is healthy: reads through RetryingFileSystem
against the same reads on pyarrow's bare S3 file system, from one S3-compatible server (moto, in this process, on
127.0.0.1), interleaved round by round so that both see the same machine load.

    python benchmarks/storage_overhead.py [--files 300] [--file-kb 30] [--big-mb 64] [--rounds 3]

Prints one JSON line per measurement and a summary: per small file (a folder source's image: open + whole read), and
per MiB of a large file (a checkpoint download: 64 MiB reads), seconds bare vs wrapped and their ratio. moto answers
in-process in Python, so absolute times are far below a real bucket's (tens of ms per request): the ratio bounds the
wrapper's share from above.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=300)
    ap.add_argument("--file-kb", type=int, default=30)
    ap.add_argument("--big-mb", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args(argv)

    import boto3
    import pyarrow.fs as pafs
    from moto.server import ThreadedMotoServer

    from pipelines import storage

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update({"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "bench",
                       "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
                       "AWS_EC2_METADATA_DISABLED": "true"})
    try:
        s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"], region_name="us-east-1")
        s3.create_bucket(Bucket="bench")
        blob = os.urandom(a.file_kb * 1024)
        for i in range(a.files):
            s3.put_object(Bucket="bench", Key=f"imgs/{i:05d}.jpg", Body=blob)
        s3.put_object(Bucket="bench", Key="ckpt/state.pt", Body=os.urandom(a.big_mb * 2**20))
        bare, _ = pafs.FileSystem.from_uri("s3://bench")
        wrapped, _ = storage.resolve("s3://bench", setting="bench")
        assert isinstance(wrapped, storage.RetryingFileSystem)
        paths = [f"bench/imgs/{i:05d}.jpg" for i in range(a.files)]

        def small(fs) -> float:
            t0 = time.perf_counter()
            for p in paths:
                with fs.open_input_stream(p) as f:
                    assert len(f.read()) == len(blob)
            return (time.perf_counter() - t0) / len(paths)

        def big(fs) -> float:
            t0 = time.perf_counter()
            with fs.open_input_file("bench/ckpt/state.pt") as f:
                n = 0
                while chunk := f.read(storage.COPY_CHUNK_BYTES):
                    n += len(chunk)
            assert n == a.big_mb * 2**20
            return (time.perf_counter() - t0) / a.big_mb

        times: dict[str, list[float]] = {k: [] for k in ("small_bare", "small_wrapped", "big_bare", "big_wrapped")}
        for r in range(a.rounds):
            for kind, fn in (("small", small), ("big", big)):
                order = (("bare", bare), ("wrapped", wrapped)) if r % 2 == 0 else (("wrapped", wrapped), ("bare", bare))
                for name, fs in order:
                    s = fn(fs)
                    times[f"{kind}_{name}"].append(s)
                    print(json.dumps({"round": r, "what": f"{kind}_{name}", "seconds": round(s, 6)}), flush=True)
        med = {k: statistics.median(v) for k, v in times.items()}
        print(json.dumps({
            "summary": "median over rounds; ratio = wrapped / bare (1.0: no cost)",
            "per_small_file_s": {"bare": round(med["small_bare"], 6), "wrapped": round(med["small_wrapped"], 6),
                                 "ratio": round(med["small_wrapped"] / med["small_bare"], 3)},
            "per_MiB_of_a_large_file_s": {"bare": round(med["big_bare"], 6), "wrapped": round(med["big_wrapped"], 6),
                                          "ratio": round(med["big_wrapped"] / med["big_bare"], 3)},
            "files": a.files, "file_kb": a.file_kb, "big_mb": a.big_mb, "rounds": a.rounds}), flush=True)
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
