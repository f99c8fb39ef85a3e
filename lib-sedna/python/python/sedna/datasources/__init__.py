"""Sedna's `sedna.datasources`: sample lists as workers read them.

    from sedna.datasources import TxtDataParse, CSVDataParse
    data = TxtDataParse(data_type="train", func=parse_line)
    data.parse(BaseConfig.train_dataset_url)
    data.x, data.y

`TxtDataParse` reads Sedna's txt indexes: one sample per line, `path label` (or a path alone,
label 0), or any layout your `func(line)` turns into a tuple (image plus boxes, …); with
`use_raw=True` the whole parsed tuple is the sample. `CSVDataParse` reads CSV files (or dicts)
into pandas DataFrames when pandas is installed, else into numpy arrays (column names in
`.columns`); `label=` names the label column.
"""

import csv
import os

import numpy as np

__all__ = ["BaseDataSource", "TxtDataParse", "CSVDataParse"]


class BaseDataSource:
    """Samples `x` and labels `y` of one split (`data_type`: "train", "eval" or "test")."""

    def __init__(self, data_type="train", func=None):
        self.data_type = data_type
        self.process_func = func if callable(func) else None
        self.x = None
        self.y = None

    @property
    def is_test_data(self):
        """Whether the samples are unlabelled test data."""
        return self.data_type == "test"

    def num_examples(self):
        """The number of samples."""
        return 0 if self.x is None else len(self.x)

    def __len__(self):
        return self.num_examples()

    def parse(self, *args, **kwargs):
        """Reads the files named in `args`."""
        raise NotImplementedError

    def save(self, output=""):
        """Writes the samples as a txt index (`x y` per line) to `output`."""
        with open(output, "w") as f:
            for i, x in enumerate(self.x):
                label = "" if self.y is None or len(self.y) <= i else f" {self.y[i]}"
                f.write(f"{x}{label}\n")


class TxtDataParse(BaseDataSource):
    """Sedna's txt index parser."""

    def parse(self, *args, **kwargs):
        use_raw = kwargs.get("use_raw")
        x_data, y_data = [], []
        for f in args:
            if not (f and os.path.exists(_local(f))):
                continue
            with open(_local(f)) as fin:
                lines = [line.strip() for line in fin.readlines()]
            if self.process_func:
                parsed = [self.process_func(line) for line in lines]
            else:
                parsed = [line.split() for line in lines]
            for tup in parsed:
                if tup is None or not len(tup):
                    continue
                if use_raw:
                    x_data.append(tup)
                    continue
                x_data.append(tup[0])
                if not self.is_test_data:
                    y_data.append(tup[1] if len(tup) > 1 else 0)
        self.x = np.array(x_data, dtype=object if use_raw else None)
        self.y = np.array(y_data)


class CSVDataParse(BaseDataSource):
    """Sedna's CSV parser."""

    def parse(self, *args, **kwargs):
        label = kwargs.pop("label", "")
        usecols = kwargs.get("usecols", "")
        if isinstance(usecols, str):
            usecols = [c for c in usecols.split(",") if c]
        try:
            import pandas as pd
        except ImportError:
            pd = None
        frames, labels = [], []
        for f in args:
            if isinstance(f, (dict, list)):
                rows = [f] if isinstance(f, dict) else f
                table = pd.DataFrame.from_records(rows) if pd else _records(rows)
            elif f and os.path.exists(_local(f)):
                table = pd.read_csv(_local(f)) if pd else _read_csv(_local(f))
            else:
                continue
            if usecols:
                keep = list(usecols) + ([label] if label and label not in usecols else [])
                table = table[keep] if pd else _select(table, keep)
            if self.process_func:
                table = self.process_func(table)
            if label:
                if label not in _columns(table):
                    continue
                if pd:
                    labels.append(table[label])
                    table = table.drop(label, axis=1)
                else:
                    labels.append(table["values"][:, table["columns"].index(label)])
                    table = _select(table, [c for c in table["columns"] if c != label])
            frames.append(table)
        if not frames:
            return
        if pd:
            self.x = pd.concat(frames)
            self.y = pd.concat(labels) if labels else None
        else:
            self.columns = frames[0]["columns"]
            self.x = np.concatenate([t["values"] for t in frames])
            self.y = np.concatenate(labels) if labels else None


def _local(url):
    return url[len("file://"):] if isinstance(url, str) and url.startswith("file://") else url


def _number(text):
    try:
        return float(text)
    except ValueError:
        return text


def _read_csv(path):
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    header, body = rows[0], rows[1:]
    values = np.array([[_number(v) for v in row] for row in body], dtype=object)
    if values.size and all(isinstance(v, float) for v in values.flat):
        values = values.astype(np.float64)
    return {"columns": header, "values": values.reshape(len(body), len(header))}


def _records(rows):
    header = list(rows[0]) if rows else []
    values = np.array([[r.get(c) for c in header] for r in rows], dtype=object)
    return {"columns": header, "values": values.reshape(len(rows), len(header))}


def _select(table, columns):
    index = [table["columns"].index(c) for c in columns]
    return {"columns": list(columns), "values": table["values"][:, index]}


def _columns(table):
    return list(table.columns) if hasattr(table, "columns") and not isinstance(table, dict) else table["columns"]
