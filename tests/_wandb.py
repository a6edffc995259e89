"""Read back what an offline W&B run recorded: its `.wandb` log, without mocks."""

import glob
import json
from pathlib import Path


def wandb_records(path):
    """Records of a ``.wandb`` transaction log (LevelDB log format: 32 KiB blocks of
    ``crc32 (4) | length (2, LE) | type (1) | data`` chunks after a 7-byte header)."""
    from wandb.proto import wandb_internal_pb2 as pb

    raw = Path(path).read_bytes()
    assert raw[:4] == b":W&B", raw[:7]
    pos, block, buf, chunks = 7, 32768, b"", []
    while pos + 7 <= len(raw):
        left = block - pos % block
        if left < 7:  # a block tail too short for a header is padding
            pos += left
            continue
        length, kind = int.from_bytes(raw[pos + 4: pos + 6], "little"), raw[pos + 6]
        data = raw[pos + 7: pos + 7 + length]
        pos += 7 + length
        if kind == 0:
            break
        if kind == 1:  # full
            chunks.append(data)
        elif kind == 2:  # first
            buf = data
        elif kind == 3:  # middle
            buf += data
        elif kind == 4:  # last
            chunks.append(buf + data)
    records = []
    for data in chunks:
        record = pb.Record()
        record.ParseFromString(data)
        records.append(record)
    return records


def wandb_history(run_dir: Path) -> list[dict]:
    (log,) = glob.glob(str(run_dir / "run-*.wandb"))
    rows = []
    for r in wandb_records(log):
        if r.WhichOneof("record_type") == "history":
            rows.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item})
    return rows


def media_files(run_dir: Path, kind: str) -> set[str]:
    """Paths under `files/media/<kind>/` of a run folder, relative to it."""
    root = Path(run_dir) / "files" / "media" / kind
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def wandb_summary(run_dir: Path) -> dict:
    """The run summary as the ``.wandb`` log's summary records leave it (updates in order)."""
    (log,) = glob.glob(str(run_dir / "run-*.wandb"))
    summary = {}
    for r in wandb_records(log):
        if r.WhichOneof("record_type") == "summary":
            for i in r.summary.update:
                summary[i.key or "/".join(i.nested_key)] = json.loads(i.value_json)
            for i in r.summary.remove:
                summary.pop(i.key or "/".join(i.nested_key), None)
    return summary
