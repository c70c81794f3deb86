"""The datasets' own layouts for `affectray ingest`: RAF-DB, AffectNet, DFEW and MAE-DFER's DFEW lists.

Each fixture is a tiny copy of the dataset in the exact layout its authors distribute
(label files, folder names, file names), built here with cv2. Listing is checked without
Ray; then each corpus goes through the ingest command on the session's local Ray and the
shards are read back: labels mapped by name onto ABAW8, splits, AffectNet's box crops
and valence/arousal, DFEW's frame order, and the manifest's dataset label set.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from affectray import storage
from affectray.data import shards
from affectray.data.loaders import build_dataset, iter_train_batches
from affectray.faces.jpeg import decode_jpeg
from affectray.ingest import job as ingest
from affectray.ingest.sources import SourceError, WorkUnit, list_units
from affectray.labels import ABAW8
from affectray.models.registry import ModelConfig
from affectray.train import evaluation
from affectray.train.finetune import ClassifierTask, FinetuneConfig, model_description, with_class_view

A = {name: i for i, name in enumerate(ABAW8.classes)}  # ABAW8 name -> index
SIZE = 32  # px: the crops the ingest runs write


def write_image(path: Path, rgb: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])


def plain(height: int, width: int, rgb: tuple[int, int, int]) -> np.ndarray:
    return np.full((height, width, 3), rgb, np.uint8)


def reasons(listing) -> dict[str, str]:
    return {r["input"]: r["reason"] for r in listing.refused}


def ingest_cli(*argv: str) -> dict:
    """`affectray ingest ARGV` in this process (the session's Ray), as the CLI parses it."""
    parser = argparse.ArgumentParser()
    ingest.add_arguments(parser)
    return ingest.main(parser.parse_args([*argv, "--image-size", str(SIZE), "--workers", "1"]))


def read_rows(root: Path) -> pd.DataFrame:
    tables = [pq.read_table(uri) for uri in shards.list_shards(str(root))]
    return pa.concat_tables(tables).to_pandas()


# ---------------------------------------------------------------------------
# Fixtures: each dataset as distributed
# ---------------------------------------------------------------------------

# RAF-DB basic: EmoLabel/list_patition_label.txt, labels 1..7 = Surprise, Fear, Disgust,
# Happiness, Sadness, Anger, Neutral; Image/aligned/<name>_aligned.jpg.
RAFDB_LINES = [
    ("train_00001.jpg", "1", "Surprise"),
    ("train_00002.jpg", "2", "Fear"),
    ("train_00003.jpg", "3", "Disgust"),
    ("train_00004.jpg", "4", "Happiness"),
    ("train_00005.jpg", "5", "Sadness"),
    ("train_00006.jpg", "6", "Anger"),
    ("train_00007.jpg", "7", "Neutral"),
    ("train_00008.jpg", "4", "Happiness"),
    ("test_0001.jpg", "7", "Neutral"),
    ("test_0002.jpg", "1", "Surprise"),
]


@pytest.fixture(scope="module")
def rafdb(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("RAF-DB") / "basic"
    bad = [("test_0003.jpg", "8"), ("test_0004.jpg", "2"), ("val_0001.jpg", "3"), ("train_00001.jpg", "1")]
    lines = [f"{name} {label}" for name, label, _ in RAFDB_LINES] + [f"{name} {label}" for name, label in bad]
    (root / "EmoLabel").mkdir(parents=True)
    (root / "EmoLabel" / "list_patition_label.txt").write_text("\n".join(lines) + "\n")
    for i, (name, _, _) in enumerate([*RAFDB_LINES, ("test_0003.jpg", "", ""), ("val_0001.jpg", "", "")]):
        stem = name[: -len(".jpg")]
        write_image(root / "Image" / "aligned" / f"{stem}_aligned.jpg", plain(40, 40, (20 * i, 100, 50)))
        write_image(root / "Image" / "original" / name, plain(60, 80, (0, 0, 0)))  # unaligned: never read
    return root  # test_0004 has no aligned image


# AffectNet: Manually_Annotated_file_lists/{training,validation}.csv, images under
# Manually_Annotated_Images/<subDirectory_filePath>, expression 0..10 = Neutral, Happy, Sad,
# Surprise, Fear, Disgust, Anger, Contempt, None, Uncertain, Non-Face.
AFFECTNET_HEADER = (
    "subDirectory_filePath,face_x,face_y,face_width,face_height,facial_landmarks,expression,valence,arousal"
)
BOX = (30, 20, 40, 50)  # x, y, width, height inside a 120 x 100 image
# file, expression, valence, arousal, face colour (RGB), box
AFFECTNET_TRAIN = [
    ("101/a.jpg", 0, 0.5, 0.25, (200, 30, 30), BOX),  # Neutral
    ("101/b.jpg", 1, 0.75, -0.5, (30, 200, 30), BOX),  # Happy
    ("102/c.jpg", 7, -0.25, 0.125, (30, 30, 200), BOX),  # Contempt: ABAW8 Other
    ("102/d.jpg", 6, -0.5, 0.5, (200, 200, 30), BOX),  # Anger
]
AFFECTNET_VAL = [
    ("201/j.jpg", 3, -2.0, -2.0, (200, 30, 200), BOX),  # Surprise; -2 is "no value"
    ("201/k.jpg", 4, 0.0, 1.0, (30, 200, 200), (-10, 60, 50, 60)),  # Fear; box crosses the corner
]
AFFECTNET_EXPRESSION = {0: "Neutral", 1: "Happiness", 3: "Surprise", 4: "Fear", 6: "Anger", 7: "Other"}


def _affectnet_row(path: str, expression: int, valence: float, arousal: float, box) -> str:
    landmarks = ";".join(f"{v:.2f}" for v in range(136))
    return f"{path},{box[0]},{box[1]},{box[2]},{box[3]},{landmarks},{expression},{valence},{arousal}"


@pytest.fixture(scope="module")
def affectnet(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("AffectNet")
    images = root / "Manually_Annotated_Images"
    for path, _, _, _, colour, box in AFFECTNET_TRAIN + AFFECTNET_VAL:
        image = plain(100, 120, (255, 255, 255))
        x, y, w, h = box
        image[max(0, y) : y + h, max(0, x) : x + w] = colour
        write_image(images / path, image)
    for path in ("102/e.jpg", "103/f.jpg", "103/g.jpg", "103/h.jpg", "103/i.jpg"):
        write_image(images / path, plain(100, 120, (128, 128, 128)))
    rows = [_affectnet_row(p, e, v, a, b) for p, e, v, a, _, b in AFFECTNET_TRAIN]
    rows += [
        _affectnet_row("102/e.jpg", 8, -2, -2, BOX),  # None
        _affectnet_row("103/f.jpg", 9, -2, -2, BOX),  # Uncertain
        _affectnet_row("103/g.jpg", 10, -2, -2, BOX),  # Non-Face
        _affectnet_row("103/h.jpg", 10, -2, -2, BOX),
        _affectnet_row("103/i.jpg", 2, 0.1, 0.1, (30, 20, 0, 50)),  # a box without area
        _affectnet_row("103/missing.jpg", 5, 0.1, 0.1, BOX),
    ]
    lists = root / "Manually_Annotated_file_lists"
    lists.mkdir()
    (lists / "training.csv").write_text("\n".join([AFFECTNET_HEADER, *rows]) + "\n")
    val_rows = [_affectnet_row(p, e, v, a, b) for p, e, v, a, _, b in AFFECTNET_VAL]
    (lists / "validation.csv").write_text("\n".join([AFFECTNET_HEADER, *val_rows]) + "\n")
    return root


# DFEW: EmoLabel_DataSplit/{train,test}(single-labeled)/set_<fold>.csv of 'video_name,label',
# labels 1..7 = Happy, Sad, Neutral, Angry, Surprise, Disgust, Fear; frames in Clip/jpg_256/<clip>/.
DFEW_FRAMES = {  # clip -> frame file names, in frame order
    "00001": ["00001_00001.jpg", "00001_00002.jpg", "00001_00003.jpg"],
    "00002": ["1.jpg", "2.jpg", "10.jpg"],  # unpadded: 10 comes last
    "00003": ["00001.jpg", "00002.jpg", "00003.jpg", "00004.jpg"],
    "00004": ["00001.jpg", "00002.jpg"],
}
DFEW_SETS = {  # (split, fold) -> rows
    ("train", 1): "video_name,label\n1,1\n2,5\n99,3\n",  # Happy, Surprise; 99 has no frames
    ("test", 1): "video_name,label\n3,7\n4,8\n",  # Fear; 8 is no DFEW class
    ("train", 2): "video_name,label\n3,2\n4,4\n",
    ("test", 2): "video_name,label\n1,3\n2,6\n",
}


@pytest.fixture(scope="module")
def dfew(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("DFEW")
    for clip, names in DFEW_FRAMES.items():
        for position, name in enumerate(names):
            # Brightness rises with the frame's position: the shards must keep that order.
            write_image(root / "Clip" / "jpg_256" / clip / name, plain(48, 48, (40 * (position + 1),) * 3))
    for (split, fold), text in DFEW_SETS.items():
        path = root / "EmoLabel_DataSplit" / f"{split}(single-labeled)" / f"set_{fold}.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


# MAE-DFER's preprocess/dfew.py: split0<fold>/{train,val,test}.csv of '<clip folder> <label 0..6>',
# space separated, no header, paths absolute on the machine that wrote them; val.csv == test.csv.
FOREIGN = "/mnt/data1/brain/AC/Dataset/DFEW/Clip/jpg_256"


@pytest.fixture(scope="module")
def maedfer_lists(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("MAE-DFER") / "saved" / "data" / "dfew" / "org"
    (root / "split01").mkdir(parents=True)
    (root / "split01" / "train.csv").write_text(f"{FOREIGN}/00001 0\n{FOREIGN}/00002 4\n{FOREIGN}/00042 2\n")
    test = f"{FOREIGN}/00003 6\n{FOREIGN}/00004 7\n"
    (root / "split01" / "test.csv").write_text(test)
    (root / "split01" / "val.csv").write_text(test)
    return root


# ---------------------------------------------------------------------------
# Listing (no Ray)
# ---------------------------------------------------------------------------


def test_rafdb_listing_maps_its_numbers_by_name_and_splits_by_prefix(rafdb):
    listing = list_units(str(rafdb), "rafdb")
    assert listing.label_set == "basic7"
    images = {}
    for unit in listing.units:
        assert unit.kind == "images" and unit.boxes is None and unit.valence is None
        for uri, label in zip(unit.uris, unit.labels):
            images[Path(uri).name] = (unit.split, label)
    assert images == {f"{name[:-4]}_aligned.jpg": (name.split("_")[0], A[abaw]) for name, _, abaw in RAFDB_LINES}
    why = reasons(listing)
    assert "'8' is not a RAF-DB class index (1..7)" in why["test_0003.jpg"]
    assert "no aligned image test_0004_aligned.*" in why["test_0004.jpg"]
    assert "neither train_ nor test_" in why["val_0001.jpg"]
    assert "listed twice (first on line 1)" in why["train_00001.jpg"]
    assert all(re.search(r"line \d+ of .*list_patition_label.txt", r) for r in why.values())

    (test_unit,) = list_units(str(rafdb), "rafdb", split="test").units
    # Images in a stable hashed order (sources._image_chunks), each with its own label.
    assert test_unit.split == "test" and sorted(test_unit.labels) == sorted((A["Neutral"], A["Surprise"]))
    with pytest.raises(SourceError, match="splits train, test; got --split 'val'"):
        list_units(str(rafdb), "rafdb", split="val")


def test_a_relative_list_path_is_found_under_source(rafdb, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the job makes a relative --csv absolute against the working directory
    listing = list_units(str(rafdb), "rafdb", csv_uri=str(tmp_path / "EmoLabel" / "list_patition_label.txt"))
    assert sum(len(u.uris) for u in listing.units) == len(RAFDB_LINES)
    with pytest.raises(SourceError, match="'nope.txt' not found"):
        list_units(str(rafdb), "rafdb", csv_uri="nope.txt")


def test_affectnet_listing_keeps_boxes_and_va_and_counts_what_is_no_expression(affectnet):
    listing = list_units(str(affectnet), "affectnet")
    assert listing.label_set == "affectnet8"  # Contempt is present, stored as Other
    rows = {}
    for unit in listing.units:
        for i, uri in enumerate(unit.uris):
            rel = uri.replace("\\", "/").split("Manually_Annotated_Images/")[1]
            rows[rel] = (unit.split, unit.labels[i], unit.boxes[i], unit.valence[i], unit.arousal[i])
    expected = {
        p: (split, A[AFFECTNET_EXPRESSION[e]], b, v, a)
        for split, table in (("train", AFFECTNET_TRAIN), ("val", AFFECTNET_VAL))
        for p, e, v, a, _, b in table
    }
    assert rows.keys() == expected.keys()
    for rel, (split, label, box, valence, arousal) in rows.items():
        want = expected[rel]
        assert (split, label, box) == want[:3], rel
        if want[3] == -2.0:  # AffectNet's "not applicable" becomes NaN
            assert math.isnan(valence) and math.isnan(arousal)
        else:
            assert (valence, arousal) == want[3:], rel
    why = [r["reason"] for r in listing.refused]
    assert any("1 rows of expression 8 (None)" in r for r in why)
    assert any("1 rows of expression 9 (Uncertain)" in r for r in why)
    assert any("2 rows of expression 10 (Non-Face)" in r for r in why)
    by_input = reasons(listing)
    assert "has no area" in by_input["103/i.jpg"] and "no such image" in by_input["103/missing.jpg"]

    (val,) = list_units(str(affectnet), "affectnet", split="val").units
    assert val.split == "val" and len(val.uris) == 2
    # Without Contempt, AffectNet is a 7-class dataset.
    assert list_units(str(affectnet), "affectnet", split="val").label_set == "basic7"
    lists = affectnet / "Manually_Annotated_file_lists"
    (one,) = list_units(str(affectnet), "affectnet", csv_uri=str(lists / "validation.csv")).units
    assert one.split == "val"


def test_affectnet_list_without_its_columns_is_an_error(affectnet, tmp_path):
    bad = tmp_path / "training.csv"
    bad.write_text("path,label\n101/a.jpg,0\n")
    with pytest.raises(SourceError, match="not an AffectNet list: its header lacks subDirectory_filePath"):
        list_units(str(affectnet), "affectnet", csv_uri=str(bad))


def test_dfew_listing_reads_the_fold_and_orders_frames_by_number(dfew):
    listing = list_units(str(dfew), "dfew", fold=1)
    assert listing.label_set == "basic7"
    units = {u.video_id: u for u in listing.units}
    assert {c: (u.split, u.clip_label) for c, u in units.items()} == {
        "00001": ("train", A["Happiness"]),
        "00002": ("train", A["Surprise"]),
        "00003": ("test", A["Fear"]),
    }
    assert [Path(u).name for u in units["00002"].uris] == ["1.jpg", "2.jpg", "10.jpg"]
    assert units["00003"].frame_indices == (0, 1, 2, 3) and units["00003"].kind == "frames"
    why = reasons(listing)
    assert "no such clip frame folder" in why["99"] and "set_1.csv" in why["99"]
    assert "'8' is not a DFEW class index (1..7)" in why["4"]

    fold2 = {u.video_id: (u.split, u.clip_label) for u in list_units(str(dfew), "dfew", fold=2).units}
    assert fold2 == {
        "00003": ("train", A["Sadness"]),
        "00004": ("train", A["Anger"]),
        "00001": ("test", A["Neutral"]),
        "00002": ("test", A["Disgust"]),
    }
    assert {u.split for u in list_units(str(dfew), "dfew", fold=2, split="test").units} == {"test"}
    with pytest.raises(SourceError, match="needs --fold 1..5"):
        list_units(str(dfew), "dfew")
    with pytest.raises(SourceError, match="fold must be one of DFEW's folds 1..5"):
        list_units(str(dfew), "dfew", fold=6)


def test_maedfer_lists_find_clips_by_their_foreign_paths(dfew, maedfer_lists):
    listing = list_units(str(dfew), "dfew-maedfer", csv_uri=str(maedfer_lists), fold=1)
    units = {u.video_id: (u.split, u.clip_label) for u in listing.units}
    # Labels 0..6 in DFEW's order; val.csv repeats test.csv and is not read twice.
    assert units == {
        "00001": ("train", A["Happiness"]),
        "00002": ("train", A["Surprise"]),
        "00003": ("test", A["Fear"]),
    }
    why = reasons(listing)
    assert "no such clip frame folder" in why[f"{FOREIGN}/00042"]
    assert "'7' is not a DFEW class index (0..6)" in why[f"{FOREIGN}/00004"]
    (val,) = [u for u in list_units(str(dfew), "dfew-maedfer", csv_uri=str(maedfer_lists), fold=1, split="val").units]
    assert val.split == "val" and val.source == "Clip/jpg_256/00003"
    # One list file named directly: its split comes from its name.
    listing = list_units(str(dfew), "dfew-maedfer", csv_uri=str(maedfer_lists / "split01" / "train.csv"))
    assert {u.split for u in listing.units} == {"train"} and len(listing.units) == 2


def test_image_folder_label_set_says_whether_other_is_contempt(tmp_path):
    for folder in ("happy", "sad", "contempt"):
        write_image(tmp_path / "a" / folder / "x.jpg", plain(8, 8, (0, 0, 0)))
    assert list_units(str(tmp_path / "a"), "image-folder").label_set == "affectnet8"
    write_image(tmp_path / "a" / "other" / "y.jpg", plain(8, 8, (0, 0, 0)))
    assert list_units(str(tmp_path / "a"), "image-folder").label_set == "abaw8"
    for folder in ("0", "1", "7"):  # AffectNet-8's numbers: 7 is Contempt
        write_image(tmp_path / "b" / folder / "x.jpg", plain(8, 8, (0, 0, 0)))
    assert list_units(str(tmp_path / "b"), "image-folder", dataset="affectnet8").label_set == "affectnet8"
    assert list_units(str(tmp_path / "b"), "image-folder", dataset="rafdb").label_set == "basic7"


def test_work_units_with_boxes_and_va_round_trip(affectnet):
    (unit,) = list_units(str(affectnet), "affectnet", split="val").units
    back = WorkUnit.from_dict(json.loads(json.dumps(unit.to_dict())))  # as units travel to Ray Data
    assert (back.boxes, back.labels, back.valence[1]) == (unit.boxes, unit.labels, unit.valence[1])
    assert math.isnan(back.valence[0])
    with pytest.raises(SourceError, match="1 boxes for 2 files"):
        WorkUnit(key="k", kind="images", video_id="v", uris=("a", "b"), frame_indices=(0, 1), boxes=((0, 0, 1, 1),))


def test_dataset_label_set_of_old_and_new_manifests():
    assert shards.dataset_label_set({"label_set": ABAW8.to_dict()}) == "abaw8"  # written before the key
    assert shards.dataset_label_set({"dataset_label_set": "affectnet8"}) == "affectnet8"
    with pytest.raises(storage.StorageError, match="'fer9'"):
        shards.dataset_label_set({"dataset_label_set": "fer9"})


def test_ingest_help_names_the_layouts_and_fold():
    parser = argparse.ArgumentParser()
    ingest.add_arguments(parser)
    text = parser.format_help()
    assert all(name in text for name in ("rafdb", "affectnet", "dfew-maedfer", "--fold"))
    with pytest.raises(SystemExit):
        parser.parse_args(["src", "out", "--fold", "6"])


# ---------------------------------------------------------------------------
# Through the ingest command, on a real local Ray
# ---------------------------------------------------------------------------


def trains_on(root: Path, label: str = "center") -> tuple[list[str], list[float]]:
    """Fine-tuning's task on the ingested corpus: the head the manifest sizes, and its losses fitting a batch.

    The task, the loader and the optimiser step are the fine-tuning job's (Ray Data reads the
    shards); only Ray Train's worker start is left out (tests/test_finetune.py runs that).
    """
    import torch

    data = dataclasses.replace(
        FinetuneConfig().data, root=str(root), image_size=SIZE, label=label, val_fraction=0.5, scale=(0.9, 1.0)
    )
    config = FinetuneConfig(data=data, model=ModelConfig(name="frame", backbone="test_resnet"))
    config = with_class_view(config, shards.read_manifest(str(root)))
    task = ClassifierTask(config, model_description(config), None)
    torch.manual_seed(0)
    model = task.build_model()
    every_row = dataclasses.replace(data, val_fraction=0.0)  # a few rows: fit them all
    batches = iter_train_batches(build_dataset(every_row, train=True), every_row, 4, 0, "cpu", clip_layout="BTCHW")
    inputs, targets = next(iter(batches))
    targets = evaluation.view_targets(targets, config.class_view)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        loss, _ = task.loss(model, (inputs, targets))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert model.head.out_features == len(evaluation.CLASS_VIEWS[config.class_view])
    return list(evaluation.CLASS_VIEWS[config.class_view].classes), losses


def test_ingest_rafdb(ray_session, rafdb, tmp_path):
    out = tmp_path / "shards"
    summary = ingest_cli(str(rafdb), str(out), "--layout", "rafdb")
    assert summary["rows"] == len(RAFDB_LINES) and summary["failed"] == 4  # the four refused lines
    rows = read_rows(out)
    got = {row.video_id: (row.split, int(row.labels[0]), row.dataset) for row in rows.itertuples()}
    assert got == {
        f"Image/aligned/{name[:-4]}_aligned": (name.split("_")[0], A[abaw], "rafdb") for name, _, abaw in RAFDB_LINES
    }
    assert decode_jpeg(rows.images.iloc[0][0]).shape == (SIZE, SIZE, 3)
    manifest = shards.read_manifest(str(out))
    assert shards.dataset_label_set(manifest) == "basic7" and manifest["label_set"] == ABAW8.to_dict()
    assert manifest["splits"] == ["test", "train"] and manifest["labels"]["Happiness"] == 2
    assert sum(f["status"] == "refused" for f in manifest["failures"]) == 4
    classes, losses = trains_on(out)  # RAF-DB's seven classes: a 7-way head
    assert classes == list(ABAW8.classes[:7]) and losses[-1] < 0.5 * losses[0], losses


def test_ingest_affectnet_crops_by_the_box_and_keeps_va(ray_session, affectnet, tmp_path):
    out = tmp_path / "shards"
    summary = ingest_cli(str(affectnet), str(out), "--layout", "affectnet")
    assert summary["rows"] == 6 and summary["partial"] == 0
    rows = read_rows(out)
    table = {
        path: (colour, expression, valence, arousal, split)
        for split, listed in (("train", AFFECTNET_TRAIN), ("val", AFFECTNET_VAL))
        for path, expression, valence, arousal, colour, _ in listed
    }
    assert len(rows) == len(table)
    for row in rows.itertuples():
        colour, expression, valence, arousal, split = table[
            row.video_id.split("Manually_Annotated_Images/")[1] + ".jpg"
        ]
        assert (row.split, int(row.labels[0]), row.dataset) == (split, A[AFFECTNET_EXPRESSION[expression]], "affectnet")
        face = decode_jpeg(row.images[0]).astype(float)
        # The crop is the box: the face's colour fills it, none of the white around it.
        assert face.shape == (SIZE, SIZE, 3)
        assert np.abs(face.mean(axis=(0, 1)) - colour).max() < 12, (row.video_id, face.mean(axis=(0, 1)))
        if valence == -2.0:
            assert math.isnan(row.valence[0]) and math.isnan(row.arousal[0])
        else:
            assert (row.valence[0], row.arousal[0]) == pytest.approx((valence, arousal))
    manifest = shards.read_manifest(str(out))
    assert shards.dataset_label_set(manifest) == "affectnet8" and manifest["labels"]["Other"] == 1
    assert manifest["splits"] == ["train", "val"]
    refused = [f["reason"] for f in manifest["failures"] if f["status"] == "refused"]
    assert any("2 rows of expression 10 (Non-Face)" in r for r in refused) and len(refused) == 5
    classes, losses = trains_on(out)  # AffectNet-8: 8 classes, the eighth Contempt
    assert classes[-1] == "Contempt" and len(classes) == 8 and losses[-1] < 0.5 * losses[0], losses


def test_ingest_dfew_fold_and_maedfer_lists(ray_session, dfew, maedfer_lists, tmp_path):
    expected = {
        "00001": ("train", A["Happiness"], 3),
        "00002": ("train", A["Surprise"], 3),
        "00003": ("test", A["Fear"], 4),
    }
    runs = {
        "dfew": ("--layout", "dfew", "--fold", "1"),
        "maedfer": ("--layout", "dfew-maedfer", "--fold", "1", "--csv", str(maedfer_lists)),
    }
    for name, flags in runs.items():
        out = tmp_path / name
        summary = ingest_cli(str(dfew), str(out), *flags)
        assert summary["rows"] == 3 and summary["failed"] == 2, name
        rows = read_rows(out)
        assert {r.video_id: (r.split, r.clip_label, len(r.frame_index)) for r in rows.itertuples()} == expected
        assert set(rows.dataset) == {"dfew"}
        for row in rows.itertuples():
            # Frames in their order (brightness rises with position), labels per clip, not per frame.
            brightness = [decode_jpeg(image).mean() for image in row.images]
            assert np.all(np.diff(brightness) > 20), (name, row.video_id, brightness)
            assert list(row.frame_index) == list(range(len(brightness))) and set(row.labels) == {-1}
        manifest = shards.read_manifest(str(out))
        assert shards.dataset_label_set(manifest) == "basic7" and manifest["fold"] == 1
        assert manifest["clip_labels"]["Happiness"] == 1 and manifest["clip_labels"]["Fear"] == 1
    classes, losses = trains_on(out, label="clip")  # frames labelled by their clip, DFEW's 7 classes
    assert len(classes) == 7 and losses[-1] < 0.5 * losses[0], losses
