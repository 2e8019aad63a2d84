"""Stage 1 — the manifest: one table describing any dataset.

Columns (one row per image, sorted by ``image_id``):

============  ========  ==============================================================
column        dtype     meaning
============  ========  ==============================================================
image_id      string    stable id: ``<class>/<stem>`` (class_folders), ``<stem>`` (ufg) or
                        ``<split>/<class>/<stem>`` (split_folders)
path          string    absolute image path
label         int64     class index in [0, num_classes)
class_name    string    class name (folder name, or the UFG class number as text)
group         string    photos that must stay in one split (leafsnap20:
                        ``<class>/<collection>-<leaf>``; ufg, split_folders: the image)
split         string    ``train`` | ``val`` | ``test``
============  ========  ==============================================================

Layouts:

* ``class_folders`` — ``<images>/<class>/<name>.jpg``. Photos are grouped by the name up to its
  last ``-`` (leafsnap20's ``<collection>-<leaf>-<photo>``); whole groups go to one split, chosen
  per class by a seeded shuffle, so near-duplicate photos never straddle train and test.
* ``ufg`` — ``<images>/<class>_<index>.jpg`` (Cotton80, SoyLocal of Yu et al. 2021): the paper's 1:1
  split, odd index train, even index test (Pan et al. 2021, Sec. IV-A).
* ``split_folders`` — ``<images>/<split>/<class>/<name>.jpg`` with ``<split>`` one of ``train``,
  ``val``, ``test``: a data set that comes split (the decoy control of :mod:`mgfa_ray.data.decoy`).
  The class list is the union over the splits.
"""

from __future__ import annotations

import io
import random
import re
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from mgfa_ray.config import ConfigError, DatasetConfig
from mgfa_ray.data.images import ImageError, image_problem
from mgfa_ray.errors import InputError
from mgfa_ray.storage import atomic_write_bytes, sha256_json

COLUMNS = ["image_id", "path", "label", "class_name", "group", "split"]
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
_UFG_NAME = re.compile(r"^(?P<cls>\d+)_(?P<index>\d+)$")


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _select_classes(found: list[str], wanted: list[str] | None, max_classes: int | None, images: Path) -> list[str]:
    missing = [c for c in wanted or [] if c not in found]
    if missing:
        raise ConfigError(f"dataset.classes: {missing} not found under {images}; available: {found}")
    return list(wanted if wanted is not None else found)[:max_classes]


def _split_groups(groups: list[str], cfg: DatasetConfig, rng: random.Random, where: str,
                  pinned: frozenset[str] = frozenset()) -> dict[str, str]:
    """Each group's split: ``pinned`` groups go to train, the others are shuffled with ``rng`` and the
    first ``test_fraction`` / ``val_fraction`` of all groups go to test / val."""
    n = len(groups)
    groups = sorted(set(groups) - pinned)
    rng.shuffle(groups)
    n_test = round(cfg.test_fraction * n)
    n_val = round(cfg.val_fraction * n)
    # A requested split gets at least one group while train keeps at least one.
    if cfg.test_fraction > 0 and n_test == 0 and n - n_val > 1:
        n_test = 1
    if cfg.val_fraction > 0 and n_val == 0 and n - n_test > 1:
        n_val = 1
    if n_test + n_val > len(groups):
        raise ConfigError(
            f"{where}: {n - len(groups)} of its {n} photo group(s) hold labelled photos and must train "
            f"(dataset.labelled_in_train), which leaves {len(groups)} for {n_test} test and {n_val} val group(s); "
            f"lower dataset.test_fraction / val_fraction or set labelled_in_train: false"
        )
    if n - n_test - n_val < 1:
        raise ConfigError(
            f"{where}: {n} photo group(s) cannot be split into train/val/test with "
            f"val_fraction={cfg.val_fraction}, test_fraction={cfg.test_fraction}"
        )
    left_out = [name for name, frac, k in (("val", cfg.val_fraction, n_val), ("test", cfg.test_fraction, n_test))
                if frac > 0 and k == 0]
    if left_out:
        warnings.warn(f"{where}: {n} photo group(s), too few to split with val_fraction={cfg.val_fraction}, "
                      f"test_fraction={cfg.test_fraction}: it has no {' or '.join(left_out)} photos and is left out "
                      f"of their accuracy", stacklevel=3)
    out = {g: "test" for g in groups[:n_test]}
    out.update({g: "val" for g in groups[n_test : n_test + n_val]})
    out.update({g: "train" for g in [*groups[n_test + n_val :], *pinned]})
    return out


