"""Work-unit listing for every ingest layout, and Aff-Wild2 annotation parsing and matching."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from affectray import storage
from affectray.ingest.annotations import (
    AnnotationError,
    detect_annotation_kind,
    find_annotations,
    frame_labels,
    parse_expr_annotation,
    parse_va_annotation,
    read_annotation,
)
from affectray.ingest.sources import SourceError, WorkUnit, list_units, unit_key
from affectray.labels import ABAW8

KEY = re.compile(r"^[A-Za-z0-9_-]+-[0-9a-f]{8}$")
EXPR_HEADER = ",".join(ABAW8.classes)
A = {name: i for i, name in enumerate(ABAW8.classes)}  # ABAW8 name -> index


def touch(root: Path, *rels: str) -> None:
    for rel in rels:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")


def by_video(listing) -> dict[str, WorkUnit]:
    return {unit.video_id: unit for unit in listing.units}


# ---------------------------------------------------------------------------
# keys
# ---------------------------------------------------------------------------


def test_keys_are_fixed_functions_of_the_relative_path():
    # Pinned values: a key must not change between releases, runs or machines,
    # or re-runs would redo (and duplicate) every finished shard.
    assert unit_key("id00012/abc/00001.mp4") == "id00012_abc_00001-95492a17"
    assert unit_key("vidéo ü/clip 1.MP4") == "video_u_clip_1-d1154173"
    # macOS writes NFD names: the same file gets the same key.
    assert unit_key("vide\u0301o \u00fc/clip 1.MP4") == unit_key("vidéo ü/clip 1.MP4")
    # Names that fold to the same text stay apart through the hash.
    assert unit_key("a b.mp4") != unit_key("a_b.mp4")
    assert unit_key("clip.mp4") != unit_key("clip.avi")
    assert KEY.match(unit_key("日本語/動画.mp4"))


# ---------------------------------------------------------------------------
# videos
# ---------------------------------------------------------------------------


VIDEO_TREE = (
    "118-30-640x480.mp4",
    "video5.avi",
    "id00012/ab c/00001.mp4",
    "id00013/ab c/00001.mp4",
    "vidéo ü/clip 1.MOV",
    "vox/id00014/x/00002.webm",
    "notes.txt",
    "frames/00001.jpg",
    ".hidden/secret.mp4",
    "id00012/._00001.mp4",
)


def test_videos_layout_lists_each_video_once_with_stable_distinct_keys(tmp_path):
    root = tmp_path / "one"
    touch(root, *VIDEO_TREE)
    listing = list_units(str(root), "videos")
    units = by_video(listing)
    assert sorted(units) == [
        "118-30-640x480",
        "id00012/ab c/00001",
        "id00013/ab c/00001",
        "video5",
        "vidéo ü/clip 1",
        "vox/id00014/x/00002",
    ]
    for unit in listing.units:
        assert unit.kind == "video" and len(unit.uris) == 1 and unit.frame_indices == () and unit.clip_label == -1
    assert units["vidéo ü/clip 1"].uris == (str(root / "vidéo ü" / "clip 1.MOV"),)
    assert units["id00012/ab c/00001"].source == "id00012/ab c/00001.mp4"
    keys = [u.key for u in listing.units]
    assert keys == sorted(keys) and len(set(keys)) == len(keys)
    assert all(KEY.match(k) for k in keys), keys
    assert units["id00012/ab c/00001"].key != units["id00013/ab c/00001"].key
    assert units["id00012/ab c/00001"].key.startswith("id00012_ab_c_00001-")
    assert listing.refused == []

    # Same tree elsewhere, listed again: the same keys.
    other = tmp_path / "two"
    touch(other, *VIDEO_TREE)
    assert [u.key for u in list_units(str(other), "videos").units] == keys
    assert [u.key for u in list_units(f"file://{root}", "videos").units] == keys
    assert [u.key for u in list_units(str(root), "videos").units] == keys


def test_videos_on_s3_match_the_local_listing(tmp_path, s3_bucket):
    touch(tmp_path, *VIDEO_TREE)
    storage.upload_dir(tmp_path, f"{s3_bucket}/corpus")
    local = list_units(str(tmp_path), "videos")
    remote = list_units(f"{s3_bucket}/corpus/", "videos")
    assert [u.key for u in remote.units] == [u.key for u in local.units]
    units = by_video(remote)
    assert units["vidéo ü/clip 1"].uris == (f"{s3_bucket}/corpus/vidéo ü/clip 1.MOV",)
    assert storage.read_bytes(units["id00013/ab c/00001"].uris[0]) == b"x"


def test_unknown_layout_missing_source_and_empty_source_are_errors(tmp_path):
    with pytest.raises(SourceError, match="unknown layout 'video'"):
        list_units(str(tmp_path), "video")
    with pytest.raises(SourceError, match="nope"):
        list_units(str(tmp_path / "nope"), "videos")
    touch(tmp_path, "readme.txt")
    with pytest.raises(SourceError, match="found nothing to ingest"):
        list_units(str(tmp_path), "videos")


# ---------------------------------------------------------------------------
# aligned frames
# ---------------------------------------------------------------------------


def test_aligned_frames_one_unit_per_folder_in_frame_order(tmp_path):
    # Created out of order, with a gap (frames where Aff-Wild2 found no face).
    touch(
        tmp_path,
        "118-30-640x480/00010.jpg",
        "118-30-640x480/00002.jpg",
        "118-30-640x480/00001.jpg",
        "118-30-640x480/00003.jpg",
        "118-30-640x480/thumb.jpg",
        "café 7_left/00002.png",
        "café 7_left/00001.png",
        "batch/118-30-640x480/00005.jpeg",
        "only_names/cover.jpg",
    )
    listing = list_units(str(tmp_path), "aligned-frames", split="train")
    units = by_video(listing)
    assert sorted(units) == ["118-30-640x480", "batch/118-30-640x480", "café 7_left"]
    unit = units["118-30-640x480"]
    assert unit.kind == "frames" and unit.split == "train"
    assert unit.frame_indices == (0, 1, 2, 9)
    assert [Path(u).name for u in unit.uris] == ["00001.jpg", "00002.jpg", "00003.jpg", "00010.jpg"]
    assert units["café 7_left"].frame_indices == (0, 1)
    assert units["batch/118-30-640x480"].frame_indices == (4,)
    assert unit.key != units["batch/118-30-640x480"].key
    refused = {r["input"]: r["reason"] for r in listing.refused}
    assert "not a number" in refused["118-30-640x480/thumb.jpg"]
    assert "no numbered frame files" in refused["only_names"]


def test_aligned_frames_unpadded_or_numbered_from_zero(tmp_path):
    touch(tmp_path, "v/00000.jpg", "v/00001.jpg", "v/0001.png", "w/1.jpg", "w/10.jpg", "w/2.jpg")
    listing = list_units(str(tmp_path), "aligned-frames")
    units = by_video(listing)
    assert units["v"].frame_indices == (0, 1)  # a folder holding frame 0 is numbered from 0
    assert units["w"].frame_indices == (0, 1, 9)  # by number, not by name
    assert [Path(u).name for u in units["w"].uris] == ["1.jpg", "2.jpg", "10.jpg"]
    assert listing.refused == [{"input": "v/0001.png", "reason": "duplicate frame number 1 (also v/00001.jpg)"}]


def test_aligned_frames_on_s3_with_non_ascii_names(tmp_path, s3_bucket):
    touch(tmp_path, "vidéo 1/00002.jpg", "vidéo 1/00001.jpg", "vidéo 2/00001.jpg")
    storage.upload_dir(tmp_path, f"{s3_bucket}/aligned")
    listing = list_units(f"{s3_bucket}/aligned", "aligned-frames")
    units = by_video(listing)
    folder = f"{s3_bucket}/aligned/vidéo 1"
    assert units["vidéo 1"].uris == (f"{folder}/00001.jpg", f"{folder}/00002.jpg")
    assert units["vidéo 1"].key == unit_key("vidéo 1")
    assert [u.key for u in listing.units] == [u.key for u in list_units(str(tmp_path), "aligned-frames").units]


# ---------------------------------------------------------------------------
# image folders
# ---------------------------------------------------------------------------


def test_image_folder_by_rafdb_number_with_split_folders(tmp_path):
    touch(
        tmp_path,
        "train/1/train_0001.jpg",
        "train/4/train_0002.jpg",
        "train/4/train_0003.jpg",
        "train/7/train_0004 ü.jpg",
        "test/4/test_0001.jpg",
        "test/9/test_0002.jpg",
    )
    listing = list_units(str(tmp_path), "image-folder", dataset="RAF-DB", images_per_unit=3)
    assert listing.class_mapping == {"1": "Surprise", "4": "Happiness", "7": "Neutral"}
    assert listing.refused == [
        {"input": "test/9", "reason": "class folder '9' is no expression class of dataset 'RAF-DB'; 1 images skipped"}
    ]
    train = sorted((u for u in listing.units if u.split == "train"), key=lambda u: u.video_id)
    test = [u for u in listing.units if u.split == "test"]
    assert [len(u.uris) for u in train] == [3, 1]
    # Chunks take the images in the order of a hash of their path (classes mixed in every
    # chunk, the same on every run), each image with its own folder's label.
    folder_label = {"1": A["Surprise"], "4": A["Happiness"], "7": A["Neutral"]}
    for unit in train:
        assert unit.labels == tuple(folder_label[Path(uri).parent.name] for uri in unit.uris)
        assert unit.frame_indices == tuple(range(len(unit.uris)))
    assert sorted(Path(uri).name for unit in train for uri in unit.uris) == [
        "train_0001.jpg", "train_0002.jpg", "train_0003.jpg", "train_0004 ü.jpg"]  # fmt: skip
    again = list_units(str(tmp_path), "image-folder", dataset="RAF-DB", images_per_unit=3)
    assert [u.uris for u in again.units] == [u.uris for u in listing.units]
    assert [u.labels for u in test] == [(A["Happiness"],)]
    assert all(u.kind == "images" and KEY.match(u.key) for u in listing.units)

    only_test = list_units(str(tmp_path), "image-folder", dataset="rafdb", split="test")
    assert [u.uris for u in only_test.units] == [u.uris for u in test]
    with pytest.raises(SourceError, match="no split folder 'val'.*test, train"):
        list_units(str(tmp_path), "image-folder", dataset="rafdb", split="val")


def test_image_folder_by_class_name_any_spelling(tmp_path):
    touch(
        tmp_path,
        "happy/a.jpg",
        "Happy/b.jpg",
        "HAPPINESS/c.png",
        "angry/d.jpg",
        "contempt/e.jpg",
        "Überrascht/f.jpg",
        "Überrascht/g.jpg",
        "stray.jpg",
    )
    listing = list_units(str(tmp_path), "image-folder", split="train")
    assert listing.class_mapping == {
        "HAPPINESS": "Happiness",
        "Happy": "Happiness",
        "angry": "Anger",
        "contempt": "Other",
        "happy": "Happiness",
    }
    (unit,) = listing.units
    assert unit.split == "train"  # no split folders: the caller's split
    named = dict(zip((Path(u).name for u in unit.uris), unit.labels))
    assert named == {"a.jpg": A["Happiness"], "b.jpg": A["Happiness"], "c.png": A["Happiness"],
                     "d.jpg": A["Anger"], "e.jpg": A["Other"]}  # fmt: skip
    refused = {r["input"]: r["reason"] for r in listing.refused}
    assert "names no expression class" in refused["Überrascht"] and "2 images skipped" in refused["Überrascht"]
    assert "directly in SOURCE" in refused["stray.jpg"]


def test_image_folder_numbers_need_a_dataset(tmp_path):
    touch(tmp_path, "1/a.jpg")
    listing = list_units(str(tmp_path), "image-folder")
    assert listing.units == []
    assert "--dataset" in listing.refused[0]["reason"]
    with pytest.raises(SourceError, match="unknown dataset 'rafdbx'"):
        list_units(str(tmp_path), "image-folder", dataset="rafdbx")


def test_image_chunk_keys_stable_and_change_with_content(tmp_path):
    touch(tmp_path, *(f"happy/{i:03d}.jpg" for i in range(5)))
    first = [u.key for u in list_units(str(tmp_path), "image-folder", images_per_unit=2).units]
    assert first == [u.key for u in list_units(str(tmp_path), "image-folder", images_per_unit=2).units]
    assert len(first) == 3
    touch(tmp_path, "happy/004b.jpg")  # lands in the last chunk only
    second = [u.key for u in list_units(str(tmp_path), "image-folder", images_per_unit=2).units]
    assert second[:2] == first[:2] and second[2] != first[2]


# ---------------------------------------------------------------------------
# DFEW split files
# ---------------------------------------------------------------------------


def test_dfew_csv_keeps_good_lines_and_reports_bad_ones(tmp_path):
    root = tmp_path / "dfew"
    touch(
        root,
        "clips/00001/00001.jpg",
        "clips/00001/00002.jpg",
        "clips/clip two é/00003.jpg",
        "clips/clip two é/00001.jpg",
        "videos/00042.mp4",
        "videos/00043.avi",
        "videos/readme.txt",
    )
    touch(tmp_path, "outside/00001.jpg")
    split_file = tmp_path / "set_1.csv"
    split_file.write_text(
        "\n".join(
            [
                "video_name,label",  # 1: header
                "clips/00001,1",  # 2: Happiness
                "clips/clip two é 5",  # 3: whitespace-separated, path with spaces: Surprise
                "videos/00042.mp4,7",  # 4: Fear
                "videos/00043,4",  # 5: extension left out: Anger
                "../outside,2",  # 6: traversal
                "/etc,2",  # 7: absolute
                "clips/missing,3",  # 8
                "clips/00001,0",  # 9: DFEW labels are 1..7
                "videos/00042.mp4,8",  # 10
                "videos/readme.txt,3",  # 11
                "clips/./00001,2",  # 12: the same clip again
                "",
            ]
        ),
        encoding="utf-8",
    )
    listing = list_units(str(root), "dfew-csv", csv_uri=str(split_file), split="test")
    units = by_video(listing)
    assert sorted(units) == ["clips/00001", "clips/clip two é", "videos/00042", "videos/00043"]
    assert units["clips/00001"].kind == "frames" and units["clips/00001"].clip_label == A["Happiness"]
    assert units["clips/clip two é"].frame_indices == (0, 2)
    assert units["clips/clip two é"].clip_label == A["Surprise"]
    assert units["videos/00042"].kind == "video" and units["videos/00042"].clip_label == A["Fear"]
    assert units["videos/00043"].uris == (str(root / "videos" / "00043.avi"),)
    assert units["videos/00043"].clip_label == A["Anger"]
    assert all(u.split == "test" for u in listing.units)

    refused = {int(re.search(r"line (\d+) of", r["reason"]).group(1)): r for r in listing.refused}
    assert sorted(refused) == [6, 7, 8, 9, 10, 11, 12]
    assert refused[6]["input"] == "../outside" and "outside" in refused[6]["reason"]
    assert "points outside" in refused[7]["reason"]
    assert "no such clip" in refused[8]["reason"]
    assert "'0' is not a DFEW class index" in refused[9]["reason"]
    assert "'8' is not a DFEW class index" in refused[10]["reason"]
    assert "neither a video nor a folder" in refused[11]["reason"]
    assert "listed twice (first on line 2)" in refused[12]["reason"]
    assert not any("outside/00001.jpg" in uri for u in listing.units for uri in u.uris)


def test_dfew_csv_found_in_source_or_asked_for(tmp_path):
    touch(tmp_path, "00001/00001.jpg")
    with pytest.raises(SourceError, match="needs one split file: found none"):
        list_units(str(tmp_path), "dfew-csv")
    (tmp_path / "train.csv").write_text("00001 3\n")
    (unit,) = list_units(str(tmp_path), "dfew-csv").units
    assert unit.clip_label == A["Neutral"] and unit.video_id == "00001"


def test_work_unit_round_trips_through_json_and_ray_rows(tmp_path):
    touch(tmp_path, "happy/a b.jpg", "sad/ü.jpg")
    (unit,) = list_units(str(tmp_path), "image-folder").units
    assert WorkUnit.from_dict(json.loads(json.dumps(unit.to_dict()))) == unit
    # Ray Data hands lists back as numpy arrays.
    row = {k: np.asarray(v) if isinstance(v, list) else v for k, v in unit.to_dict().items()}
    assert WorkUnit.from_dict(row) == unit
    with pytest.raises(SourceError, match="2 labels for 1 files"):
        WorkUnit(key="k", kind="images", video_id="v", uris=("a",), frame_indices=(0,), labels=(1, 2))
    with pytest.raises(SourceError, match="not a work unit row"):
        WorkUnit.from_dict({"kind": "video"})


# ---------------------------------------------------------------------------
# annotations
# ---------------------------------------------------------------------------


def test_expr_parsing_remaps_a_permuted_header_onto_abaw8():
    header = "happy,Neutral,Other,Sadness,Surprise,Anger,Disgust,Fear"
    parsed = parse_expr_annotation(f"{header}\n0\n1\n-1\n2\n7\n\n\n", source="v.txt")
    assert parsed.dtype == np.int16
    assert parsed.tolist() == [A["Happiness"], A["Neutral"], -1, A["Other"], A["Fear"]]
    same_order = parse_expr_annotation(f"{EXPR_HEADER}\r\n4\r\n7\r\n")
    assert same_order.tolist() == [4, 7]
    assert detect_annotation_kind(header) == "expr"


@pytest.mark.parametrize(
    "body, message",
    [
        ("0\n8\n", r"v\.txt line 3: class index 8 is out of range"),
        ("0\n1.5\n", r"v\.txt line 3: expected an integer"),
        ("0\n\n1\n", r"v\.txt line 3: blank line"),
        ("-2\n", r"v\.txt line 2: class index -2"),
    ],
)
def test_expr_errors_name_file_and_line(body, message):
    with pytest.raises(AnnotationError, match=message):
        parse_expr_annotation(f"{EXPR_HEADER}\n{body}", source="v.txt")


def test_expr_header_must_name_classes():
    with pytest.raises(AnnotationError, match="x.txt line 1: header names an unknown class"):
        parse_expr_annotation("Neutral,Bored\n0\n", source="x.txt")
    with pytest.raises(AnnotationError, match="line 1: expected a header"):
        parse_expr_annotation("0\n1\n", source="x.txt")
    with pytest.raises(AnnotationError, match="neither EXPR class names"):
        detect_annotation_kind("AU1,AU2,AU4\n0,1,0\n")


def test_va_parsing_marks_unannotated_frames_nan():
    parsed = parse_va_annotation("valence,arousal\n0.5,-0.25\n-5,-5\n1,-1\n", source="v.txt")
    assert parsed.dtype == np.float32 and parsed.shape == (3, 2)
    np.testing.assert_array_equal(parsed[[0, 2]], [[0.5, -0.25], [1.0, -1.0]])
    assert np.isnan(parsed[1]).all()
    swapped = parse_va_annotation("Arousal, Valence\n0.1,0.9\n")
    np.testing.assert_allclose(swapped, [[0.9, 0.1]])
    assert detect_annotation_kind("valence,arousal\n0,0\n") == "va"
    with pytest.raises(AnnotationError, match=r"v\.txt line 3: value 1\.5 is outside"):
        parse_va_annotation("valence,arousal\n0,0\n1.5,0\n", source="v.txt")
    with pytest.raises(AnnotationError, match="line 2: expected two"):
        parse_va_annotation("valence,arousal\n0.1\n", source="v.txt")


def test_frame_labels_beyond_the_annotation_are_unlabelled():
    annotation = np.array([3, 4, -1, 5], dtype=np.int16)
    got = frame_labels(annotation, [0, 1, 2, 3, 4, 100, -1])
    assert got.dtype == np.int16
    assert got.tolist() == [3, 4, -1, 5, -1, -1, -1]  # -1 must not wrap to the last frame
    va = frame_labels(np.array([[0.1, 0.2]], dtype=np.float32), [0, 1])
    assert va.shape == (2, 2) and np.isnan(va[1]).all()


def test_find_annotations_matches_names_exactly(tmp_path):
    frames = tmp_path / "aligned"
    touch(
        frames,
        "118-30-640x480/00001.jpg",
        "video5_left/00001.jpg",
        "video5_right/00001.jpg",
        "video5/00001.jpg",
        "batch 2/café 9/00001.jpg",
        "no_annotation/00001.jpg",
    )
    ann = tmp_path / "EXPR_Set"
    for rel in ("Train_Set/118-30-640x480.txt", "Train_Set/video5_left.txt",
                "Validation_Set/video5_right.txt", "Validation_Set/café 9.txt"):  # fmt: skip
        (ann / rel).parent.mkdir(parents=True, exist_ok=True)
        (ann / rel).write_text(f"{EXPR_HEADER}\n1\n", encoding="utf-8")
    units = by_video(list_units(str(frames), "aligned-frames"))
    found = find_annotations(str(ann), units.values())
    expected = {
        "118-30-640x480": ann / "Train_Set/118-30-640x480.txt",
        "video5_left": ann / "Train_Set/video5_left.txt",
        "video5_right": ann / "Validation_Set/video5_right.txt",
        "batch 2/café 9": ann / "Validation_Set/café 9.txt",  # nested id, matched by its last name
    }
    assert found == {units[vid].key: str(path) for vid, path in expected.items()}
    kind, parsed = read_annotation(found[units["video5_left"].key])
    assert kind == "expr" and parsed.tolist() == [1]

    # EXPR and VA files under one root: the same name twice is refused, not guessed.
    (tmp_path / "both" / "VA_Set").mkdir(parents=True)
    (tmp_path / "both" / "VA_Set" / "118-30-640x480.txt").write_text("valence,arousal\n0,0\n")
    (tmp_path / "both" / "EXPR_Set").mkdir()
    (tmp_path / "both" / "EXPR_Set" / "118-30-640x480.txt").write_text(f"{EXPR_HEADER}\n0\n")
    with pytest.raises(AnnotationError, match="several annotation files"):
        find_annotations(str(tmp_path / "both"), units.values())


def test_find_annotations_on_s3(tmp_path, s3_bucket):
    touch(tmp_path / "v", "clip ü.mp4")
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "clip ü.txt").write_text("valence,arousal\n0.5,-5\n", encoding="utf-8")
    storage.upload_dir(tmp_path, s3_bucket)
    (unit,) = list_units(f"{s3_bucket}/v", "videos").units
    found = find_annotations(f"{s3_bucket}/a", [unit])
    assert found == {unit.key: f"{s3_bucket}/a/clip ü.txt"}
    kind, parsed = read_annotation(found[unit.key])
    assert kind == "va" and parsed[0, 0] == 0.5 and np.isnan(parsed[0, 1])


def test_sample_corpus_frames_find_their_annotations(sample_corpus):
    listing = list_units(str(sample_corpus / "aligned"), "aligned-frames")
    assert listing.refused == [] and len(listing.units) == 6
    found = find_annotations(str(sample_corpus / "annotations"), listing.units)
    assert set(found) == {u.key for u in listing.units}  # including "synth_005 café"
    for unit in listing.units:
        kind, annotation = read_annotation(found[unit.key])
        assert kind == "expr" and len(annotation) == len(unit.frame_indices) == 48
        assert (frame_labels(annotation, unit.frame_indices) == annotation).all()
