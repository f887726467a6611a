"""IMDb movie-review sentiment (Maas et al., 2011): the `aclImdb` folder or TFDS `imdb_reviews`.

Local files: `data.dir` is the unpacked `aclImdb/` with `train/{neg,pos}/*.txt` and
`test/{neg,pos}/*.txt` (one review a file, named `<id>_<rating>.txt`); the `unsup` reviews are
not read. The DistilBERT paper reports accuracy on the 25k test reviews, so "test" is the
evaluation split. Reviews keep their `<br />` tags, as the dataset ships them; the longest are
truncated to `data.max_length` tokens from the start.
"""

import glob
import os

import ml_collections
import numpy as np

from distil_flax.downstream.tasks import base, tfds_source
from distil_flax.downstream.tasks import metrics as m

LABELS = ("neg", "pos")


class ImdbTask(base.TextClassificationTask):
    name = "imdb"
    label_names = LABELS
    file_labels = LABELS
    num_labels = 2
    eval_splits = ("test",)
    score_metrics = ("accuracy",)

    def metrics(self, predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        return {"accuracy": m.accuracy(predictions, labels)}

    def read(self, split: str, data: ml_collections.ConfigDict) -> base.Split:
        if split not in ("train", "test"):
            raise ValueError(f"IMDb has splits train and test, not {split!r}")
        if data.source == "tfds":
            return self._read_tfds(split, data)
        override = data.train_file if split == "train" else data.eval_file
        folder = base.split_file(data, split, override)
        tally = base.SkipTally(folder)
        examples = []
        for label, name in enumerate(LABELS):
            subfolder = os.path.join(folder, name)
            if not os.path.isdir(subfolder):
                raise ValueError(f"{folder} has no {name}/ folder: expected the aclImdb layout "
                                 f"{split}/neg/*.txt and {split}/pos/*.txt")
            for path in sorted(glob.glob(os.path.join(subfolder, "*.txt"))):
                try:
                    with open(path, encoding="utf-8") as f:
                        text = f.read().strip()
                except UnicodeDecodeError:
                    tally.skip("not UTF-8", os.path.basename(path))
                    continue
                if not text:
                    tally.skip("empty review", os.path.basename(path))
                    continue
                guid = f"{name}/{os.path.splitext(os.path.basename(path))[0]}"
                examples.append(base.TextExample(guid, text, None, label))
        tally.report(len(examples))
        return base.Split(split, examples, folder, tally.as_dict())

    def _read_tfds(self, split: str, data: ml_collections.ConfigDict) -> base.Split:
        records, info, source = tfds_source.load_split("imdb_reviews", split, data.tfds_data_dir)
        names = tfds_source.label_names(info)
        if names != list(LABELS):
            raise ValueError(f"{source}: label names {names}, expected {list(LABELS)}")
        examples = [base.TextExample(str(i), r["text"], None, int(r["label"]))
                    for i, r in enumerate(records)]
        if not examples:
            raise ValueError(f"{source} is empty")
        return base.Split(split, examples, source)
