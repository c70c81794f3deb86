"""Training feed throughput: affectray's Ray Data loader against a plain torch DataLoader, same shards, same work.

What the finetune job feeds its training loop, and what one would write without Ray.
Both read the same Parquet shards and turn them into samples with the same function
(affectray.data.loaders.sample_frames / sample_clips: JPEG decode, random resized crop,
flip, colour jitter, `segments_per_batch` rows per call), and both end in the same
per-batch step (loaders.to_model_input: uint8 -> normalised float); the training loop
itself does nothing but count samples.

* Ray Data: ``build_dataset(cfg, train=True)`` and, per pass, ``iter_train_batches`` over
  ``streaming_split(1, equal=True)[0]``, as Ray Train hands the dataset to the job's worker
  (read tasks, map_batches tasks, the split coordinator, the local shuffle buffer). The
  consumer here is the driver, not a Train worker, so no CPU is set aside for it and
  Train's start-up is not counted.
* torch: a ``DataLoader(num_workers=<cores>)`` over an IterableDataset that splits the
  (per-pass shuffled) shard files between its workers, reads them with pyarrow and
  calls the same sample function, with a shuffle buffer of the same size per worker.
  Fresh workers every pass, forked (torch's defaults on Linux).

Shards: by default the FER2013 recipe's (jobs/configs/finetune-fer2013.yaml, whose data
section is used: 48 px faces, frame mode, 64 px grey, jitter): real faces, the corpus
the platform trains on. By default a pass is one whole epoch of it (28,709 faces), so
each feed's per-epoch start-up weighs what it weighs in training; ``--faces`` shortens
it (whole 512-row shards). Taken from the recipe's ingested corpus when `affectray
finetune` has prepared it, else ingested now from ../shared/data/fer2013/train.tar
(image-folder layout, as its `prepare:` does; every k-th face for ``--faces``) into a
temporary folder. ``--config`` takes another finetune config, e.g.
finetune-smoke.yaml (the sample corpus, built into a temporary folder).

Timing: an untimed warm-up pass of each feed, then ``--passes`` passes of each, interleaved
(Ray, torch, Ray, torch, ...) so that both meet the same background load; a pass is timed
from asking for the iterator to its last batch (start-up included: both pay it every
epoch). Besides each pass it prints the per-stage limits of this machine: cv2.imdecode of
the shards' JPEG bytes on every core (a process per core, nothing else; measured before and
after the passes) and the sample function alone in one process.

Last line: a JSON object with `ratio` (Ray Data samples/s over DataLoader samples/s, all
timed passes), `decode_limit_fraction` (the Ray feed's JPEG decodes/s over the decode
limit), the raw samples/s and every pass.

    .venv/bin/python bench/loader.py [--passes 2] [--faces 0] [--config jobs/configs/finetune-fer2013.yaml]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from torch.utils.data import IterableDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

REPO = Path(__file__).resolve().parents[1]
FER_CONFIG = REPO / "jobs" / "configs" / "finetune-fer2013.yaml"
ROWS_PER_SHARD = 512  # ingest's images_per_unit: one shard per 512 faces

# --------------------------------------------------------------------------- shards


def prepare_shards(config, faces: int, tmp: Path) -> tuple[str, str]:
    """A shard root of the config's corpus (``faces`` rows at most, 0 = all) and a line saying what it is."""
    from affectray.data import shards

    root = config.data.root
    source = next((job for job in config.prepare if job.out == root), None)
    if shards.list_shards(root):
        what = f"{root} (ingested before)"
    elif source is not None and Path(source.source).is_file() and source.layout == "image-folder":
        root = ingest_image_tar(source, faces, tmp)
        what = f"{root}: {source.source} ingested now ({source.layout}, {source.image_size} px)"
        faces = 0
    elif getattr(config, "sample_corpus_if_empty", False):
        from affectray.sample.shards import ensure_sample_shards

        root = str(tmp / "sample")
        ensure_sample_shards(root, image_size=config.data.image_size, seed=config.seed)
        what = f"{root}: the sample corpus, built now"
    else:
        raise SystemExit(f"no shards under {root!r} and no way to make them: run `affectray finetune` on the config")
    files = shards.list_shards(root)
    if faces:  # the first shards that hold `faces` rows: a folder of their own (no manifest: not verified)
        keep = files[: math.ceil(faces / ROWS_PER_SHARD)]
        (tmp / "subset" / shards.SHARDS_DIR).mkdir(parents=True)
        for uri in keep:
            shutil.copy(uri, tmp / "subset" / shards.SHARDS_DIR / Path(uri).name)
        root, what = str(tmp / "subset"), f"{len(keep)} of the {len(files)} shards of {what}"
    return root, what


