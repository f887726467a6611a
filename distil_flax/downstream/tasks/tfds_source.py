"""Reads a prepared TFDS dataset split as plain Python records, without TensorFlow.

`glue/*`, `squad/v1.1` and `imdb_reviews` are read through `tfds.builder(...).as_data_source`,
which needs the dataset prepared in ArrayRecord format in the TFDS data directory (nothing is
downloaded here): `tfds build glue/sst2 --file_format=array_record` on a machine with network.
"""

from typing import Any, Iterator

import numpy as np


def _plain(value: Any) -> Any:
    """TFDS values as Python: bytes → str, numpy scalars → Python, arrays → lists, recursively."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()] if value.ndim else _plain(value.item())
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def load_split(name: str, split: str, data_dir: str = "") -> tuple[Iterator[dict], Any, str]:
    """Records of a prepared TFDS split.

    Args:
      name: dataset name with config, e.g. "glue/mrpc".
      split: TFDS split name, e.g. "validation_matched".
      data_dir: TFDS data directory ("" for TFDS's default, ~/tensorflow_datasets).

    Returns:
      (records, info, source): an iterator of plain dicts (text as str, labels as int), the
      builder's `DatasetInfo` (label names), and a description for logs.

    Raises:
      ValueError: TFDS is not installed, the dataset is not prepared there, or lacks the split.
    """
    try:
        import tensorflow_datasets as tfds  # Only TFDS runs need it (and never TensorFlow).
    except ImportError:
        raise ValueError(f"data.source='tfds' needs tensorflow_datasets (pip install "
                         f"tensorflow-datasets) to read {name!r}; or use data.source='files' "
                         "with the original files") from None
    where = data_dir or "TFDS's default data directory"
    not_prepared = (f"TFDS dataset {name!r} is not prepared in {where} (data.tfds_data_dir): "
                    f"prepare it with `tfds build {name} --file_format=array_record` where there "
                    "is network, or use data.source='files' with the original files")
    try:
        builder = tfds.builder(name, data_dir=data_dir or None)
    except Exception as error:  # TFDS raises its own not-found errors.
        first_line = (str(error).splitlines() or [""])[0]
        raise ValueError(f"{not_prepared} ({type(error).__name__}: {first_line})") from None
    if hasattr(builder, "is_prepared") and not builder.is_prepared():
        raise ValueError(not_prepared)
    splits = builder.info.splits
    if split not in splits:
        raise ValueError(f"TFDS dataset {name!r} has no split {split!r}; it has {sorted(splits)}")
    source = builder.as_data_source(split=split)
    description = f"tfds:{name}[{split}]"
    return _records(source), builder.info, description


def _records(source, chunk: int = 1024) -> Iterator[dict]:
    """Reads a data source in chunks (one ArrayRecord read per chunk where it can)."""
    read_many = getattr(source, "__getitems__", None)
    for start in range(0, len(source), chunk):
        keys = range(start, min(start + chunk, len(source)))
        records = read_many(list(keys)) if read_many else [source[i] for i in keys]
        yield from (_plain(r) for r in records)


def label_names(info: Any, feature: str = "label") -> list[str]:
    """The class names of a TFDS ClassLabel feature."""
    return list(info.features[feature].names)