def _class_folders(images: Path, cfg: DatasetConfig, train_ids: frozenset[str]) -> pd.DataFrame:
    found = sorted(p.name for p in images.iterdir() if p.is_dir() and _images_in(p))
    if not found:
        raise ConfigError(f"dataset.images: no class folders with images under {images}")
    classes = _select_classes(found, cfg.classes, cfg.max_classes, images)
    rows = []
    for label, cls in enumerate(classes):
        files = _images_in(images / cls)
        group_of = {f: f"{cls}/{f.stem.rsplit('-', 1)[0]}" for f in files}
        if cfg.max_per_class is not None:
            # Take photos round-robin over groups so a small cap still spans several groups.
            rank: dict[str, int] = {}
            order = []
            for f in files:
                g = group_of[f]
                order.append((rank.get(g, 0), g, f))
                rank[g] = rank.get(g, 0) + 1
            files = [f for _, _, f in sorted(order)[: cfg.max_per_class]]
        rng = random.Random(f"{cfg.seed}:{cls}")
        pinned = frozenset(group_of[f] for f in files if f"{cls}/{f.stem}" in train_ids)
        split_of = _split_groups(sorted({group_of[f] for f in files}), cfg, rng, f"class {cls!r}", pinned)
        for f in files:
            g = group_of[f]
            rows.append((f"{cls}/{f.stem}", str(f.resolve()), label, cls, g, split_of[g]))
    df = pd.DataFrame(rows, columns=COLUMNS)
    for split, frac in (("val", cfg.val_fraction), ("test", cfg.test_fraction)):
        if frac > 0 and not (df["split"] == split).any():
            counts = df.groupby("class_name")["group"].nunique()
            raise ConfigError(
                f"dataset: split {split!r} would be empty: every class has too few photo groups for it "
                f"({', '.join(f'{c}: {n}' for c, n in counts.items())}); add photos or set dataset.{split}_fraction: 0"
            )
    return df


def _ufg(images: Path, cfg: DatasetConfig) -> pd.DataFrame:
    parsed = []
    for f in _images_in(images):
        m = _UFG_NAME.match(f.stem)
        if m is None:
            raise ConfigError(f"{f}: not a UFG image name; expected <class>_<index>{f.suffix}")
        parsed.append((m["cls"], int(m["index"]), f))
    if not parsed:
        raise ConfigError(f"dataset.images: no images under {images}")
    found = sorted({c for c, _, _ in parsed}, key=int)
    classes = _select_classes(found, cfg.classes, cfg.max_classes, images)
    label_of = {c: i for i, c in enumerate(classes)}
    rows = []
    for cls, index, f in sorted(parsed, key=lambda t: (int(t[0]), t[1])):
        if cls not in label_of:
            continue
        split = "train" if index % 2 == 1 else "test"
        rows.append((f.stem, str(f.resolve()), label_of[cls], cls, f.stem, split))
    df = pd.DataFrame(rows, columns=COLUMNS)
    if cfg.max_per_class is not None:
        df = df.groupby("label", sort=False).head(cfg.max_per_class)
    return df


def _split_folders(images: Path, cfg: DatasetConfig) -> pd.DataFrame:
    splits = [s for s in ("train", "val", "test") if (images / s).is_dir()]
    other = sorted(p.name for p in images.iterdir() if p.is_dir() and p.name not in ("train", "val", "test"))
    if "train" not in splits or other:
        raise ConfigError(f"dataset.images: layout split_folders needs {images}/train/<class>/ (and optionally val/, "
                          f"test/) and no other folder; found {sorted(splits + other)}")
    found = sorted({c.name for s in splits for c in (images / s).iterdir() if c.is_dir() and _images_in(c)})
    classes = _select_classes(found, cfg.classes, cfg.max_classes, images)
    rows = []
    for split in splits:
        for label, cls in enumerate(classes):
            files = _images_in(images / split / cls) if (images / split / cls).is_dir() else []
            for f in files[: cfg.max_per_class]:
                image_id = f"{split}/{cls}/{f.stem}"
                rows.append((image_id, str(f.resolve()), label, cls, image_id, split))
    return pd.DataFrame(rows, columns=COLUMNS)


def build_manifest(images: Path, cfg: DatasetConfig, *, labelled: Iterable[str] = ()) -> pd.DataFrame:
    """Build the manifest table for ``images`` according to ``cfg.layout``.

    Args:
        images: Resolved image directory.
        cfg: Dataset settings (layout, split fractions, class subset, cap, seed).
        labelled: Image ids that carry region labels; with ``cfg.labelled_in_train`` (class_folders
            only) their photo groups go to the train split.

    Returns:
        DataFrame with :data:`COLUMNS`, sorted by image_id, deterministic for a given ``cfg``.

    Raises:
        ConfigError: The directory is missing or empty, a requested class is absent, a UFG file
            name does not parse, or the groups cannot be split as asked (also: a requested val or
            test split that no class has groups enough for).

    Warns:
        UserWarning: A class with too few photo groups for a requested val or test split (it
            trains on all of them and is absent from that split), naming the class.
    """
    if not images.is_dir():
        raise ConfigError(f"dataset.images: directory {images} does not exist")
    if cfg.layout == "class_folders":
        df = _class_folders(images, cfg, frozenset(labelled) if cfg.labelled_in_train else frozenset())
    else:
        df = {"ufg": _ufg, "split_folders": _split_folders}[cfg.layout](images, cfg)
    df = df.sort_values("image_id", ignore_index=True)
    df["label"] = df["label"].astype("int64")
    return df