def ingest_image_tar(job, faces: int, tmp: Path) -> str:
    """``faces`` images (0 = all), every k-th of the tar so every class is there, ingested as the recipe does."""
    import dataclasses

    from affectray.ingest.job import run_ingest

    with tarfile.open(job.source) as tar:
        members = [m for m in tar.getmembers() if m.isfile()]
        if faces:
            members = members[:: max(1, len(members) // faces)][:faces]
        tar.extractall(tmp / "images", members=members, filter="data")
    out = str(tmp / "fer-shards")
    run_ingest(dataclasses.replace(job, source=str(tmp / "images"), out=out), progress=False)
    return out


# --------------------------------------------------------------------------- limits of this machine


def _decode_shards(paths: list[str], barrier, results) -> None:
    """cv2.imdecode of every JPEG in these shards, in one process; the read is not timed."""
    import cv2
    import numpy as np
    import pyarrow.parquet as pq

    cv2.setNumThreads(1)
    blobs = []
    for path in paths:
        images = pq.read_table(path, columns=["images"]).column("images").combine_chunks().values
        blobs += [np.frombuffer(images[k].as_buffer(), np.uint8) for k in range(len(images))]
    barrier.wait()  # every process decodes at the same time: their rates add up
    start = time.perf_counter()
    for blob in blobs:
        cv2.imdecode(blob, cv2.IMREAD_COLOR)
    results.put((len(blobs), time.perf_counter() - start))


def decode_limit(paths: list[str], processes: int) -> float:
    """JPEG decodes/s of this machine: one process per core, each decoding its share of the shards.

    Spawned, not forked: a child forked from a process running Ray can hang on exit.
    """
    import multiprocessing

    shares = [paths[k::processes] for k in range(processes) if paths[k::processes]]
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(len(shares)), context.Queue()
    workers = [context.Process(target=_decode_shards, args=(share, barrier, results)) for share in shares]
    for worker in workers:
        worker.start()
    rates = [count / seconds for count, seconds in (results.get() for _ in workers)]
    for worker in workers:
        worker.join()
    return sum(rates)


def function_rate(cfg, path: str) -> tuple[float, float]:
    """(samples/s, JPEG decodes per sample) of the sample function alone, one process, on one shard."""
    import pyarrow.parquet as pq

    from affectray.data import loaders

    decodes = 0
    real = loaders.decode_jpeg

    def counted(data):
        nonlocal decodes
        decodes += 1
        return real(data)

    table = pq.read_table(path, columns=loaders._columns(cfg))
    sample = loaders.sample_clips if cfg.mode == "clip" else loaders.sample_frames
    sample(table.slice(0, cfg.segments_per_batch), cfg=cfg, train=True)  # first call: cv2's and numpy's set-up
    loaders.decode_jpeg = counted
    try:
        samples, start = 0, time.perf_counter()
        for i in range(0, table.num_rows, cfg.segments_per_batch):
            samples += len(sample(table.slice(i, cfg.segments_per_batch), cfg=cfg, train=True)["video_id"])
        seconds = time.perf_counter() - start
    finally:
        loaders.decode_jpeg = real
    return samples / seconds, decodes / max(samples, 1)


# --------------------------------------------------------------------------- the torch feed


class ShardStream(IterableDataset):
    """The shards as a torch IterableDataset, sample by sample, through affectray's own sample function.

    Each DataLoader worker takes every n-th file of a per-pass shuffled order, reads it with
    pyarrow in `segments_per_batch`-row batches (the Ray tasks' map_batches size), and mixes
    its samples in a shuffle buffer of the Ray feed's size.
    """

    def __init__(self, paths: list[str], cfg, buffer: int):
        self.paths, self.cfg, self.buffer, self.epoch = paths, cfg, buffer, 0

    def __iter__(self):
        import numpy as np
        import pyarrow as pa
        import pyarrow.parquet as pq
        from torch.utils.data import get_worker_info

        from affectray.data import loaders

        cfg = self.cfg
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        order = np.random.default_rng([cfg.seed, self.epoch]).permutation(len(self.paths))
        rng = random.Random(f"{cfg.seed}-{self.epoch}-{worker}")
        sample = loaders.sample_clips if cfg.mode == "clip" else loaders.sample_frames
        selects = cfg.split is not None or cfg.val_fraction > 0.0
        buffer: list[dict] = []
        for k in order[worker::workers]:
            parquet = pq.ParquetFile(self.paths[k])
            for batch in parquet.iter_batches(batch_size=cfg.segments_per_batch, columns=loaders._columns(cfg)):
                table = pa.Table.from_batches([batch])
                if selects:
                    table = loaders.select_segments(
                        table, split=cfg.split, val_fraction=cfg.val_fraction, holdout=False
                    )
                out = sample(table, cfg=cfg, train=True)
                out.pop("video_id")  # strings: the training batch has no use for them (nor has Ray's)
                for i in range(len(out["frame_index"])):
                    buffer.append({name: column[i] for name, column in out.items()})
                    if len(buffer) >= self.buffer:  # swap a random one out, as webdataset's shuffle does
                        j = rng.randrange(len(buffer))
                        buffer[j], buffer[-1] = buffer[-1], buffer[j]
                        yield buffer.pop()
        rng.shuffle(buffer)
        yield from buffer


# --------------------------------------------------------------------------- one pass of each feed


def ray_pass(shard, cfg, batch_size: int, epoch: int) -> dict:
    """One epoch of the job's feed into a loop that only counts."""
    from affectray.data.loaders import iter_train_batches

    samples, start, first = 0, time.perf_counter(), None
    for inputs, _targets, *_ in iter_train_batches(shard, cfg, batch_size, epoch, device="cpu"):
        samples += inputs.shape[0]
        first = first or time.perf_counter()
    return timing(samples, start, first)


def torch_pass(dataset: ShardStream, cfg, batch_size: int, epoch: int, workers: int) -> dict:
    """One epoch of a plain DataLoader (fresh workers, as its default) into the same loop."""
    from torch.utils.data import DataLoader

    from affectray.data.loaders import to_model_input

    dataset.epoch = epoch
    samples, start, first = 0, time.perf_counter(), None
    for batch in DataLoader(dataset, batch_size=batch_size, num_workers=workers, drop_last=True):
        inputs = to_model_input(batch, cfg, "cpu")
        samples += inputs.shape[0]
        first = first or time.perf_counter()
    return timing(samples, start, first)


def timing(samples: int, start: float, first: float | None) -> dict:
    end = time.perf_counter()
    return {
        "samples": samples,
        "seconds": round(end - start, 3),
        "samples_per_s": round(samples / (end - start), 1),
        "first_batch_s": round((first or end) - start, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--config",
        default=str(FER_CONFIG.relative_to(REPO)),
        help="finetune config whose data section and corpus are fed (default: %(default)s)",
    )
    parser.add_argument("--passes", type=int, default=2, help="timed passes of each feed, interleaved (default 2)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed passes of each feed first (default 1)")
    parser.add_argument(
        "--faces", type=int, default=0, help="rows to read, in whole 512-row shards (default 0: the whole corpus)"
    )
    parser.add_argument("--batch-size", type=int, help="batch size (default: the config's train.batch_size)")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="DataLoader workers (default: the cores)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args()

    import dataclasses

    import torch

    from affectray import storage
    from affectray.config import load_config
    from affectray.data import shards
    from affectray.data.loaders import build_dataset
    from affectray.runtime import init_ray
    from affectray.train.finetune import FinetuneConfig, training_data

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    config = load_config(FinetuneConfig, args.config)
    batch_size = args.batch_size or config.train.batch_size
    cores = os.cpu_count() or 1
    tmp = Path(tempfile.mkdtemp(prefix="affectray-bench-loader-"))
    try:
        root, what = prepare_shards(config, args.faces, tmp)
        # The per-sample feed both sides run: augmented in the sample function, decoded every pass
        # (the recipe augments on its worker and caches; the feeds compared here are the general case).
        cfg = dataclasses.replace(training_data(config), root=root, augment_on="data", cache=False)
        paths = shards.list_shards(root)
        size = sum(storage.file_sizes(storage.join(root, shards.SHARDS_DIR), suffixes=(".parquet",)).values())
        per_sample, decodes = function_rate(cfg, paths[0])
        limit_before = decode_limit(paths, cores)

        ray = init_ray()
        ds = build_dataset(cfg, train=True)
        ds.context.enable_progress_bars = False  # as fit() does: the feed runs without bars
        ds.context.print_on_execution_start = False
        shard = ds.streaming_split(1, equal=True)[0]
        buffer = max(cfg.shuffle_buffer or 4 * batch_size, batch_size)
        stream = ShardStream(paths, cfg, buffer)
        print(
            f"shards: {what}: {len(paths)} files, {size / 2**20:.1f} MiB\n"
            f"data: {cfg.mode} mode, {cfg.image_size} px, {cfg.channels} channel(s), crop scale {cfg.scale}, "
            f"jitter {cfg.color_jitter}, {cfg.segments_per_batch} rows per sample call; batch {batch_size}, "
            f"shuffle buffer {buffer}\n"
            f"{cores} CPU cores; Ray {ray.__version__} with {int(ray.cluster_resources()['CPU'])} logical CPUs; "
            f"torch {torch.__version__}, {torch.get_num_threads()} threads, DataLoader num_workers={args.workers}",
            flush=True,
        )

        passes: dict[str, list[dict]] = {"ray": [], "torch": []}
        for k in range(args.warmup + args.passes):
            timed = k >= args.warmup
            for name in ("ray", "torch"):
                if name == "ray":
                    result = ray_pass(shard, cfg, batch_size, epoch=k)
                else:
                    result = torch_pass(stream, cfg, batch_size, epoch=k, workers=args.workers)
                label = f"pass {k - args.warmup + 1}" if timed else "warm-up"
                print(
                    f"  {label:8s} {name:5s} {result['samples']:6d} samples in {result['seconds']:6.2f} s = "
                    f"{result['samples_per_s']:8.1f} samples/s (first batch after {result['first_batch_s']:.2f} s)",
                    flush=True,
                )
                if timed:
                    passes[name].append(result)
        ray.shutdown()  # its workers' exit messages would otherwise come after the JSON line
        limit_after = decode_limit(paths, cores)
        limit = (limit_before + limit_after) / 2

        def rate(name: str) -> float:
            return sum(p["samples"] for p in passes[name]) / sum(p["seconds"] for p in passes[name])

        ray_rate, torch_rate = rate("ray"), rate("torch")
        ratio, fraction = ray_rate / torch_rate, ray_rate * decodes / limit
        print(
            f"\nper stage, this machine ({cores} cores, shared):\n"
            f"  JPEG decode, cv2.imdecode on {cores} processes: {limit_before:9.0f} / {limit_after:.0f} decodes/s "
            f"(before / after the passes)\n"
            f"  decode + augment, the sample function alone, 1 process: {per_sample:9.0f} samples/s "
            f"({decodes:.2f} decodes per sample); x {cores} cores = {per_sample * cores:.0f}\n"
            f"  Ray Data feed:    {ray_rate:9.0f} samples/s = {100 * fraction:5.1f}% of the decode limit\n"
            f"  torch DataLoader: {torch_rate:9.0f} samples/s = {100 * torch_rate * decodes / limit:5.1f}% of it\n"
            f"\nRay Data / DataLoader: {ratio:.2f}x (target >= 1.0; published: Ray Data 0.79-1.04x of DataLoader, "
            f"ray PRs #52598, #39665); decode limit fraction {100 * fraction:.1f}% (target >= 70%)"
        )
        print(
            json.dumps(
                {
                    "ratio": round(ratio, 3),
                    "decode_limit_fraction": round(fraction, 3),
                    "ray_samples_per_s": round(ray_rate, 1),
                    "torch_samples_per_s": round(torch_rate, 1),
                    "decode_limit_per_s": round(limit, 1),
                    "decodes_per_sample": round(decodes, 3),
                    "sample_fn_samples_per_s_one_process": round(per_sample, 1),
                    "passes": passes,
                    "batch_size": batch_size,
                    "shard_files": len(paths),
                    "cpu_cores": cores,
                    "dataloader_workers": args.workers,
                    "config": args.config,
                }
            )
        )
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
