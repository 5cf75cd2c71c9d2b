"""The S3 services a process needs for a job: the source's (listing, deletes) and the
destination's (copies, HEADs), each with its own endpoint, region and credentials."""

from __future__ import annotations

from dataclasses import dataclass

from migrator.config import Config
from migrator.storage import s3
from migrator.storage.stream import StreamS3Service


@dataclass
class Sides:
    """``source`` lists and deletes the sources; ``dest`` copies into the destination (server
    side, or streaming from ``source``) and reads it. One and the same service when both
    sides are reached the same way, as in the default job."""

    source: s3.S3Service
    dest: s3.S3Service

    def close(self) -> None:
        self.source.close()
        if self.dest is not self.source:
            self.dest.close()


def open_sides(cfg: Config, retries: s3.RetryCounter | None = None) -> Sides:
    """The services for this process: one for both sides when they differ only in bucket and
    prefix and copies are server-side (each request as before); one per side for
    server-side copies across regions or accounts (the copy is sent with the destination's
    credentials and region); and for streamed copies a destination that reads through the
    source's service (``StreamS3Service``)."""
    source = s3.service(cfg.source, cfg.transport, cfg.concurrency, retries)
    try:
        if cfg.streams:
            factory = s3.ClientFactory(
                cfg.destination, max_pool=cfg.concurrency + 4, streamed_writes=True
            )
            dest: s3.S3Service = StreamS3Service(factory.client(retries), source, cfg.concurrency)
        elif cfg.source.connection == cfg.destination.connection:
            dest = source
        else:
            dest = s3.service(cfg.destination, cfg.transport, cfg.concurrency, retries)
    except BaseException:
        source.close()
        raise
    return Sides(source, dest)