def check_images(df: pd.DataFrame, *, corrupt_images: str = "error") -> dict[str, str]:
    """Check every manifest image's first bytes and header (:func:`image_problem`), once, before
    any stage decodes them.

    Args:
        df: The manifest (columns image_id, path).
        corrupt_images: ``error`` raises on any bad image; ``record`` warns and returns them (the
            mask stage then records them, and trials leave them out; ``masks.corrupt_images``).

    Returns:
        ``{image_id: "<path>: <why>"}`` of the bad images (empty when all are fine).

    Raises:
        ImageError: Bad images under ``corrupt_images="error"``; names them and what to do.
    """
    bad = {}
    for image_id, path in zip(df["image_id"], df["path"]):
        reason = image_problem(path)
        if reason is not None:
            bad[str(image_id)] = f"{path}: {reason}"
    if not bad:
        return bad
    listed = "; ".join(list(bad.values())[:5]) + (f"; and {len(bad) - 5} more" if len(bad) > 5 else "")
    if corrupt_images == "error":
        raise ImageError(f"{len(bad)} image(s) cannot be read: {listed}. Remove or replace them, or set "
                         f"masks.corrupt_images: record to record them in the mask set and train without them")
    warnings.warn(f"{len(bad)} image(s) cannot be read and are recorded as corrupt (masks.corrupt_images: "
                  f"record); trials leave them out: {listed}", stacklevel=2)
    return bad


def manifest_hash(df: pd.DataFrame) -> str:
    """SHA-256 of the manifest's identity columns (image_id, label, group, split), path-free.

    Two machines with the data under different roots get the same hash.
    """
    cols = ["image_id", "label", "group", "split"]
    return sha256_json(df[cols].astype(str).values.tolist())


def write_manifest(df: pd.DataFrame, path: Path) -> Path:
    """Write the manifest as Parquet, atomically."""
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pandas(df[COLUMNS], preserve_index=False), buf)
    return atomic_write_bytes(path, buf.getvalue())


def read_manifest(path: str | Path) -> pd.DataFrame:
    """Read and check a manifest Parquet file.

    Raises:
        ValueError: The file is missing, lacks a column, or repeats an image_id.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"manifest {path} does not exist; run the job's manifest stage first")
    df = pq.read_table(path).to_pandas()
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise InputError(f"manifest {path}: missing columns {missing}")
    dup = df["image_id"][df["image_id"].duplicated()]
    if len(dup):
        raise InputError(f"manifest {path}: duplicated image_id {dup.iloc[0]!r}")
    return df


def select_images(df: pd.DataFrame, *, image_ids: Sequence[str] | None = None, split: str | None = None,
                  count: int = 8, seed: int | None = None, source: str = "manifest") -> pd.DataFrame:
    """Rows of a manifest chosen for a figure command (``mgfa-ray cam``, ``mgfa-ray masks show``).

    Args:
        df: The manifest.
        image_ids: Ids to take, in this order (duplicates dropped); the other arguments are then
            ignored.
        split: Take images of this split only; ``None`` takes every split.
        count: How many images to take when ``image_ids`` is ``None``, >= 1.
        seed: ``None`` takes the first ``count`` in image_id order; an integer takes a seeded
            random sample, returned in image_id order.
        source: Names the manifest in error messages.

    Returns:
        The chosen manifest rows.

    Raises:
        ValueError: No or unknown image ids; ``count`` < 1; no image in ``split``.
    """
    df = df.sort_values("image_id", kind="stable")
    if image_ids is not None:
        ids = list(dict.fromkeys(image_ids))
        if not ids:
            raise InputError("no image ids given")
        known = set(df["image_id"])
        unknown = [i for i in ids if i not in known]
        if unknown:
            raise InputError(f"image id {unknown[0]!r} is not in {source}"
                             + (f" ({len(unknown)} unknown ids)" if len(unknown) > 1 else ""))
        return df.set_index("image_id").loc[ids].reset_index()
    if count < 1:
        raise InputError(f"count must be >= 1, got {count}")
    pool = df if split is None else df[df["split"] == split]
    if pool.empty:
        raise InputError(f"split {split!r} has no images in {source} (splits: {sorted(df['split'].unique())})")
    if seed is None:
        return pool.head(count)
    return pool.sample(n=min(count, len(pool)), random_state=seed).sort_values("image_id", kind="stable")
